//! The engine thread's side of disaggregated serving (`serve --role prefill|decode`).
//!
//! ```text
//!  client ─HTTP─► prefill server: prefill, first token ─Handoff(KV)─► decode server
//!  client ◄─HTTP── prefill server ◄──────── Output per decode step ─── decode server
//! ```
//!
//! The prefill server is its clients' front: it hands each request with its prompt's KV to the
//! decode server over one TCP connection ([`crate::kv_transport`]) and relays the decode
//! server's outputs (the first token, which travels with the KV, included) into the client's
//! stream. It frees a request's blocks once the decode server answers `Accepted`; on `NoRoom`
//! it keeps them and offers the request again a little later; on `Refused` the client gets the
//! request finished as `abort`. A client that goes away is aborted on both sides. When the
//! decode server's connection ends, every request relayed or waiting for it ends as `abort`
//! (the client's stream closes, never hangs) and every block held for it is freed. A decode
//! server aborts every request of a connection that ends.

use super::Command;
use crate::engine::{Engine, KvHandoff, RequestOutput};
use crate::kv_transport::{KvMessage, WireOutput, read_message, write_message};
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{BufReader, BufWriter};
use std::net::TcpStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use vajra_core::ids::RequestId;
use vajra_core::request::FinishReason;

/// How a server takes part in disaggregated serving.
#[derive(Debug)]
pub enum KvLink {
    /// Prefill: hand every request off to the decode server at this address.
    Prefill {
        /// `HOST:PORT` of the decode server's KV listener.
        decode: String,
    },
    /// Decode: take hand-offs on this listener.
    Decode {
        /// The KV listener (bound by the caller, so a busy port fails before the model loads).
        listener: std::net::TcpListener,
    },
}

/// How long a request the decode server had no room for waits before it is offered again.
const RETRY: Duration = Duration::from_millis(5);

/// The engine thread's link state.
pub(super) enum Link {
    /// Colocated: no link.
    None,
    Prefill(PrefillLink),
    Decode(DecodeLink),
}

pub(super) struct PrefillLink {
    /// `None` once the decode server is gone (why in `dead`).
    writer: Option<BufWriter<TcpStream>>,
    dead: Option<String>,
    /// Handed off, answer pending, with the hand-off to offer again on `NoRoom`.
    offered: HashMap<RequestId, KvHandoff>,
    /// Offered again at these times.
    retry: VecDeque<(Instant, RequestId)>,
    /// Accepted by the decode server: their outputs come from it.
    relayed: HashSet<RequestId>,
    /// Outputs (relayed, or final ones this side decided) for the clients.
    inbox: Vec<RequestOutput>,
}

pub(super) struct DecodeLink {
    writers: HashMap<u32, BufWriter<TcpStream>>,
    /// Each remote request's connection.
    remote: HashMap<RequestId, u32>,
}

fn spawn_reader(conn: u32, mut r: BufReader<TcpStream>, tx: mpsc::Sender<Command>) {
    std::thread::Builder::new()
        .name(format!("vajra-kv-read-{conn}"))
        .spawn(move || {
            loop {
                match read_message(&mut r) {
                    Ok(Some(msg)) => {
                        if tx.send(Command::Kv { conn, msg }).is_err() {
                            return;
                        }
                    }
                    Ok(None) => {
                        let _ = tx.send(Command::KvClosed {
                            conn,
                            why: "the peer closed the KV connection".into(),
                        });
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Command::KvClosed {
                            conn,
                            why: e.to_string(),
                        });
                        return;
                    }
                }
            }
        })
        .expect("spawn a KV reader thread");
}

fn split(s: TcpStream) -> std::io::Result<(BufReader<TcpStream>, BufWriter<TcpStream>)> {
    s.set_nodelay(true)?;
    let r = s.try_clone()?;
    Ok((
        BufReader::with_capacity(1 << 20, r),
        BufWriter::with_capacity(1 << 20, s),
    ))
}

