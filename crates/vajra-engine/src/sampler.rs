//! Choosing the next token from a row of logits, as vLLM's sampler does:
//! penalties (repetition over prompt and output; frequency and presence over the output), then
//! temperature, then top-k, top-p and min-p truncation, then a draw from the request's own
//! seeded random stream. Temperature 0 is greedy (the first maximum wins, as `argmax` does).
//! Log-probabilities are those of the model's raw distribution (vLLM's default).
//!
//! A backend that samples on the device ([`crate::backend::Backend::samples_on_device`]) draws
//! the tokens of requests without penalties or log-probabilities by [`gumbel`]'s algorithm
//! instead, from [`RequestSampler::device_draw`]'s parameters.

use rand::{Rng, SeedableRng, rngs::StdRng};
use vajra_core::sampling::SamplingParams;

pub mod gumbel;
pub use gumbel::DeviceDraw;

/// The chosen token and, if asked for, log-probabilities.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    /// The token.
    pub token: u32,
    /// Its log-probability under the raw distribution (0 unless the request asked for
    /// log-probabilities).
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities (`logprobs` of them), best first.
    pub top: Vec<(u32, f32)>,
}

/// A request's sampling state: its parameters, random stream and output-token counts.
#[derive(Debug, Clone)]
pub struct RequestSampler {
    params: SamplingParams,
    /// The seed of `rng` (device draws use it too).
    seed: u64,
    /// Output tokens so far (the counter of the next device draw).
    produced: u64,
    rng: StdRng,
    /// Occurrences of each token in the output so far (sparse).
    counts: std::collections::HashMap<u32, u32>,
    /// Tokens of the prompt (for the repetition penalty).
    prompt_set: std::collections::HashSet<u32>,
}

impl RequestSampler {
    /// A sampler for one request; `fallback_seed` seeds it when the request sets no seed.
    pub fn new(params: SamplingParams, prompt: &[u32], fallback_seed: u64) -> Self {
        let seed = params.seed.unwrap_or(fallback_seed);
        let prompt_set = if params.repetition_penalty != 1.0 {
            prompt.iter().copied().collect()
        } else {
            Default::default()
        };
        RequestSampler {
            params,
            seed,
            produced: 0,
            rng: StdRng::seed_from_u64(seed),
            counts: Default::default(),
            prompt_set,
        }
    }

    /// The request's parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Whether the token is the plain argmax of the raw logits (greedy, no penalties, no
    /// log-probabilities), so a backend may pick it on the device.
    pub fn plain_greedy(&self) -> bool {
        self.params.is_greedy() && self.plain()
    }

    /// Whether the request sets no penalties and no log-probabilities (which only the host
    /// sampler applies).
    fn plain(&self) -> bool {
        let p = &self.params;
        p.logprobs.is_none()
            && p.repetition_penalty == 1.0
            && p.frequency_penalty == 0.0
            && p.presence_penalty == 0.0
    }

    /// Records an output token (penalties count it from now on).
    pub fn observe(&mut self, token: u32) {
        *self.counts.entry(token).or_default() += 1;
        self.produced += 1;
    }

    /// Continues, on another instance, a request whose earlier output tokens `tokens` another
    /// sampler of the same parameters and seed produced (disaggregated decode): the tokens are
    /// observed and the host random stream is advanced past their draws (one per token unless
    /// greedy), so the next draw is the one the first sampler would have made (device draws
    /// are keyed by the output counter, which `observe` advances).
    pub fn resume(&mut self, tokens: &[u32]) {
        for &t in tokens {
            if !self.params.is_greedy() {
                let _: f64 = self.rng.random();
            }
            self.observe(t);
        }
    }

    /// The request's next token as a backend draws it on the device ([`gumbel`]), or `None`
    /// if the request sets penalties or log-probabilities, which only the host sampler applies.
    pub fn device_draw(&self) -> Option<DeviceDraw> {
        let p = &self.params;
        self.plain().then(|| DeviceDraw {
            temperature: if p.is_greedy() { 0.0 } else { p.temperature },
            top_k: p.top_k.max(0) as u32,
            top_p: p.top_p,
            min_p: p.min_p,
            seed: self.seed,
            counter: self.produced,
        })
    }

