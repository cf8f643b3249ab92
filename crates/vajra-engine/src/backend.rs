//! The interface every backend implements (CPU here; CUDA behind its own feature), and the
//! plain data that crosses it.
//!
//! A step is what the scheduler handed out: for each scheduled request, a run of new tokens at
//! consecutive positions starting at `context` (tokens whose K/V already sit in the paged cache)
//! and the request's block table. Prefill chunks and decodes mix freely in one step. The backend
//! writes the new tokens' K/V into the cache at the slots the block table gives
//!
//! ```text
//!   position p  ->  block = table[p / block_size], offset = p % block_size
//! ```
//!
//! and returns logits for the last token of every request that samples this step (or for every
//! token, for fidelity checks).

pub mod cache;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(test)]
mod host_kernels;
pub mod layout;
pub mod linalg;

use crate::error::Result;
use crate::spec::ModelSpec;
pub use cache::CacheShape;
use std::collections::BTreeMap;
use vajra_core::ids::{BlockId, HostBlockId};

/// One request's share of a step.
#[derive(Debug, Clone, Copy)]
pub struct SeqInput<'a> {
    /// The new tokens.
    pub tokens: &'a [u32],
    /// Tokens of this request already in the KV cache (position of the first new token).
    pub context: u32,
    /// The request's whole block table; covers `context + tokens.len()` positions.
    pub block_table: &'a [BlockId],
    /// Whether the logits of this request's last new token are wanted.
    pub sample: bool,
}

/// Which logits a step returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// The last token of each request with `sample` set, in batch order.
    Sampled,
    /// Every token of the step, in batch order.
    AllTokens,
}

/// A step's input.
#[derive(Debug, Clone)]
pub struct StepInput<'a> {
    /// Requests in batch order.
    pub seqs: Vec<SeqInput<'a>>,
    /// Which logits to return.
    pub logits_for: LogitsFor,
}

impl StepInput<'_> {
    /// Tokens in the step.
    pub fn num_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.tokens.len()).sum()
    }

    /// Checks the step against a cache of `num_blocks` blocks of `block_size` tokens and a
    /// vocabulary of `vocab` tokens: every block table covers its request's positions with
    /// blocks inside the pool, and every token id is in the vocabulary.
    ///
    /// # Errors
    /// A message naming the first violation.
    pub fn check(
        &self,
        num_blocks: u32,
        block_size: u32,
        vocab: u32,
    ) -> std::result::Result<(), String> {
        for (s, seq) in self.seqs.iter().enumerate() {
            let end = seq.context + seq.tokens.len() as u32;
            if seq.block_table.len() < end.div_ceil(block_size) as usize {
                return Err(format!(
                    "request {s} of the step has {} blocks for {end} positions of {block_size}-token blocks",
                    seq.block_table.len()
                ));
            }
            if let Some(b) = seq.block_table.iter().find(|b| b.0 >= num_blocks) {
                return Err(format!("block {} ≥ num_blocks {num_blocks}", b.0));
            }
            if let Some(t) = seq.tokens.iter().find(|&&t| t >= vocab) {
                return Err(format!("token id {t} ≥ vocab_size {vocab}"));
            }
        }
        Ok(())
    }
}

/// Logits, one row of `vocab` values per returned position.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Logits {
    /// Vocabulary size (row length).
    pub vocab: usize,
    /// Row-major values.
    pub data: Vec<f32>,
}

impl Logits {
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.data.len().checked_div(self.vocab).unwrap_or(0)
    }
    /// One row.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.vocab..(i + 1) * self.vocab]
    }
}

/// Checks swap pairs against the device and host pool sizes.
///
/// # Errors
/// A message naming the first pair outside the pools.
pub fn check_swap(
    out: &[(BlockId, HostBlockId)],
    ins: &[(HostBlockId, BlockId)],
    device_blocks: u32,
    host_blocks: u32,
) -> std::result::Result<(), String> {
    let pairs = out.iter().copied().chain(ins.iter().map(|&(h, d)| (d, h)));
    for (d, h) in pairs {
        if d.0 >= device_blocks || h.0 >= host_blocks {
            return Err(format!(
                "swap between device block {} and host block {} outside {device_blocks} device / {host_blocks} host blocks",
                d.0, h.0
            ));
        }
    }
    Ok(())
}

/// The token of each row of `logits` drawn with `draws[row]` on the host, by the device
/// sampler's algorithm ([`crate::sampler::gumbel::draw`]).
///
/// # Errors
/// A count of draws other than the rows'.
pub fn draw_on_host(logits: &Logits, draws: &[crate::sampler::DeviceDraw]) -> Result<Vec<u32>> {
    check_draws(draws.len(), logits.rows())?;
    Ok((0..logits.rows())
        .map(|r| crate::sampler::gumbel::draw(logits.row(r), &draws[r]))
        .collect())
}

