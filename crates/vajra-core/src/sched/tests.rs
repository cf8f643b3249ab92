//! Behaviour tests of the scheduler and its policies, one per behaviour, on a small fixture
//! (blocks of 4 tokens, no watermark unless a test sets one).

use super::config::*;
use super::output::{ModelRunnerOutput, RequestEvent, SampledToken, SchedulerOutput};
use super::{Scheduler, check_invariants};
use crate::config::CacheConfig;
use crate::ids::RequestId;
use crate::request::{FinishReason, Prompt, Request, RequestStatus};
use crate::time::Timestamp;

struct Fx {
    s: Scheduler,
    now: Timestamp,
    next: u64,
}

struct Build {
    cfg: SchedulerConfig,
    cache: CacheConfig,
    blocks: u32,
    max_model_len: u32,
}

impl Build {
    fn blocks(mut self, n: u32) -> Self {
        self.blocks = n;
        self
    }
    fn seqs(mut self, n: u32) -> Self {
        self.cfg.max_num_seqs = n;
        self
    }
    fn queue(mut self, q: QueuePolicy) -> Self {
        self.cfg.queue = q;
        self
    }
    fn swap(mut self, host_blocks: u32) -> Self {
        self.cfg.preemption = PreemptionMode::Swap;
        self.cache.swap_blocks = host_blocks;
        self
    }
    fn watermark(mut self, w: f64) -> Self {
        self.cache.watermark = Some(w);
        self
    }
    fn no_prefix_caching(mut self) -> Self {
        self.cache.enable_prefix_caching = false;
        self
    }
    fn build(self) -> Fx {
        Fx {
            s: Scheduler::new(self.cfg, &self.cache, self.blocks, self.max_model_len).unwrap(),
            now: Timestamp::ZERO,
            next: 0,
        }
    }
}

fn fx(policy: PolicyConfig) -> Build {
    Build {
        cfg: SchedulerConfig::new(policy),
        cache: CacheConfig {
            block_size: 4,
            watermark: Some(0.0),
            ..Default::default()
        },
        blocks: 1000,
        max_model_len: 4096,
    }
}

fn v1(budget: u32) -> PolicyConfig {
    PolicyConfig::VllmV1(VllmV1Config {
        max_num_batched_tokens: budget,
        ..Default::default()
    })
}

fn sarathi(chunk: u32, admission: AdmissionMode) -> PolicyConfig {
    PolicyConfig::Sarathi(SarathiConfig {
        chunk_size: chunk,
        admission,
        chunk_schedule: None,
    })
}

impl Fx {
    fn add(&mut self, prompt: u32, out: u32) -> RequestId {
        self.add_with(Prompt::synthetic(prompt), out, |_| {})
    }

    fn add_with(&mut self, prompt: Prompt, out: u32, f: impl FnOnce(&mut Request)) -> RequestId {
        let id = RequestId(self.next);
        self.next += 1;
        let mut r = Request::new(id, prompt, out, self.now);
        f(&mut r);
        self.s.add_request(r, self.now).unwrap();
        id
    }

    /// Schedules only (the step stays in flight).
    fn sched(&mut self) -> SchedulerOutput {
        let out = self.s.schedule(self.now);
        check_invariants(&self.s);
        out
    }

    fn finish(&mut self, out: &SchedulerOutput) -> Vec<RequestEvent> {
        self.now = Timestamp(self.now.0 + 1_000_000);
        let ev = self
            .s
            .update_from_output(out, &ModelRunnerOutput::uniform(out, 1), self.now);
        check_invariants(&self.s);
        ev
    }

    fn step(&mut self) -> SchedulerOutput {
        let out = self.sched();
        self.finish(&out);
        out
    }

    fn run_to_end(&mut self, max_steps: usize) -> usize {
        let mut n = 0;
        while self.s.has_unfinished() {
            assert!(n < max_steps, "did not finish in {max_steps} steps");
            let out = self.step();
            assert!(!out.is_empty(), "stalled");
            n += 1;
        }
        n
    }
}

fn shares(out: &SchedulerOutput) -> Vec<(u64, u32)> {
    out.scheduled
        .iter()
        .map(|e| (e.id.0, e.num_tokens))
        .collect()
}

// ---------------------------------------------------------------- lifecycle and API

#[test]
fn a_scheduler_told_to_omit_request_data_schedules_the_same_shares_without_it() {
    let mut with = fx(v1(100)).build();
    let mut without = fx(v1(100)).build();
    without.s.omit_request_data();
    for f in [&mut with, &mut without] {
        f.add(10, 3);
    }
    let (a, b) = (with.sched(), without.sched());
    assert_eq!(shares(&a), shares(&b));
    assert_eq!(a.new_blocks(&a.scheduled[0]), b.new_blocks(&b.scheduled[0]));
    assert!(a.new_data(&a.scheduled[0]).is_some() && b.new_data(&b.scheduled[0]).is_none());
}

