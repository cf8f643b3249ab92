//! Moving a prefilled request's KV between engine processes (disaggregated prefill and decode).
//!
//! A [`KvTransport`] carries [`KvMessage`]s both ways: the prefill side sends a
//! [`KvMessage::Handoff`] (the request, its first token and its prompt's KV blocks), the decode
//! side answers [`KvMessage::Accepted`] (the prefill side frees its blocks),
//! [`KvMessage::NoRoom`] (offer it again later; nothing is held on the decode side) or
//! [`KvMessage::Refused`] (never: the request cannot run there). [`TcpKvTransport`] is the one
//! implementation here (loopback or any host); an RDMA or NIXL-class transport implements the
//! same two calls.
//!
//! Wire format of one message: the magic `VKV1`, a `u32` (little-endian) length and that many
//! bytes of JSON (the message without its KV), then a `u64` count of `f32` KV values and the
//! values, little-endian (zero for messages without KV).

use crate::engine::KvHandoff;
use crate::error::{EngineError, Result};
use serde::{Deserialize, Serialize};
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::TcpStream;
use vajra_core::ids::RequestId;

/// One message between a prefill and a decode engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum KvMessage {
    /// A prefilled request with its KV.
    Handoff(Box<KvHandoff>),
    /// The decode engine holds it now: the prefill engine frees its blocks.
    Accepted {
        /// The request.
        id: RequestId,
    },
    /// The decode engine has no room now; nothing of it is held there.
    NoRoom {
        /// The request.
        id: RequestId,
    },
    /// The decode engine cannot run it at all.
    Refused {
        /// The request.
        id: RequestId,
        /// Why.
        reason: String,
    },
    /// What a decode engine's step produced for a request (relayed to its client).
    Output(WireOutput),
    /// The client of a request went away: the decode engine aborts it.
    Abort {
        /// The request.
        id: RequestId,
    },
}

/// A [`crate::engine::RequestOutput`] as a decode engine relays it to the prefill engine's
/// client (log-probabilities are not relayed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireOutput {
    /// The request.
    pub id: RequestId,
    /// Tokens appended.
    pub tokens: Vec<u32>,
    /// Text that became final.
    pub text: String,
    /// Set when the request finished.
    pub finish: Option<vajra_core::request::FinishReason>,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Output tokens so far.
    pub output_tokens: u32,
}

/// Sends and receives [`KvMessage`]s.
pub trait KvTransport: Send {
    /// Sends one message.
    ///
    /// # Errors
    /// The peer is gone or the link failed.
    fn send(&mut self, m: &KvMessage) -> Result<()>;
    /// The next message; `None` when the peer closed the link between messages.
    ///
    /// # Errors
    /// The link failed, or the peer sent something that is not a message.
    fn recv(&mut self) -> Result<Option<KvMessage>>;
}

/// Largest JSON part of a message (a request with a long token prompt fits many times over).
const MAX_HEADER: u32 = 256 << 20;
/// Most KV values in one message (64 GiB of `f32`).
const MAX_KV: u64 = 16 << 30;
const MAGIC: &[u8; 4] = b"VKV1";

/// [`KvTransport`] over one TCP connection.
pub struct TcpKvTransport {
    read: BufReader<TcpStream>,
    write: BufWriter<TcpStream>,
}

fn link_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Backend {
        backend: "kv transport".into(),
        message: e.to_string(),
    }
}

impl TcpKvTransport {
    /// The two halves, for a reader thread and a writer.
    pub fn split(self) -> (BufReader<TcpStream>, BufWriter<TcpStream>) {
        (self.read, self.write)
    }

    /// A transport over a connected stream.
    ///
    /// # Errors
    /// The stream cannot be cloned for reading and writing.
    pub fn new(stream: TcpStream) -> Result<Self> {
        stream.set_nodelay(true).map_err(link_err)?;
        let read = stream.try_clone().map_err(link_err)?;
        Ok(TcpKvTransport {
            read: BufReader::with_capacity(1 << 20, read),
            write: BufWriter::with_capacity(1 << 20, stream),
        })
    }
}

impl KvTransport for TcpKvTransport {
    fn send(&mut self, m: &KvMessage) -> Result<()> {
        write_message(&mut self.write, m)
    }

    fn recv(&mut self) -> Result<Option<KvMessage>> {
        read_message(&mut self.read)
    }
}

/// Writes one message (and flushes).
///
/// # Errors
/// The link failed.
pub fn write_message(w: &mut impl Write, m: &KvMessage) -> Result<()> {
    {
        let header = serde_json::to_vec(m).map_err(link_err)?;
        let kv: &[f32] = match m {
            KvMessage::Handoff(h) => &h.kv,
            _ => &[],
        };
        w.write_all(MAGIC).map_err(link_err)?;
        w.write_all(&(header.len() as u32).to_le_bytes())
            .map_err(link_err)?;
        w.write_all(&header).map_err(link_err)?;
        w.write_all(&(kv.len() as u64).to_le_bytes())
            .map_err(link_err)?;
        for chunk in kv.chunks(1 << 16) {
            let bytes: Vec<u8> = chunk.iter().flat_map(|v| v.to_le_bytes()).collect();
            w.write_all(&bytes).map_err(link_err)?;
        }
        w.flush().map_err(link_err)
    }
}

/// Reads one message; `None` when the peer closed the link between messages.
///
/// # Errors
/// The link failed, or the bytes are not a message.
pub fn read_message(r: &mut impl Read) -> Result<Option<KvMessage>> {
    {
        let mut magic = [0u8; 4];
        match r.read_exact(&mut magic) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(link_err(e)),
        }
        if &magic != MAGIC {
            return Err(link_err(format!(
                "not a KV message (starts {magic:?}, expected {MAGIC:?})"
            )));
        }
        let mut n4 = [0u8; 4];
        r.read_exact(&mut n4).map_err(link_err)?;
        let n = u32::from_le_bytes(n4);
        if n > MAX_HEADER {
            return Err(link_err(format!(
                "a message header of {n} bytes (at most {MAX_HEADER})"
            )));
        }
        let mut header = vec![0u8; n as usize];
        r.read_exact(&mut header).map_err(link_err)?;
        let mut m: KvMessage = serde_json::from_slice(&header).map_err(link_err)?;
        let mut n8 = [0u8; 8];
        r.read_exact(&mut n8).map_err(link_err)?;
        let count = u64::from_le_bytes(n8);
        if count > MAX_KV {
            return Err(link_err(format!(
                "{count} KV values in one message (at most {MAX_KV})"
            )));
        }
        let mut bytes = vec![0u8; count as usize * 4];
        r.read_exact(&mut bytes).map_err(link_err)?;
        match &mut m {
            KvMessage::Handoff(h) => {
                h.kv = bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
            }
            _ if count > 0 => {
                return Err(link_err("KV values on a message that carries none"));
            }
            _ => {}
        }
        Ok(Some(m))
    }
}