/// One draw per sampled row, or an error naming both counts.
///
/// # Errors
/// `draws ≠ rows`.
pub(crate) fn check_draws(draws: usize, rows: usize) -> Result<()> {
    if draws == rows {
        Ok(())
    } else {
        Err(crate::error::EngineError::invalid(
            "draws",
            draws,
            format!("one per sampled request of the step ({rows})"),
        ))
    }
}

/// A model executor.
pub trait Backend: Send {
    /// A short name for logs and errors (`cpu`, `cuda`).
    fn name(&self) -> &'static str;
    /// The model it runs.
    fn spec(&self) -> &ModelSpec;
    /// Device KV blocks it holds (the scheduler's pool size).
    fn num_blocks(&self) -> u32;
    /// Host blocks it holds for swap preemption.
    fn num_host_blocks(&self) -> u32;
    /// Runs one step.
    ///
    /// # Errors
    /// A block table too short for the positions, a token id outside the vocabulary, or a
    /// device failure.
    fn execute(&mut self, input: &StepInput<'_>) -> Result<Logits>;
    /// Runs one step and returns the greedy token (first maximum) of each sampled request, in
    /// batch order. Backends that can pick it on the device override this to skip copying
    /// logits back.
    ///
    /// # Errors
    /// As [`Backend::execute`].
    fn execute_greedy(&mut self, input: &StepInput<'_>) -> Result<Vec<u32>> {
        let logits = self.execute(input)?;
        Ok((0..logits.rows())
            .map(|r| crate::sampler::argmax(logits.row(r)))
            .collect())
    }
    /// Whether [`Backend::execute_sampled`] draws tokens on the device, so that the engine
    /// sends it steps whose sampled requests set no penalties and no log-probabilities instead
    /// of copying their logits back.
    fn samples_on_device(&self) -> bool {
        false
    }
    /// Runs one step and draws the token of each sampled request, in batch order, with
    /// `draws[row]` by [`crate::sampler::gumbel`]'s algorithm. The default draws on the host
    /// from [`Backend::execute`]'s logits.
    ///
    /// # Errors
    /// As [`Backend::execute`], or a count of draws other than the step's sampled requests.
    fn execute_sampled(
        &mut self,
        input: &StepInput<'_>,
        draws: &[crate::sampler::DeviceDraw],
    ) -> Result<Vec<u32>> {
        draw_on_host(&self.execute(input)?, draws)
    }
    /// Copies device blocks to host blocks (swap out) and host blocks to device blocks (swap
    /// in), in that order.
    ///
    /// # Errors
    /// A block id out of range.
    fn swap(
        &mut self,
        out: &[(BlockId, HostBlockId)],
        ins: &[(HostBlockId, BlockId)],
    ) -> Result<()>;
    /// The backend as one that times its operators (`vajra-engine serve --profile-out`), where
    /// it can.
    fn as_profiled(&mut self) -> Option<&mut dyn Profiled> {
        None
    }
    /// The KV of `blocks`, for a hand-off to another instance (disaggregated prefill and
    /// decode): for each block in order, every layer's K then V rows, as `f32`.
    ///
    /// # Errors
    /// A block id out of range, or a backend that cannot hand KV off yet.
    fn export_blocks(&self, blocks: &[BlockId]) -> Result<Vec<f32>> {
        let _ = blocks;
        Err(crate::error::EngineError::Backend {
            backend: self.name().into(),
            message: "handing KV blocks to another instance is not supported by this backend yet (the cpu backend does it)".into(),
        })
    }
    /// Writes KV that [`Backend::export_blocks`] read on another instance into `blocks`.
    ///
    /// # Errors
    /// A block id out of range, data of the wrong size (another model or block size), or a
    /// backend that cannot take KV yet.
    fn import_blocks(&mut self, blocks: &[BlockId], data: &[f32]) -> Result<()> {
        let _ = (blocks, data);
        Err(crate::error::EngineError::Backend {
            backend: self.name().into(),
            message: "taking KV blocks from another instance is not supported by this backend yet (the cpu backend does it)".into(),
        })
    }
}

/// A backend that can time its operators (`vajra-engine profile`, `serve --profile-out`; the
/// profiler itself is `crate::profile`).
pub trait Profiled: Backend {
    /// Runs one step and returns each operator's time summed over the step, in ms.
    ///
    /// # Errors
    /// As [`Backend::execute`].
    fn profile_step(&mut self, input: &StepInput<'_>) -> Result<BTreeMap<&'static str, f64>>;
    /// The device, for provenance.
    fn device(&self) -> serde_json::Value;
    /// How the operators run and are timed, for provenance.
    fn method(&self) -> String;
}
