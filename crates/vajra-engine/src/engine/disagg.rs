//! Disaggregated prefill and decode in the engine: the same scheduler hand-off as the
//! simulator's pools (`vajra_core::sched::handoff`), with real KV blocks.
//!
//! ```text
//!  prefill engine (role prefill)                      decode engine (role decode)
//!  step() … first token sampled: HandedOff
//!  take_handed_off() ─► export_handoff(id) ─► KvHandoff ─► (a transport) ─► accept_handoff(h)
//!                       (blocks read, still held)              reserve the prompt's blocks,
//!                                                              write the KV the prefix cache
//!                                                              lacks, append the first token
//!  release_handoff(id) ◄──────────── once the decode side has it  ──────── step() … decodes
//! ```
//!
//! Times in a hand-off are on the prefill engine's clock; the decode engine moves them onto its
//! own by the difference between its clock when it accepts the hand-off and the prefill clock
//! when it was exported (`sent_at`), so the transfer itself counts as instant in the decode
//! engine's records. A front that times the client's stream is the end-to-end truth.

use super::{Engine, Live, RequestOutput};
use crate::error::{EngineError, Result};
use crate::sampler::RequestSampler;
use crate::tokenizer::IncrementalDetokenizer;
use serde::{Deserialize, Serialize};
use vajra_core::config::InstanceRole;
use vajra_core::ids::RequestId;
use vajra_core::request::Prompt;
use vajra_core::sched::Handoff;
use vajra_core::time::Timestamp;

/// A prefilled request with its KV: what a prefill engine sends a decode engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KvHandoff {
    /// The request as it arrived (token prompt, the client's sampling parameters).
    pub request: vajra_core::request::Request,
    /// The first output token.
    pub first_token: u32,
    /// When the prefill engine first scheduled it (its clock).
    pub first_scheduled: Timestamp,
    /// When the prefill engine sampled the first token (its clock).
    pub prefill_done: Timestamp,
    /// Prompt tokens the prefill engine found cached.
    pub cached_prompt_tokens: u32,
    /// Times the prefill engine preempted it.
    pub num_preemptions: u32,
    /// The prefill engine's clock when it exported the hand-off.
    pub sent_at: Timestamp,
    /// Tokens per KV block (both engines must use the same).
    pub block_size: u32,
    /// The KV of every prompt block, in prompt order ([`crate::backend::Backend::export_blocks`]).
    #[serde(skip)]
    pub kv: Vec<f32>,
}

impl Engine {
    /// Sets what this engine does (before its first request): a prefill engine runs each
    /// request to its first token and hands it off; a decode engine takes hand-offs only.
    ///
    /// # Errors
    /// Requests are already live.
    pub fn set_role(&mut self, role: InstanceRole) -> Result<()> {
        Ok(self.driver.scheduler_mut().set_role(role)?)
    }

    /// Requests handed off since the last call (a prefill engine's), to export.
    pub fn take_handed_off(&mut self) -> Vec<RequestId> {
        std::mem::take(&mut self.handed_off)
    }

    /// Reads a handed-off request's prompt KV out of the backend; its blocks stay held until
    /// [`Engine::release_handoff`].
    ///
    /// # Errors
    /// The request is not handed off, or the backend cannot export blocks.
    pub fn export_handoff(&self, id: RequestId) -> Result<KvHandoff> {
        let sched = self.driver.scheduler();
        let h = sched.take_handoff(id)?;
        let kv = sched.kv();
        let prompt_blocks = kv.blocks_for(h.request.prompt.len()) as usize;
        let table = sched.block_table(id).unwrap_or_default();
        let blocks = &table[..prompt_blocks.min(table.len())];
        Ok(KvHandoff {
            first_token: h.first_token,
            first_scheduled: h.first_scheduled,
            prefill_done: h.prefill_done,
            cached_prompt_tokens: h.cached_prompt_tokens,
            num_preemptions: h.num_preemptions,
            sent_at: self.now(),
            block_size: kv.block_size(),
            kv: self.backend.export_blocks(blocks)?,
            request: h.request,
        })
    }

    /// The decode engine has a handed-off request: its blocks are freed here.
    ///
    /// # Errors
    /// The request is not handed off.
    pub fn release_handoff(&mut self, id: RequestId) -> Result<()> {
        self.driver.scheduler_mut().release_handoff(id)?;
        self.live.remove(&id);
        Ok(())
    }