impl Link {
    /// Connects (prefill) or starts accepting (decode); readers feed `tx`.
    ///
    /// # Errors
    /// The decode server cannot be reached within 30 s (prefill).
    pub(super) fn start(link: Option<KvLink>, tx: &mpsc::Sender<Command>) -> std::io::Result<Link> {
        match link {
            None => Ok(Link::None),
            Some(KvLink::Prefill { decode }) => {
                let began = Instant::now();
                let stream = loop {
                    match TcpStream::connect(&decode) {
                        Ok(s) => break s,
                        Err(e) if began.elapsed() < Duration::from_secs(30) => {
                            tracing::debug!(error = %e, "decode server not up yet");
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        Err(e) => {
                            return Err(std::io::Error::new(
                                e.kind(),
                                format!("the decode server's KV listener at {decode}: {e}"),
                            ));
                        }
                    }
                };
                let (r, w) = split(stream)?;
                spawn_reader(0, r, tx.clone());
                Ok(Link::Prefill(PrefillLink {
                    writer: Some(w),
                    dead: None,
                    offered: HashMap::new(),
                    retry: VecDeque::new(),
                    relayed: HashSet::new(),
                    inbox: Vec::new(),
                }))
            }
            Some(KvLink::Decode { listener }) => {
                let tx = tx.clone();
                std::thread::Builder::new()
                    .name("vajra-kv-accept".into())
                    .spawn(move || {
                        for (conn, s) in (1u32..).zip(listener.incoming()) {
                            let Ok(s) = s else { continue };
                            let Ok((r, w)) = split(s) else { continue };
                            if tx.send(Command::KvConnected { conn, writer: w }).is_err() {
                                return;
                            }
                            spawn_reader(conn, r, tx.clone());
                        }
                    })
                    .expect("spawn the KV accept thread");
                Ok(Link::Decode(DecodeLink {
                    writers: HashMap::new(),
                    remote: HashMap::new(),
                }))
            }
        }
    }

    /// Whether the engine thread must wake up on its own (a hand-off to offer again).
    pub(super) fn needs_polling(&self) -> bool {
        matches!(self, Link::Prefill(p) if !p.retry.is_empty())
    }

    /// A new KV connection (decode).
    pub(super) fn connected(&mut self, conn: u32, writer: BufWriter<TcpStream>) {
        if let Link::Decode(d) = self {
            d.writers.insert(conn, writer);
        }
    }

    /// A message from the peer.
    pub(super) fn message(&mut self, engine: &mut Engine, conn: u32, msg: KvMessage) {
        match self {
            Link::None => {}
            Link::Prefill(p) => p.message(engine, msg),
            Link::Decode(d) => d.message(engine, conn, msg),
        }
    }

    /// A connection ended.
    pub(super) fn closed(&mut self, engine: &mut Engine, conn: u32, why: &str) {
        match self {
            Link::None => {}
            Link::Prefill(p) => p.lost(engine, why),
            Link::Decode(d) => {
                d.writers.remove(&conn);
                let gone: Vec<RequestId> = d
                    .remote
                    .iter()
                    .filter(|&(_, &c)| c == conn)
                    .map(|(&id, _)| id)
                    .collect();
                for id in gone {
                    d.remote.remove(&id);
                    let _ = engine.abort(id);
                }
                tracing::warn!(
                    conn,
                    why,
                    "a prefill server's KV connection ended; its requests were aborted"
                );
            }
        }
    }

    /// After a step: a prefill server offers what it handed off (and what waits for another
    /// offer) and adds the outputs for its clients that the link produced to `outputs`.
    pub(super) fn after_step(&mut self, engine: &mut Engine, outputs: &mut Vec<RequestOutput>) {
        match self {
            Link::None => {}
            Link::Prefill(p) => {
                for id in engine.take_handed_off() {
                    match engine.export_handoff(id) {
                        Ok(h) => p.offer(engine, h),
                        Err(e) => p.fail(engine, id, &e.to_string()),
                    }
                }
                let now = Instant::now();
                while p.retry.front().is_some_and(|(t, _)| *t <= now) {
                    let (_, id) = p.retry.pop_front().expect("peeked");
                    if let Some(h) = p.offered.remove(&id) {
                        p.offer(engine, h);
                    }
                }
                outputs.append(&mut p.inbox);
            }
            Link::Decode(_) => {}
        }
    }

    /// On a decode server: sends a remote request's output back to its prefill server and
    /// returns `true` (it has no client here); `false` for any other output.
    pub(super) fn relay(&mut self, o: &RequestOutput) -> bool {
        let Link::Decode(d) = self else {
            return false;
        };
        let Some(&conn) = d.remote.get(&o.id) else {
            return false;
        };
        if o.finish.is_some() {
            d.remote.remove(&o.id);
        }
        if let Some(w) = d.writers.get_mut(&conn) {
            let _ = write_message(w, &KvMessage::Output(wire(o)));
        }
        true
    }

    /// The client of `id` went away. Returns whether the link owned the request (then the
    /// decode server is told, and any blocks held for it here are freed).
    pub(super) fn client_gone(&mut self, engine: &mut Engine, id: RequestId) -> bool {
        let Link::Prefill(p) = self else {
            return false;
        };
        if p.relayed.remove(&id) {
            p.send(&KvMessage::Abort { id });
            return true;
        }
        if p.offered.remove(&id).is_some() {
            // Still held here; an `Accepted` that crosses this is answered with an abort.
            let _ = engine.abort(id);
            p.send(&KvMessage::Abort { id });
            return true;
        }
        false
    }
}

fn wire(o: &RequestOutput) -> WireOutput {
    WireOutput {
        id: o.id,
        tokens: o.tokens.clone(),
        text: o.text.clone(),
        finish: o.finish,
        prompt_tokens: o.prompt_tokens,
        output_tokens: o.output_tokens,
    }
}

fn unwire(w: WireOutput) -> RequestOutput {
    RequestOutput {
        tokens: w.tokens,
        text: w.text,
        finish: w.finish,
        output_tokens: w.output_tokens,
        ..RequestOutput::empty(w.id, w.prompt_tokens)
    }
}

/// A request the prefill side ends itself (the decode side refused it or is gone).
fn aborted(id: RequestId, prompt_tokens: u32) -> RequestOutput {
    RequestOutput {
        finish: Some(FinishReason::Abort),
        ..RequestOutput::empty(id, prompt_tokens)
    }
}

impl PrefillLink {
    fn send(&mut self, m: &KvMessage) -> bool {
        let Some(w) = self.writer.as_mut() else {
            return false;
        };
        match write_message(w, m) {
            Ok(()) => true,
            Err(e) => {
                self.writer = None;
                self.dead = Some(e.to_string());
                false
            }
        }
    }