#[test]
fn a_request_runs_prefill_then_one_decode_per_step_and_finishes_by_length() {
    let mut f = fx(v1(100)).build();
    let id = f.add(10, 3);
    assert_eq!(f.s.status(id), Some(RequestStatus::Waiting));
    let out = f.sched();
    assert_eq!(shares(&out), vec![(0, 10)]);
    assert!(out.scheduled[0].samples && out.new_data(&out.scheduled[0]).is_some());
    assert_eq!(out.new_blocks(&out.scheduled[0]).len(), 3);
    let ev = f.finish(&out);
    assert!(matches!(ev[0], RequestEvent::Token { index: 0, .. }));
    assert_eq!(f.s.status(id), Some(RequestStatus::Running));
    let out = f.step();
    assert_eq!(shares(&out), vec![(0, 1)]);
    assert!(
        out.new_data(&out.scheduled[0]).is_none(),
        "full data only on the first step"
    );
    let out = f.sched();
    let ev = f.finish(&out);
    let RequestEvent::Finished(rec) = &ev[1] else {
        panic!("{ev:?}")
    };
    assert_eq!(
        (rec.reason, rec.output_tokens, rec.prompt_tokens),
        (FinishReason::Length, 3, 10)
    );
    assert!(rec.first_token.unwrap() <= rec.finished_at);
    assert_eq!(f.s.status(id), None);
    assert_eq!(f.s.kv().num_free(), 1000, "blocks are returned at finish");
    assert_eq!(
        f.sched().finished,
        vec![id],
        "the executor hears about the finish"
    );
}

#[test]
fn a_stop_token_id_finishes_the_request_with_reason_stop() {
    let mut f = fx(v1(100)).build();
    f.add_with(Prompt::synthetic(4), 10, |r| {
        r.sampling.stop_token_ids = vec![1]
    });
    f.step();
    assert_eq!(f.s.stats().num_finished, 1);
}

#[test]
fn an_executor_stop_finishes_the_request_with_reason_stop() {
    let mut f = fx(v1(100)).build();
    f.add(4, 10);
    let out = f.sched();
    let res = ModelRunnerOutput {
        sampled: vec![Some(SampledToken {
            token: 9,
            stop: true,
        })],
    };
    let ev = f.s.update_from_output(&out, &res, f.now);
    assert!(matches!(&ev[1], RequestEvent::Finished(r) if r.reason == FinishReason::Stop));
}

#[test]
fn abort_frees_the_blocks_of_a_running_request_and_its_late_result_is_ignored() {
    let mut f = fx(v1(100)).build();
    let id = f.add(10, 5);
    let out = f.sched();
    assert_eq!(f.s.kv().num_free(), 997);
    let rec = f.s.abort(id, f.now).unwrap();
    assert_eq!(rec.reason, FinishReason::Abort);
    assert_eq!(f.s.kv().num_free(), 1000);
    // A new request reuses the slot; the stale result must not touch it.
    let other = f.add(4, 5);
    assert!(f.finish(&out).is_empty());
    assert_eq!(f.s.num_computed_tokens(other), Some(0));
    assert!(f.s.abort(id, f.now).is_err(), "already gone");
}

#[test]
fn abort_removes_a_waiting_request_from_every_queue_order() {
    for q in [
        QueuePolicy::Fcfs,
        QueuePolicy::Sjf {
            aging_tokens_per_sec: 1.0,
        },
        QueuePolicy::Priority { aging_per_sec: 0.0 },
        QueuePolicy::Edf,
        QueuePolicy::Vtc {
            input_weight: 1.0,
            output_weight: 2.0,
        },
    ] {
        let mut f = fx(v1(100)).queue(q).build();
        let a = f.add(10, 2);
        let b = f.add(10, 2);
        f.s.abort(a, f.now).unwrap();
        assert_eq!(f.s.num_waiting(), 1);
        let out = f.sched();
        assert_eq!(out.scheduled[0].id, b, "{q:?}");
    }
}

#[test]
fn requests_too_long_for_the_model_or_the_cache_are_rejected() {
    let mut f = fx(v1(100)).blocks(10).build();
    let r = Request::new(RequestId(1), Prompt::synthetic(30), 20, Timestamp::ZERO);
    let err = f.s.add_request(r, f.now).unwrap_err().to_string();
    assert!(err.contains("capacity of 40 tokens"), "{err}");
    let r = Request::new(RequestId(2), Prompt::synthetic(4090), 20, Timestamp::ZERO);
    assert!(f.s.add_request(r, f.now).is_err());
    f.add(4, 1);
    let dup = Request::new(RequestId(0), Prompt::synthetic(4), 1, Timestamp::ZERO);
    assert!(f.s.add_request(dup, f.now).is_err());
}

#[test]
fn configs_that_could_never_schedule_a_valid_request_are_rejected() {
    let cache = CacheConfig::default();
    let v0 = SchedulerConfig::new(PolicyConfig::VllmV0(VllmV0Config {
        max_num_batched_tokens: 2048,
        padded_budget: false,
    }));
    let err = Scheduler::new(v0, &cache, 100, 4096)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("max_num_batched_tokens") && err.contains("4096"),
        "{err}"
    );
    let mut swap = SchedulerConfig::new(v1(64));
    swap.preemption = PreemptionMode::Swap;
    let err = Scheduler::new(swap, &cache, 100, 4096)
        .unwrap_err()
        .to_string();
    assert!(err.contains("cache.swap_blocks"), "{err}");
}

// ---------------------------------------------------------------- vllm_v1

#[test]
fn vllm_v1_schedules_running_requests_before_waiting_ones_under_the_budget() {
    let mut f = fx(v1(20)).build();
    f.add(15, 5);
    f.step();
    f.add(30, 5);
    let out = f.step();
    // One decode token for request 0, then 19 prompt tokens of request 1 (chunked).
    assert_eq!(shares(&out), vec![(0, 1), (1, 19)]);
    assert_eq!(out.num_batched_tokens, 20);
    let out = f.step();
    assert_eq!(shares(&out), vec![(0, 1), (1, 11)]);
}