    /// Picks the next token from `logits` (which it may modify).
    pub fn sample(&mut self, logits: &mut [f32]) -> Sampled {
        let p = &self.params;
        let top = match p.logprobs {
            Some(n) if n > 0 => top_logprobs(logits, n as usize),
            _ => Vec::new(),
        };
        // The raw distribution is kept only when the request reports log-probabilities (a copy
        // of the vocabulary's logits per token otherwise wasted).
        let raw = p
            .logprobs
            .is_some()
            .then(|| (log_sum_exp(logits), logits.to_vec()));
        self.apply_penalties(logits);
        let token = if p.is_greedy() {
            argmax(logits)
        } else {
            let probs = self.truncated_probs(logits);
            draw(&probs, self.rng.random::<f64>())
        };
        Sampled {
            token,
            logprob: raw.map_or(0.0, |(lse, raw)| raw[token as usize] - lse),
            top,
        }
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let r = p.repetition_penalty;
            let seen = self.prompt_set.iter().chain(self.counts.keys());
            for &t in seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / r } else { *l * r };
                }
            }
        }
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            for (&t, &n) in &self.counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.frequency_penalty * n as f32 + p.presence_penalty;
                }
            }
        }
    }

    /// Probabilities after temperature, top-k, top-p and min-p, as (token, probability) pairs
    /// that sum to 1.
    fn truncated_probs(&self, logits: &[f32]) -> Vec<(u32, f64)> {
        let p = &self.params;
        let mut probs = scaled_probs(logits, p.temperature);
        // Truncation orders tokens by descending probability, ties by token id (so the order is
        // reproducible), but only as far as it needs: the top k by selection, the nucleus by
        // growing chunks (a full sort of the vocabulary cost 3.3 ms a token at 49k tokens).
        if p.top_k > 0 {
            let k = p.top_k as usize;
            if k < probs.len() {
                probs.select_nth_unstable_by(k - 1, best_first);
                probs.truncate(k);
            }
            probs.sort_by(best_first);
        }
        if p.top_p < 1.0 {
            let total: f64 = probs.iter().map(|x| x.1).sum();
            let keep = nucleus(&mut probs, total, f64::from(p.top_p));
            probs.truncate(keep);
        }
        if p.min_p > 0.0 {
            let top = probs.iter().map(|x| x.1).fold(0.0, f64::max);
            probs.retain(|x| x.1 >= f64::from(p.min_p) * top);
        }
        let total: f64 = probs.iter().map(|x| x.1).sum();
        probs.iter_mut().for_each(|x| x.1 /= total);
        probs
    }
}

/// Each token's unnormalised probability at `temperature`, `e^((l − max) / T)`, in token order.
fn scaled_probs(logits: &[f32], temperature: f32) -> Vec<(u32, f64)> {
    let t = f64::from(temperature);
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((f64::from(l) - f64::from(max)) / t).exp()))
        .collect()
}

