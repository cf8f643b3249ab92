//! The model runner: the executor side of the seam. It turns a step's [`SchedulerOutput`]
//! into backend input (each request's new tokens, context length and block table), runs the
//! backend's forward pass and picks one token per sampling request — on the device when the
//! backend samples there and no request needs the host sampler (penalties, log-probabilities),
//! greedy from the backend's argmax when every sampling request is greedy, otherwise on the
//! host from the logits.
//!
//! Cost: one pass over the step's requests to build the input; the forward pass dominates.

use super::Live;
use crate::backend::{Backend, LogitsFor, SeqInput, StepInput};
use crate::error::Result;
use crate::sampler::{DeviceDraw, Sampled};
use std::collections::HashMap;
use std::time::Instant;
use vajra_core::ids::RequestId;
use vajra_core::sched::output::SchedulerOutput;

/// What the runner produced for one step.
pub(super) struct RunnerResult {
    /// One pick per sampling request, in batch order.
    pub picks: Vec<Sampled>,
    /// Wall time of the backend call (forward pass and its sampling), in nanoseconds.
    pub forward_ns: u64,
}

/// Brings each scheduled request's block table up to date: rebuilt from the full data after
/// (re)admission, extended by the step's new blocks otherwise.
pub(super) fn update_tables(out: &SchedulerOutput, live: &mut HashMap<RequestId, Live>) {
    for id in &out.preempted {
        if let Some(l) = live.get_mut(id) {
            l.table.clear();
        }
    }
    for s in &out.scheduled {
        let l = live
            .get_mut(&s.id)
            .expect("scheduled request is live in the engine");
        match out.new_data(s) {
            Some(new) => l.table.clone_from(&new.block_table),
            None => l.table.extend_from_slice(out.new_blocks(s)),
        }
    }
}

/// Runs the step on `backend` and picks the sampled tokens.
///
/// # Errors
/// A backend failure (including a failed swap).
pub(super) fn run(
    backend: &mut dyn Backend,
    out: &SchedulerOutput,
    live: &mut HashMap<RequestId, Live>,
) -> Result<RunnerResult> {
    backend.swap(&out.swap_out, &out.swap_in)?;
    let input = StepInput {
        seqs: out
            .scheduled
            .iter()
            .map(|s| {
                let l = &live[&s.id];
                let a = s.num_computed as usize;
                SeqInput {
                    tokens: &l.tokens[a..a + s.num_tokens as usize],
                    context: s.num_computed,
                    block_table: &l.table,
                    sample: s.samples,
                }
            })
            .collect(),
        logits_for: LogitsFor::Sampled,
    };
    let sampling = || out.scheduled.iter().filter(|s| s.samples);
    let greedy_only = sampling().all(|s| live[&s.id].sampler.plain_greedy());
    // Device draws for every sampled request, where the backend samples on the device and
    // none of them sets penalties or log-probabilities (else the host samples them all).
    let draws: Option<Vec<DeviceDraw>> = if !greedy_only && backend.samples_on_device() {
        sampling()
            .map(|s| live[&s.id].sampler.device_draw())
            .collect()
    } else {
        None
    };
    let forward = Instant::now();
    // Greedy-only steps, and steps drawn on the device, get tokens from the backend.
    let result = if greedy_only {
        Err(backend.execute_greedy(&input)?)
    } else if let Some(draws) = &draws {
        Err(backend.execute_sampled(&input, draws)?)
    } else {
        Ok(backend.execute(&input)?)
    };
    let forward_ns = forward.elapsed().as_nanos() as u64;
    drop(input);
    let picks = match result {
        Err(ids) => ids
            .into_iter()
            .map(|token| Sampled {
                token,
                logprob: 0.0,
                top: Vec::new(),
            })
            .collect(),
        Ok(logits) => sampling()
            .enumerate()
            .map(|(row, s)| {
                let mut lg = logits.row(row).to_vec();
                let l = live.get_mut(&s.id).expect("scheduled request is live");
                l.sampler.sample(&mut lg)
            })
            .collect(),
    };
    Ok(RunnerResult { picks, forward_ns })
}