#[test]
fn vllm_v1_caps_one_request_per_step_with_the_long_prefill_threshold() {
    let p = PolicyConfig::VllmV1(VllmV1Config {
        max_num_batched_tokens: 100,
        enable_chunked_prefill: true,
        long_prefill_token_threshold: 16,
        ..Default::default()
    });
    let mut f = fx(p).build();
    f.add(40, 1);
    f.add(40, 1);
    assert_eq!(shares(&f.step()), vec![(0, 16), (1, 16)]);
}

#[test]
fn vllm_v1_without_chunking_stops_admission_at_a_prompt_that_does_not_fit() {
    let p = PolicyConfig::VllmV1(VllmV1Config {
        max_num_batched_tokens: 4096,
        enable_chunked_prefill: false,
        long_prefill_token_threshold: 0,
        ..Default::default()
    });
    let mut f = fx(p).build();
    f.add(3000, 1);
    f.add(2000, 1);
    f.add(10, 1);
    // FCFS head-of-line blocking: the 2,000-token prompt does not fit the 1,096 left.
    assert_eq!(shares(&f.step()), vec![(0, 3000)]);
}

#[test]
fn vllm_v1_admits_a_prompt_only_when_all_of_it_fits_under_reserve_full_isl() {
    // 20 blocks of 4 tokens; a 24-token budget. Step 1 admits A (40 tokens, 10 blocks: fits)
    // with a 24-token chunk; step 2 finishes A's prompt (10 blocks held, 10 free) with 8
    // tokens of budget left. B's 48 tokens need 12 blocks: vLLM's full-prompt check refuses
    // it, where admitting by the chunk alone (2 blocks) would let it in.
    for (full, expected) in [(true, vec![(0, 16)]), (false, vec![(0, 16), (1, 8)])] {
        let p = PolicyConfig::VllmV1(VllmV1Config {
            max_num_batched_tokens: 24,
            reserve_full_isl: full,
            ..Default::default()
        });
        let mut f = fx(p).blocks(20).build();
        f.add(40, 4);
        f.add(48, 4);
        assert_eq!(shares(&f.step()), vec![(0, 24)]);
        assert_eq!(shares(&f.step()), expected, "reserve_full_isl = {full}");
    }
}

#[test]
fn async_scheduling_considers_a_request_from_the_step_after_next() {
    for (async_on, second) in [(true, vec![(0, 1)]), (false, vec![(0, 1), (1, 8)])] {
        let mut b = fx(v1(64));
        b.cfg.async_scheduling = async_on;
        let mut f = b.build();
        f.add(8, 4);
        // An idle replica takes a request at once, lag or not.
        let first = f.sched();
        assert_eq!(shares(&first), vec![(0, 8)]);
        // B arrives while that step runs: under async scheduling the next step was formed
        // already, so B waits one more.
        f.add(8, 4);
        assert_eq!(f.s.num_waiting(), 1, "a staged request counts as waiting");
        f.finish(&first);
        assert_eq!(shares(&f.step()), second, "async_scheduling = {async_on}");
        if async_on {
            assert_eq!(shares(&f.step()), vec![(0, 1), (1, 8)]);
        }
    }
    // Nothing else to run: a staged request goes at once.
    let mut b = fx(v1(64));
    b.cfg.async_scheduling = true;
    let mut f = b.build();
    f.add(8, 1);
    let first = f.sched();
    f.add(8, 1);
    f.finish(&first);
    assert_eq!(shares(&f.step()), vec![(1, 8)]);
}

#[test]
fn vllm_v1_admits_without_a_watermark_unless_the_cache_sets_one() {
    // 100 blocks of 4 tokens; A holds 50, B needs the other 50. vLLM v1 keeps nothing back;
    // an explicit 1 % watermark (vLLM v0's default, this project's for the other policies)
    // keeps one block, which refuses B while A runs.
    for (w, admitted) in [(None, true), (Some(0.01), false)] {
        let mut b = fx(v1(1000)).blocks(100);
        b.cache.watermark = w;
        let mut f = b.build();
        f.add(196, 8);
        f.step();
        f.add(200, 1);
        let ids: Vec<u64> = shares(&f.step()).iter().map(|s| s.0).collect();
        assert_eq!(ids.contains(&1), admitted, "watermark {w:?}");
    }
}

#[test]
fn vllm_v1_never_runs_more_than_max_num_seqs() {
    let mut f = fx(v1(1000)).seqs(2).build();
    for _ in 0..3 {
        f.add(4, 5);
    }
    assert_eq!(f.step().scheduled.len(), 2);
    assert_eq!(f.step().scheduled.len(), 2);
    assert_eq!(f.s.num_waiting(), 1);
}