/// Descending probability, ties by token id.
fn best_first(a: &(u32, f64), b: &(u32, f64)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Orders `probs` best first just far enough to find the nucleus, the fewest best tokens whose
/// share of `total` reaches `top_p`, and returns their count (all, if it is never reached; then
/// all are ordered). Each chunk is the best of what is left, selected then sorted, so the
/// ordered prefix is exactly a full sort's.
fn nucleus(probs: &mut [(u32, f64)], total: f64, top_p: f64) -> usize {
    let mut acc = 0.0;
    let (mut done, mut chunk) = (0, 64);
    while done < probs.len() {
        let rest = &mut probs[done..];
        let m = chunk.min(rest.len());
        if m < rest.len() {
            rest.select_nth_unstable_by(m - 1, best_first);
        }
        rest[..m].sort_by(best_first);
        for (i, x) in rest[..m].iter().enumerate() {
            acc += x.1 / total;
            if acc >= top_p {
                return done + i + 1;
            }
        }
        done += m;
        chunk *= 4;
    }
    probs.len()
}

/// The first index of the largest value.
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

fn log_sum_exp(v: &[f32]) -> f32 {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let s: f64 = v.iter().map(|&x| f64::from(x - max).exp()).sum();
    max + s.ln() as f32
}

fn top_logprobs(v: &[f32], n: usize) -> Vec<(u32, f32)> {
    let lse = log_sum_exp(v);
    let mut idx: Vec<u32> = (0..v.len() as u32).collect();
    let n = n.min(v.len());
    idx.select_nth_unstable_by(n.saturating_sub(1), |&a, &b| {
        v[b as usize].total_cmp(&v[a as usize]).then(a.cmp(&b))
    });
    idx.truncate(n);
    idx.sort_by(|&a, &b| v[b as usize].total_cmp(&v[a as usize]).then(a.cmp(&b)));
    idx.into_iter().map(|i| (i, v[i as usize] - lse)).collect()
}

fn draw(probs: &[(u32, f64)], u: f64) -> u32 {
    let mut acc = 0.0;
    for &(t, p) in probs {
        acc += p;
        if u < acc {
            return t;
        }
    }
    probs.last().map_or(0, |x| x.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams::default();
        f(&mut p);
        p
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = RequestSampler::new(SamplingParams::greedy(4), &[], 0);
        assert_eq!(s.sample(&mut [0.0, 3.0, 3.0, 1.0]).token, 1);
    }

    #[test]
    fn same_seed_gives_the_same_tokens_and_another_seed_differs() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = RequestSampler::new(params(|p| p.seed = Some(seed)), &[], 0);
            (0..40)
                .map(|_| s.sample(&mut logits.clone()).token)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let logits = vec![0.1, 2.0, 1.9, -1.0];
        for p in [params(|p| p.top_k = 1), params(|p| p.top_p = 0.01)] {
            let mut s = RequestSampler::new(p, &[], 3);
            for _ in 0..20 {
                assert_eq!(s.sample(&mut logits.clone()).token, 1);
            }
        }
    }

    #[test]
    fn top_k_two_draws_only_the_two_best() {
        let logits = vec![0.0, 1.0, 1.1, 0.9];
        let mut s = RequestSampler::new(params(|p| p.top_k = 2), &[], 3);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            seen.insert(s.sample(&mut logits.clone()).token);
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![1, 2]);
    }

    /// The partial ordering keeps exactly what a full sort of the vocabulary kept: the same
    /// tokens in the same order, with probabilities equal up to the rounding of the top-p total
    /// (summed in token order now, in probability order before).
    #[test]
    fn truncation_keeps_what_a_full_sort_keeps() {
        fn full_sort(logits: &[f32], p: &SamplingParams) -> Vec<(u32, f64)> {
            let mut probs = scaled_probs(logits, p.temperature);
            probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            if p.top_k > 0 {
                probs.truncate(p.top_k as usize);
            }
            let total: f64 = probs.iter().map(|x| x.1).sum();
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|x| {
                    acc += x.1 / total;
                    acc >= f64::from(p.top_p)
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            let total: f64 = probs.iter().map(|x| x.1).sum();
            probs.iter_mut().for_each(|x| x.1 /= total);
            probs
        }
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for case in 0..60 {
            let vocab = [50usize, 700, 5000][case % 3];
            // Flat, peaked and tied rows (every third value repeats).
            let spread = [0.5f32, 3.0, 12.0][(case / 3) % 3];
            let logits: Vec<f32> = (0..vocab)
                .map(|i| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let v = (x >> 40) as f32 / (1u64 << 24) as f32;
                    if i % 3 == 2 { 1.0 } else { v * spread }
                })
                .collect();
            let p = params(|p| {
                p.temperature = [0.5, 1.0, 1.7][case % 3];
                p.top_k = [0, 1, 7, 300][(case / 2) % 4];
                p.top_p = [0.3, 0.9, 0.999, 1.0][(case / 5) % 4];
            });
            if p.top_k == 0 && p.top_p == 1.0 {
                continue;
            }
            let s = RequestSampler::new(p.clone(), &[], 1);
            let got = s.truncated_probs(&logits);
            let want = full_sort(&logits, &p);
            let ids = |v: &[(u32, f64)]| v.iter().map(|x| x.0).collect::<Vec<_>>();
            assert_eq!(ids(&got), ids(&want), "case {case}: {p:?}");
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g.1 - w.1).abs() <= 1e-12,
                    "case {case}: {} vs {}",
                    g.1,
                    w.1
                );
            }
        }
    }

    #[test]
    fn min_p_drops_tokens_below_a_fraction_of_the_best() {
        // p ∝ e^0 : e^-3 : e^-0.1 → token 1 is below 0.1 × best and never drawn.
        let logits = vec![0.0, -3.0, -0.1];
        let mut s = RequestSampler::new(params(|p| p.min_p = 0.1), &[], 9);
        for _ in 0..300 {
            assert_ne!(s.sample(&mut logits.clone()).token, 1);
        }
    }

    #[test]
    fn penalties_push_repeated_tokens_down() {
        let mut s = RequestSampler::new(
            params(|p| {
                p.temperature = 0.0;
                p.frequency_penalty = 2.0;
            }),
            &[],
            0,
        );
        s.observe(0);
        assert_eq!(s.sample(&mut [1.0, 0.0]).token, 1);
        let mut r = RequestSampler::new(
            params(|p| {
                p.temperature = 0.0;
                p.repetition_penalty = 3.0;
            }),
            &[0],
            0,
        );
        assert_eq!(r.sample(&mut [1.0, 0.5]).token, 1);
    }

    #[test]
    fn logprobs_are_raw_log_softmax_best_first() {
        let mut s = RequestSampler::new(
            params(|p| {
                p.temperature = 0.0;
                p.logprobs = Some(2);
            }),
            &[],
            0,
        );
        let out = s.sample(&mut [0.0, 2.0, 1.0]);
        let lse = (1.0f32 + 2f32.exp() + 1f32.exp()).ln();
        assert_eq!(out.top.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!((out.logprob - (2.0 - lse)).abs() < 1e-6);
        assert!((out.top[1].1 - (1.0 - lse)).abs() < 1e-6);
    }
}