    fn offer(&mut self, engine: &mut Engine, h: KvHandoff) {
        let id = h.request.id;
        if self.dead.is_some() {
            let why = self.dead.clone().unwrap_or_default();
            self.fail(engine, id, &why);
            return;
        }
        let msg = KvMessage::Handoff(Box::new(h));
        if self.send(&msg) {
            let KvMessage::Handoff(h) = msg else {
                unreachable!()
            };
            self.offered.insert(id, *h);
        } else {
            let why = self.dead.clone().unwrap_or_default();
            self.fail(engine, id, &why);
            self.lose_all(engine);
        }
    }

    /// Ends `id` here: its blocks freed, its client told.
    fn fail(&mut self, engine: &mut Engine, id: RequestId, why: &str) {
        tracing::warn!(request = %id, why, "disaggregated request failed");
        let prompt = self
            .offered
            .remove(&id)
            .map_or(0, |h| h.request.prompt.len());
        let _ = engine.abort(id);
        self.inbox.push(aborted(id, prompt));
    }

    fn message(&mut self, engine: &mut Engine, msg: KvMessage) {
        match msg {
            KvMessage::Accepted { id } => {
                if self.offered.remove(&id).is_some() {
                    let _ = engine.release_handoff(id);
                    self.relayed.insert(id);
                } else {
                    // Its client went away meanwhile: the decode side drops it too.
                    self.send(&KvMessage::Abort { id });
                }
            }
            KvMessage::NoRoom { id } => {
                if self.offered.contains_key(&id) {
                    self.retry.push_back((Instant::now() + RETRY, id));
                }
            }
            KvMessage::Refused { id, reason } => {
                if self.offered.contains_key(&id) {
                    self.fail(
                        engine,
                        id,
                        &format!("the decode server refused it: {reason}"),
                    );
                }
            }
            KvMessage::Output(w) => {
                if !self.relayed.contains(&w.id) {
                    return;
                }
                if w.finish.is_some() {
                    self.relayed.remove(&w.id);
                }
                self.inbox.push(unwire(w));
            }
            KvMessage::Handoff(_) | KvMessage::Abort { .. } => {
                tracing::warn!("a decode server sent a prefill server's message; ignored");
            }
        }
    }

    /// The decode server is gone.
    fn lost(&mut self, engine: &mut Engine, why: &str) {
        self.writer = None;
        self.dead = Some(why.to_owned());
        self.lose_all(engine);
    }

    fn lose_all(&mut self, engine: &mut Engine) {
        let why = self.dead.clone().unwrap_or_default();
        for id in std::mem::take(&mut self.relayed) {
            tracing::warn!(request = %id, why, "the decode server is gone mid-stream");
            self.inbox.push(aborted(id, 0));
        }
        let offered: Vec<RequestId> = self.offered.keys().copied().collect();
        for id in offered {
            self.fail(engine, id, &why);
        }
        self.retry.clear();
    }
}

impl DecodeLink {
    fn message(&mut self, engine: &mut Engine, conn: u32, msg: KvMessage) {
        let reply = |d: &mut DecodeLink, m: KvMessage| {
            if let Some(w) = d.writers.get_mut(&conn) {
                let _ = write_message(w, &m);
            }
        };
        match msg {
            KvMessage::Handoff(h) => {
                let id = h.request.id;
                match engine.accept_handoff(&h) {
                    Ok(Some(first)) => {
                        self.remote.insert(id, conn);
                        reply(self, KvMessage::Accepted { id });
                        reply(self, KvMessage::Output(wire(&first)));
                    }
                    Ok(None) => reply(self, KvMessage::NoRoom { id }),
                    Err(e) => reply(
                        self,
                        KvMessage::Refused {
                            id,
                            reason: e.to_string(),
                        },
                    ),
                }
            }
            KvMessage::Abort { id } => {
                if self.remote.remove(&id).is_some() {
                    let _ = engine.abort(id);
                }
            }
            m => tracing::warn!(
                ?m,
                "a prefill server sent a decode server's message; ignored"
            ),
        }
    }
}