#[test]
fn vllm_v1_preempts_the_newest_running_request_when_blocks_run_out() {
    // 4 blocks of 4 tokens. Two requests of 8 prompt tokens fill the pool.
    let mut f = fx(v1(100)).blocks(4).build();
    let a = f.add(8, 8);
    let b = f.add(8, 8);
    f.step();
    assert_eq!(f.s.kv().num_free(), 0);
    // Request a's first decode needs a new block (9th token): b, the newest, is preempted.
    let out = f.step();
    assert_eq!(out.preempted, vec![b]);
    assert_eq!(shares(&out), vec![(a.0, 1)]);
    assert_eq!(f.s.status(b), Some(RequestStatus::Waiting));
    assert_eq!(
        f.s.num_computed_tokens(b),
        Some(0),
        "recompute drops computed tokens"
    );
    assert_eq!(f.s.stats().num_preemptions, 1);
}

#[test]
fn vllm_v1_admits_nothing_in_a_step_that_preempted() {
    let mut f = fx(v1(100)).blocks(4).build();
    let a = f.add(8, 8);
    let b = f.add(8, 8);
    f.step();
    let c = f.add(1, 1);
    let out = f.step();
    // b is preempted to give a its third block; one block is then free and c would fit in it,
    // but nothing is admitted in a step that preempted.
    assert_eq!(out.preempted, vec![b]);
    assert_eq!(shares(&out), vec![(a.0, 1)]);
    assert_eq!(f.s.kv().num_free(), 1);
    assert_eq!(f.s.status(c), Some(RequestStatus::Waiting));
}

#[test]
fn vllm_v1_under_priority_preempts_the_lowest_priority_request() {
    let mut f = fx(v1(100))
        .blocks(6)
        .queue(QueuePolicy::Priority { aging_per_sec: 0.0 })
        .build();
    let low = f.add_with(Prompt::synthetic(8), 8, |r| r.priority = 5);
    let high = f.add_with(Prompt::synthetic(8), 8, |r| r.priority = 0);
    let mid = f.add_with(Prompt::synthetic(8), 8, |r| r.priority = 2);
    let out = f.step();
    assert_eq!(shares(&out), vec![(high.0, 8), (mid.0, 8), (low.0, 8)]);
    let out = f.step();
    assert_eq!(out.preempted, vec![low]);
    assert_eq!(f.s.status(low), Some(RequestStatus::Waiting));
}

#[test]
fn a_waiting_high_priority_request_preempts_a_running_lower_priority_one_for_blocks() {
    for (queue, preempts) in [
        (QueuePolicy::Priority { aging_per_sec: 0.0 }, true),
        (QueuePolicy::Fcfs, false),
    ] {
        let mut f = fx(v1(100)).blocks(4).queue(queue).build();
        let low = f.add_with(Prompt::synthetic(12), 4, |r| r.priority = 5);
        f.step(); // 12 tokens in 3 blocks
        f.step(); // 13th token takes the fourth block: the pool is full
        let high = f.add_with(Prompt::synthetic(8), 4, |r| r.priority = 0);
        let out = f.step();
        if preempts {
            assert_eq!(out.preempted, vec![low]);
            assert_eq!(
                shares(&out),
                vec![(high.0, 8)],
                "low lost its share this step"
            );
        } else {
            assert!(out.preempted.is_empty());
            assert_eq!(shares(&out), vec![(low.0, 1)]);
        }
    }
}

#[test]
fn a_request_preempted_after_it_was_scheduled_in_the_same_step_loses_its_share() {
    // Priority queue: the victim (larger priority value) is first in running order, so it is
    // already scheduled when the later request runs out of blocks.
    let mut f = fx(v1(100))
        .blocks(5)
        .queue(QueuePolicy::Priority { aging_per_sec: 0.0 })
        .build();
    let victim = f.add_with(Prompt::synthetic(8), 9, |r| r.priority = 1);
    f.step();
    let needy = f.add_with(Prompt::synthetic(7), 9, |r| r.priority = 0);
    f.step(); // victim takes its third block, needy its two: the pool is full
    f.step();
    // needy's ninth token needs a third block: the victim loses the share it was just given.
    let out = f.step();
    assert_eq!(out.preempted, vec![victim]);
    assert_eq!(shares(&out), vec![(needy.0, 1)]);
    assert_eq!(out.num_batched_tokens, 1);
}

#[test]
fn recomputed_requests_hit_their_own_cached_blocks_when_readmitted() {
    let mut f = fx(v1(100)).blocks(4).build();
    f.add(8, 4); // grows to 12 tokens: takes one of b's freed blocks, not both
    let b = f.add(8, 8);
    f.step();
    let out = f.step();
    assert_eq!(out.preempted, vec![b]);
    // Let a finish; b comes back and finds its prompt's first block still cached.
    f.run_to_end(50);
    assert!(f.s.kv().stats().prefix_hit_tokens >= 4);
}

#[test]
fn a_prefix_hit_schedules_only_the_uncached_tokens() {
    let mut f = fx(v1(100)).build();
    let prompt = Prompt::Tokens((0..13).collect());
    f.add_with(prompt.clone(), 1, |_| {});
    f.run_to_end(5);
    f.add_with(prompt, 1, |_| {});
    let out = f.step();
    // 12 of 13 tokens (three full blocks) are cached; one token is computed.
    assert_eq!(shares(&out), vec![(1, 1)]);
    assert_eq!(out.scheduled[0].num_computed, 12);
    let st = f.s.kv().stats();
    assert_eq!((st.prefix_queries, st.prefix_hit_tokens), (2, 12));
}

#[test]
fn prefix_caching_off_recomputes_everything() {
    let mut f = fx(v1(100)).no_prefix_caching().build();
    let prompt = Prompt::Tokens((0..13).collect());
    f.add_with(prompt.clone(), 1, |_| {});
    f.run_to_end(5);
    f.add_with(prompt, 1, |_| {});
    assert_eq!(shares(&f.step()), vec![(1, 13)]);
}

