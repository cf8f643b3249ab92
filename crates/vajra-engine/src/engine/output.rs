//! The output processor: what happens to a sampled token after the runner picked it. It is
//! appended to the request's tokens, detokenized incrementally, and checked against the
//! end-of-sequence ids and stop strings (the executor's side of the seam; stop token ids and
//! `max_tokens` are the scheduler's). Then, as the replica driver's [`StepSink`], it turns the
//! scheduler's events into [`RequestOutput`]s: tokens, text that became final, time to first
//! token or since the previous token, and the lifecycle record of a finished request.
//!
//! Stop strings are held back from streamed text until they can no longer start a match.

use super::{Live, RequestOutput, TokenLogprob};
use crate::error::Result;
use crate::sampler::Sampled;
use crate::tokenizer::TextCodec;
use std::collections::HashMap;
use vajra_core::driver::{StepRecord, StepSink, StepTicket};
use vajra_core::ids::RequestId;
use vajra_core::sampling::SamplingParams;
use vajra_core::sched::output::{ModelRunnerOutput, RequestEvent, SampledToken, SchedulerOutput};
use vajra_core::time::Timestamp;
use vajra_metrics::{BatchRecord, Collector};

/// Appends each pick to its request, detokenizes it and decides executor-side stops; returns
/// the runner output the scheduler takes.
///
/// # Errors
/// A tokenizer failure.
///
/// # Panics
/// If there is not one pick per sampling request.
pub(super) fn apply_picks(
    out: &SchedulerOutput,
    picks: Vec<Sampled>,
    live: &mut HashMap<RequestId, Live>,
    codec: &TextCodec,
) -> Result<ModelRunnerOutput> {
    let mut runner = ModelRunnerOutput::default();
    let mut picks = picks.into_iter();
    for s in &out.scheduled {
        if !s.samples {
            runner.sampled.push(None);
            continue;
        }
        let picked = picks.next().expect("one pick per sampling request");
        let l = live.get_mut(&s.id).expect("scheduled request is live");
        l.sampler.observe(picked.token);
        l.tokens.push(picked.token);
        let delta = l.detok.step(codec, &l.tokens)?;
        let p = l.sampler.params();
        let mut stop = !p.ignore_eos && codec.eos_ids().contains(&picked.token);
        if !delta.is_empty() {
            let from = l
                .text
                .len()
                .saturating_sub(max_stop_len(p).saturating_sub(1));
            l.text.push_str(&delta);
            if let Some(at) = find_stop(&l.text, from, &p.stop) {
                l.text.truncate(at);
                stop = true;
            }
        }
        if p.logprobs.is_some() {
            l.pending.logprobs.push(TokenLogprob {
                token: picked.token,
                logprob: picked.logprob,
                top: picked.top,
            });
        }
        runner.sampled.push(Some(SampledToken {
            token: picked.token,
            stop,
        }));
    }
    Ok(runner)
}

/// The engine's [`StepSink`]: records the scheduler's events on the live requests and, when
/// the engine records a run, hands them and the step's record to the run's collector.
pub(super) struct OutputSink<'a> {
    pub live: &'a mut HashMap<RequestId, Live>,
    /// Requests that gained a token or finished, in event order (may repeat).
    pub touched: Vec<RequestId>,
    pub collector: Option<&'a mut Collector>,
    /// Requests a prefill instance handed off in this step.
    pub handed_off: &'a mut Vec<RequestId>,
}

impl StepSink for OutputSink<'_> {
    fn on_event(&mut self, event: RequestEvent, now: Timestamp) {
        match event {
            RequestEvent::Token { id, token, .. } => {
                if let Some(c) = self.collector.as_mut() {
                    c.on_token(id, now);
                }
                let l = self.live.get_mut(&id).expect("token for a live request");
                l.pending.tokens.push(token);
                match l.last_token {
                    None => l.pending.ttft = Some(now.since(l.arrival)),
                    Some(t) => l.pending.itl = Some(now.since(t)),
                }
                l.last_token = Some(now);
                self.touched.push(id);
            }
            RequestEvent::Finished(rec) => {
                if let Some(c) = self.collector.as_mut() {
                    c.on_finished(&rec);
                }
                let l = self
                    .live
                    .get_mut(&rec.id)
                    .expect("finish of a live request");
                l.pending.finish = Some(rec.reason);
                self.touched.push(rec.id);
                l.pending.record = Some(rec);
            }
            // A prefill instance: the first token (already in the request's tokens) reaches the
            // client from the decode instance, with the KV.
            RequestEvent::HandedOff { id, .. } => self.handed_off.push(id),
        }
    }

    fn on_step(&mut self, _: StepTicket, r: &StepRecord) {
        if let Some(c) = self.collector.as_mut() {
            c.on_batch(BatchRecord {
                replica: 0,
                step: r.step.0,
                start: r.start,
                end: r.end,
                busy: r.end.since(r.start),
                num_requests: r.num_requests,
                prefill_tokens: r.prefill_tokens,
                decode_tokens: r.decode_tokens,
                preempted: r.preempted,
                kv_blocks_used: r.kv_blocks_used,
                flops: 0.0,
                bytes: 0.0,
            });
        }
    }
}

/// Hands out what the touched requests gained: tokens, the text that became final (all of
/// it once a request finished), and their records; finished requests leave `live`.
pub(super) fn take_outputs(
    live: &mut HashMap<RequestId, Live>,
    touched: Vec<RequestId>,
) -> Vec<RequestOutput> {
    let mut outputs = Vec::with_capacity(touched.len());
    for id in touched {
        let Some(l) = live.get_mut(&id) else {
            continue; // already handed out (a token and a finish in the same step)
        };
        let finished = l.pending.finish.is_some();
        let mut upto = if finished {
            l.text.len()
        } else {
            let hold = max_stop_len(l.sampler.params()).saturating_sub(1);
            l.text.len().saturating_sub(hold).max(l.emitted)
        };
        while !l.text.is_char_boundary(upto) {
            upto -= 1;
        }
        let mut o = std::mem::replace(
            &mut l.pending,
            RequestOutput::empty(id, l.prompt_len as u32),
        );
        o.text = l.text[l.emitted..upto].to_owned();
        o.output_tokens = (l.tokens.len() - l.prompt_len) as u32;
        l.emitted = upto;
        if finished {
            live.remove(&id);
        }
        outputs.push(o);
    }
    outputs
}

/// An output with nothing in it yet.
fn max_stop_len(p: &SamplingParams) -> usize {
    p.stop.iter().map(String::len).max().unwrap_or(0)
}

/// The earliest start at or after `from` (clamped to a char boundary) of any stop string.
fn find_stop(text: &str, mut from: usize, stops: &[String]) -> Option<usize> {
    while !text.is_char_boundary(from) {
        from -= 1;
    }
    stops
        .iter()
        .filter_map(|s| text[from..].find(s.as_str()).map(|i| from + i))
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_search_starts_at_a_char_boundary_and_takes_the_earliest() {
        let t = "héllo world, bye";
        assert_eq!(find_stop(t, 2, &["bye".into(), "o w".into()]), Some(5));
        assert_eq!(find_stop(t, 0, &["zzz".into()]), None);
    }
}