    /// Takes a prefilled request on a decode engine: reserves its prompt's blocks (those its
    /// prefix cache holds count as hits), writes the rest of the KV into them and appends the
    /// first token, which the returned output carries. `None` when the blocks do not fit now
    /// (nothing is held: offer it again once requests finish).
    ///
    /// # Errors
    /// Not a decode engine, a request invalid here, another block size, or KV of the wrong
    /// size.
    pub fn accept_handoff(&mut self, h: &KvHandoff) -> Result<Option<RequestOutput>> {
        if self.driver.scheduler().role() != InstanceRole::Decode {
            return Err(EngineError::invalid(
                "role",
                self.driver.scheduler().role().name(),
                "decode, to accept a hand-off (Engine::set_role)",
            ));
        }
        let block_size = self.driver.scheduler().kv().block_size();
        if h.block_size != block_size {
            return Err(EngineError::invalid(
                "hand-off block_size",
                h.block_size,
                format!("this engine's cache.block_size = {block_size}"),
            ));
        }
        let Prompt::Tokens(prompt) = &h.request.prompt else {
            return Err(EngineError::invalid(
                "hand-off prompt",
                "synthetic",
                "token ids",
            ));
        };
        let prompt = prompt.clone();
        let now = self.now();
        // The prefill clock onto this one.
        let shift = |t: Timestamp| Timestamp(t.0.saturating_add(now.0).saturating_sub(h.sent_at.0));
        let mut request = h.request.clone();
        request.arrival = shift(request.arrival);
        request.ttft_deadline = None;
        let core = Handoff {
            request,
            first_token: h.first_token,
            first_scheduled: shift(h.first_scheduled),
            prefill_done: shift(h.prefill_done),
            cached_prompt_tokens: h.cached_prompt_tokens,
            num_preemptions: h.num_preemptions,
        };
        let id = core.request.id;
        let sched = self.driver.scheduler_mut();
        let Some(tokens) = sched.reserve_remote(&core, now)? else {
            return Ok(None);
        };
        // The blocks past the local prefix hits receive the prefill engine's KV.
        let prompt_blocks = sched.kv().blocks_for(prompt.len() as u32) as usize;
        let first_new = (prompt.len() as u32 - tokens) as usize / block_size as usize;
        let table = sched.block_table(id).expect("reserved").to_vec();
        let stride = h.kv.len().checked_div(prompt_blocks).unwrap_or(0);
        let written = if h.kv.len() == stride * prompt_blocks {
            self.backend.import_blocks(
                &table[first_new..prompt_blocks],
                &h.kv[first_new * stride..prompt_blocks * stride],
            )
        } else {
            Err(EngineError::invalid(
                "hand-off kv",
                format!("{} values", h.kv.len()),
                format!("whole blocks for the prompt's {prompt_blocks}"),
            ))
        };
        if let Err(e) = written {
            // Nothing of it may stay held here.
            let _ = self.driver.abort(id, now);
            return Err(e);
        }
        let first = self.driver.scheduler_mut().remote_kv_arrived(id, now)?;
        let prompt_len = prompt.len();
        let fallback = self.seed ^ id.0.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut sampler = RequestSampler::new(h.request.sampling.clone(), &prompt, fallback);
        sampler.resume(&[first]);
        let mut tokens_all = prompt;
        tokens_all.push(first);
        let mut detok = IncrementalDetokenizer::new(prompt_len);
        let text = detok.step(&self.codec, &tokens_all)?;
        let arrival = shift(h.request.arrival);
        let mut out = RequestOutput::empty(id, prompt_len as u32);
        out.tokens.push(first);
        out.text.clone_from(&text);
        out.output_tokens = 1;
        out.ttft = Some(now.since(arrival));
        self.live.insert(
            id,
            Live {
                sampler,
                detok,
                tokens: tokens_all,
                prompt_len,
                table: Vec::new(),
                emitted: text.len(),
                text,
                arrival,
                last_token: Some(now),
                pending: RequestOutput::empty(id, prompt_len as u32),
            },
        );
        if let Some(run) = &mut self.run {
            run.issued += 1;
            run.collector.on_arrival(id, arrival);
            run.collector.on_token(id, now);
        }
        Ok(Some(out))
    }
}