#[test]
fn the_watermark_holds_back_admission_only_while_others_run() {
    // 10 blocks, watermark 20% = 2 blocks.
    let mut f = fx(v1(1000)).blocks(10).watermark(0.2).build();
    f.add(36, 1); // 9 blocks: alone, admitted despite the watermark
    assert_eq!(f.step().scheduled.len(), 1);
    let mut g = fx(v1(1000)).blocks(10).watermark(0.2).build();
    g.add(4, 5);
    g.step();
    g.add(28, 1); // 7 blocks + 2 reserved > 9 free
    assert_eq!(shares(&g.step()), vec![(0, 1)]);
}

// ---------------------------------------------------------------- swap preemption

#[test]
fn swap_preemption_moves_kv_to_host_and_back_keeping_computed_tokens() {
    let mut f = fx(v1(100)).blocks(4).swap(8).build();
    let _a = f.add(8, 8);
    let b = f.add(8, 8);
    f.step();
    let out = f.step();
    assert_eq!(out.preempted, vec![b]);
    assert_eq!(out.swap_out.len(), 2, "b's 8 computed tokens fill 2 blocks");
    assert_eq!(f.s.status(b), Some(RequestStatus::Swapped));
    assert_eq!(f.s.num_computed_tokens(b), Some(8));
    assert_eq!(f.s.stats().num_swapped, 1);
    // Run until b comes back: its swap-in restores 3 blocks and it continues decoding.
    let mut swapped_in = false;
    while f.s.has_unfinished() {
        let out = f.step();
        if !out.swap_in.is_empty() {
            assert_eq!(out.swap_in.len(), 2);
            let e = out.scheduled.iter().find(|e| e.id == b).unwrap();
            assert_eq!((e.num_computed, e.num_tokens), (8, 1));
            swapped_in = true;
        }
    }
    assert!(swapped_in);
}

// ---------------------------------------------------------------- pipeline parallelism

#[test]
fn a_request_in_flight_is_not_scheduled_again_nor_preempted() {
    let mut f = fx(v1(100)).blocks(4).build();
    f.add(8, 8);
    let first = f.sched(); // in flight
    let second = f.sched();
    assert!(second.is_empty(), "its only known tokens are in flight");
    f.finish(&first);
    f.add(8, 8);
    let a = f.sched(); // request 0 decodes (3rd block), request 1 is admitted (2 blocks)... short
    // Whatever ran, nothing in flight may appear as preempted in a later step.
    let b = f.sched();
    for id in &b.preempted {
        assert!(
            !a.scheduled.iter().any(|e| e.id == *id),
            "preempted an in-flight request"
        );
    }
    f.finish(&a);
    f.finish(&b);
}

#[test]
fn a_long_prompt_pipelines_its_chunks_across_micro_batches() {
    let mut f = fx(v1(16)).build();
    f.add(40, 1);
    let a = f.sched();
    let b = f.sched();
    assert_eq!((shares(&a), shares(&b)), (vec![(0, 16)], vec![(0, 16)]));
    assert_eq!(b.scheduled[0].num_computed, 16);
    f.finish(&a);
    f.finish(&b);
}

// ---------------------------------------------------------------- sarathi

#[test]
fn sarathi_runs_decodes_then_partial_prefills_then_new_requests_in_one_chunk() {
    let mut f = fx(sarathi(16, AdmissionMode::Reserve)).build();
    f.add(4, 5);
    f.step(); // request 0 prefilled
    f.add(30, 5);
    f.step(); // decode 0 + 15 tokens of request 1
    f.add(10, 5);
    let out = f.step();
    // decode of 0, next 15 of 1's prompt: the chunk is full, request 2 waits.
    assert_eq!(shares(&out), vec![(0, 1), (1, 15)]);
    let out = f.step();
    assert_eq!(shares(&out), vec![(0, 1), (1, 1), (2, 10)]);
}

#[test]
fn sarathi_reserve_admission_takes_all_prompt_blocks_at_once() {
    let mut f = fx(sarathi(8, AdmissionMode::Reserve)).build();
    f.add(40, 1);
    let out = f.step();
    assert_eq!(shares(&out), vec![(0, 8)]);
    assert_eq!(out.new_blocks(&out.scheduled[0]).len(), 10);
    let out = f.step();
    assert!(out.new_blocks(&out.scheduled[0]).is_empty());
}

#[test]
fn sarathi_incremental_admission_takes_blocks_chunk_by_chunk() {
    let mut f = fx(sarathi(8, AdmissionMode::Incremental)).build();
    f.add(40, 1);
    for _ in 0..2 {
        let out = f.step();
        assert_eq!(out.new_blocks(&out.scheduled[0]).len(), 2);
    }
}

#[test]
fn sarathi_dynamic_chunks_shrink_as_the_prompt_progresses() {
    let p = PolicyConfig::Sarathi(SarathiConfig {
        chunk_size: 64,
        admission: AdmissionMode::Reserve,
        chunk_schedule: Some(ChunkSchedule {
            high: 64,
            low: 16,
            stages: 4,
            max_tokens: 256,
        }),
    });
    let mut f = fx(p).build();
    f.add(300, 1);
    let sizes: Vec<u32> = (0..6).map(|_| f.step().scheduled[0].num_tokens).collect();
    // Stages of 64 prompt tokens: 64, (stage 1 from 64) 48, 48, (stage 2 from 160) 32,
    // (stage 3 from 192) 16, 16.
    assert_eq!(sizes, vec![64, 48, 48, 32, 16, 16]);
}

// ---------------------------------------------------------------- vllm_v0

fn v0() -> PolicyConfig {
    PolicyConfig::VllmV0(VllmV0Config {
        max_num_batched_tokens: 4096,
        padded_budget: false,
    })
}

#[test]
fn vllm_v0_runs_prefill_only_steps_while_any_waiting_request_fits() {
    let mut f = fx(v0()).build();
    f.add(10, 5);
    f.step();
    f.add(20, 5);
    f.add(30, 5);
    // A prefill-only step of both new prompts; request 0 does not decode.
    assert_eq!(shares(&f.step()), vec![(1, 20), (2, 30)]);
    // Then decode-only.
    assert_eq!(shares(&f.step()), vec![(0, 1), (1, 1), (2, 1)]);
}

#[test]
fn vllm_v0_padded_budget_counts_batch_size_times_longest_prompt() {
    let p = PolicyConfig::VllmV0(VllmV0Config {
        max_num_batched_tokens: 4096,
        padded_budget: true,
    });
    let mut f = fx(p).build();
    f.add(2000, 1);
    f.add(100, 1);
    f.add(100, 1);
    // 2 × 2000 ≤ 4096 but 3 × 2000 > 4096.
    assert_eq!(shares(&f.step()), vec![(0, 2000), (1, 100)]);
}

// ---------------------------------------------------------------- orca and faster_transformer

#[test]
fn orca_reserves_prompt_plus_max_tokens_and_runs_without_a_budget() {
    let mut f = fx(PolicyConfig::Orca(OrcaConfig {})).blocks(10).build();
    f.add(12, 8); // 20 tokens: 5 blocks
    f.add(12, 8); // 5 blocks
    f.add(4, 4); // does not fit
    let out = f.step();
    assert_eq!(shares(&out), vec![(0, 12), (1, 12)]);
    assert_eq!(out.new_blocks(&out.scheduled[0]).len(), 5);
    assert_eq!(f.s.kv().num_free(), 0);
    f.run_to_end(20);
    assert_eq!(f.s.stats().num_preemptions, 0);
}

#[test]
fn faster_transformer_admits_a_new_batch_only_when_the_current_one_is_done() {
    let mut f = fx(PolicyConfig::FasterTransformer(FasterTransformerConfig {}))
        .seqs(2)
        .build();
    f.add(4, 1);
    f.add(4, 3);
    f.add(4, 1);
    assert_eq!(shares(&f.step()), vec![(0, 4), (1, 4)]);
    // Request 0 finished and freed its blocks; request 2 still waits for the batch.
    assert_eq!(shares(&f.step()), vec![(1, 1)]);
    assert_eq!(f.s.kv().num_free(), 1000 - 2);
    assert_eq!(shares(&f.step()), vec![(1, 1)]);
    assert_eq!(shares(&f.step()), vec![(2, 4)]);
}

// ---------------------------------------------------------------- lightllm

#[test]
fn lightllm_prefills_when_idle_or_after_max_waiting_iters() {
    let p = PolicyConfig::Lightllm(LightllmConfig {
        max_num_batched_tokens: 4096,
        max_waiting_iters: 2,
    });
    let mut f = fx(p).build();
    f.add(4, 10);
    assert_eq!(shares(&f.step()), vec![(0, 4)]);
    f.add(4, 10);
    assert_eq!(shares(&f.step()), vec![(0, 1)]);
    assert_eq!(shares(&f.step()), vec![(0, 1)]);
    assert_eq!(
        shares(&f.step()),
        vec![(1, 4)],
        "after two decode-only steps"
    );
}

#[test]
fn lightllm_refuses_a_request_whose_future_usage_would_overflow_the_cache() {
    let p = PolicyConfig::Lightllm(LightllmConfig {
        max_num_batched_tokens: 4096,
        max_waiting_iters: 0,
    });
    // 20 blocks = 80 tokens. Request 0 will grow to 8 + 60 = 68 tokens.
    let mut f = fx(p).blocks(20).build();
    f.add(8, 60);
    f.step();
    f.add(8, 40);
    // Both would run 40 more steps: 49 + 48 tokens > 80, though 17 blocks are free now.
    assert_eq!(shares(&f.step()), vec![(0, 1)]);
    assert_eq!(f.s.num_waiting(), 1);
}

// ---------------------------------------------------------------- every policy

#[test]
fn every_policy_finishes_a_mixed_workload_with_exact_output_lengths() {
    for policy in [
        v1(64),
        sarathi(32, AdmissionMode::Reserve),
        sarathi(32, AdmissionMode::Incremental),
        v0(),
        PolicyConfig::Orca(OrcaConfig {}),
        PolicyConfig::FasterTransformer(FasterTransformerConfig {}),
        PolicyConfig::Lightllm(LightllmConfig::default()),
    ] {
        let name = policy.name();
        let mut f = fx(policy).blocks(40).seqs(4).build();
        for i in 0..12 {
            f.add(5 + 7 * i, 1 + (i * 5) % 17);
        }
        f.run_to_end(2000);
        assert_eq!(f.s.stats().num_finished, 12, "{name}");
        assert_eq!(f.s.kv().num_free(), 40, "{name}");
    }
}

#[test]
fn reused_buffers_give_the_same_steps_and_events_as_fresh_ones() {
    let cfg = SchedulerConfig::new(v1(64));
    let mut a = Scheduler::new(cfg.clone(), &CacheConfig::default(), 64, 1024).unwrap();
    let mut b = Scheduler::new(cfg, &CacheConfig::default(), 64, 1024).unwrap();
    for i in 0..6 {
        let r = Request::new(
            RequestId(i),
            Prompt::synthetic(40 + 7 * i as u32),
            9,
            Timestamp::ZERO,
        );
        a.add_request(r.clone(), Timestamp::ZERO).unwrap();
        b.add_request(r, Timestamp::ZERO).unwrap();
    }
    let (mut res, mut events) = (ModelRunnerOutput::default(), Vec::new());
    for step in 0..40 {
        let now = Timestamp(step);
        let (oa, ob) = (a.schedule(now), b.schedule(now));
        assert_eq!(oa, ob, "step {step}");
        let ea = a.update_from_output(&oa, &ModelRunnerOutput::uniform(&oa, 5), now);
        res.fill_uniform(&ob, 5);
        events.clear();
        b.update_from_output_into(&ob, &res, now, &mut events);
        assert_eq!(ea, events, "step {step}");
        b.recycle(ob);
    }
    assert!(!a.has_unfinished() && !b.has_unfinished());
}

#[test]
fn late_requests_are_rejected_unserved_only_when_asked_and_only_if_never_scheduled() {
    for reject in [false, true] {
        let mut b = fx(v1(64)).seqs(1);
        if reject {
            b.cfg.late_requests = LatePolicy::Reject;
        }
        let mut f = b.build();
        let deadline =
            |ms: u64| move |r: &mut Request| r.ttft_deadline = Some(Timestamp(ms * 1_000_000));
        let a = f.add_with(Prompt::synthetic(8), 50, deadline(1));
        let late = f.add_with(Prompt::synthetic(8), 4, deadline(2));
        let later = f.add_with(Prompt::synthetic(8), 4, deadline(100));
        let none = f.add(8, 4);
        f.step(); // a runs (one sequence at a time); the others wait
        f.now = Timestamp(5_000_000); // past a's and `late`'s deadlines
        let mut ev = Vec::new();
        f.s.reject_late(f.now, &mut ev);
        check_invariants(&f.s);
        let gone: Vec<(RequestId, FinishReason)> = ev
            .iter()
            .map(|e| match e {
                RequestEvent::Finished(r) => (r.id, r.reason),
                RequestEvent::Token { .. } | RequestEvent::HandedOff { .. } => {
                    panic!("only finishes")
                }
            })
            .collect();
        if reject {
            // a was scheduled already: it is served; `late` never was: rejected.
            assert_eq!(gone, vec![(late, FinishReason::Rejected)]);
            assert_eq!(f.s.num_rejected(), 1);
            assert_eq!(f.s.status(late), None);
        } else {
            assert!(gone.is_empty());
        }
        for id in [a, later, none] {
            assert!(f.s.status(id).is_some(), "{id} is still live");
        }
        f.run_to_end(200);
    }
}

// ---------------------------------------------------------------- prefill/decode hand-off

fn role(mut f: Fx, r: crate::config::InstanceRole) -> Fx {
    f.s.set_role(r).unwrap();
    f
}

/// Runs a prefill instance until `id` is handed off; returns its first token.
fn prefill_until_handoff(p: &mut Fx, id: RequestId) -> u32 {
    for _ in 0..100 {
        let out = p.sched();
        for e in p.finish(&out) {
            match e {
                RequestEvent::HandedOff { id: h, token } if h == id => return token,
                RequestEvent::Token { id: t, .. } => assert_ne!(t, id, "no token is appended"),
                _ => {}
            }
        }
    }
    panic!("{id} was never handed off")
}

#[test]
fn a_prefill_instance_hands_a_request_off_after_its_first_token_holding_its_blocks() {
    use crate::config::InstanceRole;
    let mut p = role(fx(v1(8)).build(), InstanceRole::Prefill);
    let id = p.add(10, 5);
    let token = prefill_until_handoff(&mut p, id);
    assert_eq!(token, 1);
    assert_eq!(p.s.status(id), Some(RequestStatus::Transferring));
    assert_eq!(p.s.num_running(), 0);
    assert_eq!(
        p.s.kv().num_free(),
        1000 - 3,
        "its 3 prompt blocks stay held"
    );
    assert!(
        p.sched().is_empty(),
        "a handed-off request is not scheduled"
    );
    let h = p.s.take_handoff(id).unwrap();
    assert_eq!((h.first_token, h.request.max_tokens()), (1, 5));
    assert!(h.first_scheduled <= h.prefill_done);
    p.s.release_handoff(id).unwrap();
    check_invariants(&p.s);
    assert_eq!(p.s.kv().num_free(), 1000);
    assert!(!p.s.has_unfinished());
    assert_eq!(p.sched().finished, vec![id], "the executor drops its state");
    assert_eq!(p.s.stats().num_handed_off, 1);
    assert!(p.s.release_handoff(id).is_err(), "released once");
}

#[test]
fn a_decode_instance_reserves_the_prompt_then_decodes_the_rest_after_the_kv_arrives() {
    use crate::config::InstanceRole;
    let mut p = role(fx(v1(100)).build(), InstanceRole::Prefill);
    let mut d = role(fx(v1(100)).build(), InstanceRole::Decode);
    let id = p.add(10, 4);
    prefill_until_handoff(&mut p, id);
    let h = p.s.take_handoff(id).unwrap();
    assert_eq!(d.s.reserve_remote(&h, d.now).unwrap(), Some(10));
    check_invariants(&d.s);
    assert_eq!(d.s.status(id), Some(RequestStatus::Transferring));
    assert_eq!(d.s.kv().num_free(), 1000 - 3);
    assert!(d.sched().is_empty(), "nothing runs before the KV arrives");
    d.now = Timestamp(d.now.0 + 7_000_000);
    assert_eq!(d.s.remote_kv_arrived(id, d.now).unwrap(), 1);
    check_invariants(&d.s);
    p.s.release_handoff(id).unwrap();
    let out = d.sched();
    assert_eq!(
        shares(&out),
        vec![(id.0, 1)],
        "the first token's decode, no prefill"
    );
    assert_eq!(out.scheduled[0].prefill_tokens(), 0);
    assert_eq!(out.scheduled[0].num_computed, 10);
    d.finish(&out);
    let mut rec = None;
    while d.s.has_unfinished() {
        let out = d.sched();
        for e in d.finish(&out) {
            if let RequestEvent::Finished(r) = e {
                rec = Some(*r);
            }
        }
    }
    let rec = rec.expect("finished");
    assert_eq!((rec.output_tokens, rec.reason), (4, FinishReason::Length));
    assert_eq!(
        rec.first_token,
        Some(Timestamp(7_000_000)),
        "first token with the KV"
    );
    let t = rec.disagg.expect("hand-off times");
    assert_eq!(t.kv_arrived, Timestamp(7_000_000));
    assert_eq!(t.decode_scheduled, Some(Timestamp(7_000_000)));
    assert!(t.prefill_done < t.kv_arrived);
    assert_eq!(d.s.kv().num_free(), 1000);
    assert_eq!(d.s.stats().num_received, 1);
}

#[test]
fn a_full_decode_instance_reserves_nothing_and_a_prefix_it_caches_is_not_transferred() {
    use crate::config::InstanceRole;
    let mut p = role(fx(v1(100)).build(), InstanceRole::Prefill);
    let mut d = role(fx(v1(100)).blocks(4).build(), InstanceRole::Decode);
    let tokens: Vec<u32> = (0..9).collect();
    let a = p.add_with(Prompt::Tokens(tokens.clone()), 3, |_| {});
    prefill_until_handoff(&mut p, a);
    let ha = p.s.take_handoff(a).unwrap();
    assert_eq!(d.s.reserve_remote(&ha, d.now).unwrap(), Some(9));
    let mut longer = tokens.clone();
    longer.extend([50, 51, 52, 53]);
    let b = p.add_with(Prompt::Tokens(longer), 2, |_| {});
    prefill_until_handoff(&mut p, b);
    let hb = p.s.take_handoff(b).unwrap();
    assert_eq!(
        d.s.reserve_remote(&hb, d.now).unwrap(),
        None,
        "4 blocks hold a's 3 and not b's 4"
    );
    check_invariants(&d.s);
    assert_eq!(d.s.status(b), None, "nothing held for b");
    assert_eq!(
        p.s.status(b),
        Some(RequestStatus::Transferring),
        "b waits on the prefill side"
    );
    d.s.remote_kv_arrived(a, d.now).unwrap();
    d.run_to_end(20);
    // a's two full prompt blocks are cached on the decode side now: b needs 5 tokens sent.
    assert_eq!(d.s.reserve_remote(&hb, d.now).unwrap(), Some(13 - 8));
    check_invariants(&d.s);
    assert_eq!(
        d.s.reserve_remote(&hb, d.now).unwrap_err().to_string(),
        crate::error::CoreError::DuplicateRequest(b).to_string()
    );
}

#[test]
fn a_handed_off_request_can_be_aborted_on_either_side_without_leaking_blocks() {
    use crate::config::InstanceRole;
    let mut p = role(fx(v1(100)).build(), InstanceRole::Prefill);
    let mut d = role(fx(v1(100)).build(), InstanceRole::Decode);
    let id = p.add(10, 4);
    prefill_until_handoff(&mut p, id);
    let h = p.s.take_handoff(id).unwrap();
    d.s.reserve_remote(&h, d.now).unwrap().unwrap();
    p.s.abort(id, p.now).unwrap();
    d.s.abort(id, d.now).unwrap();
    check_invariants(&p.s);
    check_invariants(&d.s);
    assert_eq!((p.s.kv().num_free(), d.s.kv().num_free()), (1000, 1000));
}

#[test]
fn a_prefill_instance_finishes_a_one_token_request_itself_and_a_role_is_set_before_requests() {
    use crate::config::InstanceRole;
    let mut p = role(fx(v1(100)).build(), InstanceRole::Prefill);
    p.add(10, 1);
    let out = p.sched();
    let ev = p.finish(&out);
    assert!(matches!(ev[1], RequestEvent::Finished(_)), "{ev:?}");
    p.add(4, 4);
    assert!(p.s.set_role(InstanceRole::Colocated).is_err());
}
