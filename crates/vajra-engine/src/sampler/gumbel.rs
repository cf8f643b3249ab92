//! The device sampler's algorithm, in Rust. A backend that draws tokens on the device
//! ([`crate::backend::Backend::samples_on_device`], the CUDA backend's `sample_rows` kernel in
//! `kernels/sample.cu`) follows it step for step; this is the reference that kernel is tested
//! against and what [`crate::backend::Backend::execute_sampled`] runs by default.
//!
//! Per row of logits `l`, with temperature `T > 0`:
//! 1. `mx` is the row's largest logit; `s_i = (l_i − mx) / T`.
//! 2. Truncation is a floor on an order-preserving 32-bit key of each logit ([`order_key`]):
//!    - top-k: the k-th largest key, built bit by bit (the largest `K` with at least `k` keys
//!      `≥ K`);
//!    - top-p: the largest key whose kept mass `Σ_{key_i ≥ K} e^{s_i}` (within top-k's set)
//!      still reaches `top_p` × the mass top-k left, built the same way;
//!    - min-p: `l_i ≥ mx + T · ln(min_p)`, i.e. `p_i ≥ min_p · p_max`.
//!
//!    The kernel builds the same two keys a hexadecimal digit per pass over the row (8 passes
//!    instead of 32): both weights only grow as the candidate key falls, so the largest key
//!    that holds is the same whichever way it is searched for.
//!
//!    A token is kept when its key reaches all three floors; the best token always is.
//! 3. Gumbel-max: the kept token with the largest `s_i − ln(−ln u_i)`, where `u_i` is uniform
//!    in (0, 1) from Philox4x32-10 keyed by the request's seed at counter (i, token index). That
//!    is a draw from `softmax(s)` over the kept tokens, and it depends only on the request's
//!    seed and how many tokens it has produced, never on the rest of the batch.
//!
//! `T = 0` takes the first largest logit.
//!
//! Against the host sampler ([`super::RequestSampler`]): the same distribution, but other
//! random numbers (so other tokens for the same seed), and tokens tied at a top-k or top-p
//! boundary are all kept where the host keeps the lower ids. Penalties and log-probabilities
//! are the host sampler's alone: a request that sets them is never drawn here.

/// How one row's token is drawn (one per sampled request of a step).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeviceDraw {
    /// Softmax temperature; 0 takes the first largest logit.
    pub temperature: f32,
    /// Keep the `top_k` largest logits; 0 keeps all.
    pub top_k: u32,
    /// Keep the smallest mass of best tokens that reaches `top_p` (1 keeps all).
    pub top_p: f32,
    /// Drop tokens below `min_p` × the best token's probability (0 keeps all).
    pub min_p: f32,
    /// The request's seed.
    pub seed: u64,
    /// Which of the request's output tokens this is (0 for the first).
    pub counter: u64,
}

impl DeviceDraw {
    /// The eight 32-bit words `sample_rows` reads per row: temperature, top-k, top-p, min-p
    /// (f32 bits), seed (low, high), counter (low, high).
    pub fn words(&self) -> [u32; 8] {
        [
            self.temperature.to_bits(),
            self.top_k,
            self.top_p.to_bits(),
            self.min_p.to_bits(),
            self.seed as u32,
            (self.seed >> 32) as u32,
            self.counter as u32,
            (self.counter >> 32) as u32,
        ]
    }
}

/// Philox4x32-10 (Salmon et al., SC 2011): ten rounds over a 128-bit counter with a 64-bit key.
pub fn philox(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    const M0: u64 = 0xD251_1F53;
    const M1: u64 = 0xCD9E_8D57;
    let (mut c, mut k) = (counter, key);
    for _ in 0..10 {
        let p0 = M0 * u64::from(c[0]);
        let p1 = M1 * u64::from(c[2]);
        c = [
            (p1 >> 32) as u32 ^ c[1] ^ k[0],
            p1 as u32,
            (p0 >> 32) as u32 ^ c[3] ^ k[1],
            p0 as u32,
        ];
        k = [
            k[0].wrapping_add(0x9E37_79B9),
            k[1].wrapping_add(0xBB67_AE85),
        ];
    }
    c
}

/// The uniform number in (0, 1), never 0 or 1, of vocabulary entry `index` for a request's
/// `counter`-th token: 23 bits of Philox's first word, centred in their interval.
pub fn uniform(seed: u64, counter: u64, index: u32) -> f32 {
    let x = philox(
        [index, counter as u32, (counter >> 32) as u32, 0],
        [seed as u32, (seed >> 32) as u32],
    )[0];
    ((x >> 9) as f32 + 0.5) * (1.0 / 8_388_608.0)
}

/// A key with the order of the floats: `a < b` ⇔ `order_key(a) < order_key(b)` (for non-NaN
/// values; −0 sorts just below +0).
pub fn order_key(f: f32) -> u32 {
    let u = f.to_bits();
    if u & 0x8000_0000 != 0 {
        !u
    } else {
        u | 0x8000_0000
    }
}

/// The largest key `K` for which `holds(K)` (true at 0, and false from some key on), built
/// from the top bit down as the kernel does.
fn largest_key(mut holds: impl FnMut(u32) -> bool) -> u32 {
    let mut k = 0u32;
    for bit in (0..32).rev() {
        let cand = k | (1 << bit);
        if holds(cand) {
            k = cand;
        }
    }
    k
}

/// The token drawn from `row` by `d`.
pub fn draw(row: &[f32], d: &DeviceDraw) -> u32 {
    let t = d.temperature;
    if t <= 0.0 || row.is_empty() {
        return super::argmax(row);
    }
    let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let keys: Vec<u32> = row.iter().map(|&l| order_key(l)).collect();
    let mut floor = 0u32;
    if d.top_k > 0 && (d.top_k as usize) < row.len() {
        let k = d.top_k as usize;
        floor = largest_key(|cand| keys.iter().filter(|&&x| x >= cand).count() >= k);
    }
    if d.top_p < 1.0 {
        let e: Vec<f32> = row.iter().map(|&l| ((l - mx) / t).exp()).collect();
        let mass = |from: u32| -> f32 {
            keys.iter()
                .zip(&e)
                .filter(|&(&x, _)| x >= from)
                .map(|(_, &v)| v)
                .sum()
        };
        let target = d.top_p * mass(floor);
        let k_floor = floor;
        floor = floor.max(largest_key(|cand| mass(cand.max(k_floor)) >= target));
    }
    if d.min_p > 0.0 {
        floor = floor.max(order_key(mx + t * d.min_p.ln()));
    }
    let floor = floor.min(order_key(mx));
    let mut best = (f32::NEG_INFINITY, 0u32);
    for (i, (&l, &key)) in row.iter().zip(&keys).enumerate() {
        if key < floor {
            continue;
        }
        let u = uniform(d.seed, d.counter, i as u32);
        let g = (l - mx) / t - (-u.ln()).ln();
        if g > best.0 {
            best = (g, i as u32);
        }
    }
    best.1
}

/// The rows a device sampler is checked on against [`draw`] (the GPU test on `sample_rows`, and
/// the same kernel run on the host): `vocab` logits uniform in ±`spread`/2 for spreads 1, 4
/// and 12, under every combination of temperature (0, 0.7, 1, 1.5), top-k (off, 1, 5, 200),
/// top-p (1, 0.9, 0.3) and min-p (0, 0.05), with seeds and counters varying: 288 rows, row-major
/// logits and one draw each.
pub fn check_rows(vocab: usize) -> (Vec<f32>, Vec<DeviceDraw>) {
    let mut data = Vec::new();
    let mut draws = Vec::new();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32
    };
    let mut n = 0u64;
    for &spread in &[1.0f32, 4.0, 12.0] {
        for &temperature in &[0.0f32, 0.7, 1.0, 1.5] {
            for &top_k in &[0u32, 1, 5, 200] {
                for &top_p in &[1.0f32, 0.9, 0.3] {
                    for &min_p in &[0.0f32, 0.05] {
                        data.extend((0..vocab).map(|_| (next() - 0.5) * spread));
                        draws.push(DeviceDraw {
                            temperature,
                            top_k,
                            top_p,
                            min_p,
                            seed: 1000 + n % 7,
                            counter: n,
                        });
                        n += 1;
                    }
                }
            }
        }
    }
    (data, draws)
}

/// Holds a device's tokens `got` for [`check_rows`]' rows (`data`, `vocab` wide) to [`draw`]'s:
/// temperature 0 must be the argmax every time, and at most 1 % of the other rows may differ
/// (only where float sums or `expf`/`logf` part in the last bit at a truncation boundary).
///
/// # Errors
/// What differed, when that is more than allowed.
pub fn check_tokens(
    data: &[f32],
    vocab: usize,
    draws: &[DeviceDraw],
    got: &[u32],
) -> Result<usize, String> {
    if got.len() != draws.len() || data.len() != draws.len() * vocab {
        return Err(format!(
            "{} tokens for {} draws over {} logits of a {vocab}-token vocabulary",
            got.len(),
            draws.len(),
            data.len()
        ));
    }
    let mut differ = 0;
    for (r, (d, &token)) in draws.iter().zip(got).enumerate() {
        let want = draw(&data[r * vocab..(r + 1) * vocab], d);
        if token == want {
            continue;
        }
        if d.temperature == 0.0 {
            return Err(format!(
                "row {r}: temperature 0 drew {token}, not the argmax {want}"
            ));
        }
        differ += 1;
    }
    if differ * 100 > draws.len() {
        return Err(format!(
            "{differ} of {} draws differ from the reference",
            draws.len()
        ));
    }
    Ok(differ)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(temperature: f32) -> DeviceDraw {
        DeviceDraw {
            temperature,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 42,
            counter: 0,
        }
    }

    /// How often each token is drawn over `n` consecutive counters.
    fn frequencies(row: &[f32], d: DeviceDraw, n: u64) -> Vec<f64> {
        let mut hits = vec![0u64; row.len()];
        for counter in 0..n {
            hits[draw(row, &DeviceDraw { counter, ..d }) as usize] += 1;
        }
        hits.iter().map(|&h| h as f64 / n as f64).collect()
    }

    /// Frequencies within 4.5 binomial standard deviations of `want` (20,000 draws: about
    /// ±1 point at p = 0.1).
    fn assert_frequencies(got: &[f64], want: &[f64], n: u64) {
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let sd = (w * (1.0 - w) / n as f64).sqrt();
            assert!(
                (g - w).abs() <= 4.5 * sd + 1e-12,
                "token {i}: drawn {g:.4}, want {w:.4} (sd {sd:.4}); all {got:?}"
            );
        }
    }

    #[test]
    fn philox_matches_random123_known_answers() {
        assert_eq!(
            philox([0; 4], [0; 2]),
            [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]
        );
        assert_eq!(
            philox([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]
        );
        assert_eq!(
            philox(
                [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
                [0xa409_3822, 0x299f_31d0]
            ),
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]
        );
    }

    #[test]
    fn uniforms_stay_strictly_inside_zero_one_and_are_spread() {
        let mut sum = 0.0f64;
        for i in 0..100_000u32 {
            let u = uniform(7, 3, i);
            assert!(u > 0.0 && u < 1.0, "u = {u}");
            sum += f64::from(u);
        }
        assert!((sum / 100_000.0 - 0.5).abs() < 0.005, "mean {}", sum / 1e5);
        // The extremes of the 23-bit grid are still inside.
        let lo = 0.5f32 * (1.0 / 8_388_608.0);
        let hi = (8_388_607.0f32 + 0.5) * (1.0 / 8_388_608.0);
        assert!(lo > 0.0 && hi < 1.0);
    }

    #[test]
    fn order_keys_sort_as_the_floats_do() {
        let v = [
            f32::NEG_INFINITY,
            -3.5,
            -1e-30,
            0.0,
            1e-30,
            2.0,
            1e30,
            f32::INFINITY,
        ];
        for w in v.windows(2) {
            assert!(order_key(w[0]) < order_key(w[1]), "{} vs {}", w[0], w[1]);
        }
    }

    #[test]
    fn temperature_zero_takes_the_first_largest_logit() {
        assert_eq!(draw(&[0.1, 3.0, 3.0, -1.0], &plain(0.0)), 1);
    }

    #[test]
    fn the_same_seed_and_counter_draw_the_same_token_and_the_stream_moves_on() {
        let row: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let d = plain(1.0);
        assert_eq!(draw(&row, &d), draw(&row, &d));
        let tokens: std::collections::HashSet<u32> = (0..40)
            .map(|counter| draw(&row, &DeviceDraw { counter, ..d }))
            .collect();
        assert!(tokens.len() > 10, "40 draws hit only {tokens:?}");
        let other_seed: Vec<u32> = (0..40)
            .map(|counter| {
                draw(
                    &row,
                    &DeviceDraw {
                        counter,
                        seed: 43,
                        ..d
                    },
                )
            })
            .collect();
        let same_seed: Vec<u32> = (0..40)
            .map(|counter| draw(&row, &DeviceDraw { counter, ..d }))
            .collect();
        assert_ne!(other_seed, same_seed);
    }

    #[test]
    fn draws_follow_the_softmax_at_temperature_one_and_a_half() {
        // Probabilities 0.1, 0.2, 0.3, 0.4 at T = 1.
        let row: Vec<f32> = [1.0f32, 2.0, 3.0, 4.0].iter().map(|p| p.ln()).collect();
        let n = 20_000;
        assert_frequencies(&frequencies(&row, plain(1.0), n), &[0.1, 0.2, 0.3, 0.4], n);
        // T = 0.5 squares them: 1, 4, 9, 16 over 30.
        let want: Vec<f64> = [1.0, 4.0, 9.0, 16.0].iter().map(|x| x / 30.0).collect();
        assert_frequencies(&frequencies(&row, plain(0.5), n), &want, n);
    }

    #[test]
    fn top_k_top_p_and_min_p_keep_the_best_tokens_and_renormalise() {
        // Probabilities 0.5, 0.3, 0.15, 0.05.
        let row: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let n = 20_000;
        let top_k = DeviceDraw {
            top_k: 2,
            ..plain(1.0)
        };
        assert_frequencies(&frequencies(&row, top_k, n), &[0.625, 0.375, 0.0, 0.0], n);
        // 0.5 < 0.75 ≤ 0.8: the nucleus is the two best.
        let top_p = DeviceDraw {
            top_p: 0.75,
            ..plain(1.0)
        };
        assert_frequencies(&frequencies(&row, top_p, n), &[0.625, 0.375, 0.0, 0.0], n);
        // min-p 0.25 drops what is below 0.125: the last token.
        let min_p = DeviceDraw {
            min_p: 0.25,
            ..plain(1.0)
        };
        let want = [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0];
        assert_frequencies(&frequencies(&row, min_p, n), &want, n);
        // Top-p within top-k: of the best three (0.5, 0.3, 0.15 of 0.95), 0.6 of their mass
        // is reached by the best two (0.5 / 0.95 = 0.53 < 0.6 ≤ 0.84).
        let both = DeviceDraw {
            top_k: 3,
            top_p: 0.6,
            ..plain(1.0)
        };
        assert_frequencies(&frequencies(&row, both, n), &[0.625, 0.375, 0.0, 0.0], n);
        // A tiny top-p keeps only the best token.
        let tiny = DeviceDraw {
            top_p: 0.01,
            ..plain(1.0)
        };
        assert!((0..50).all(|counter| draw(&row, &DeviceDraw { counter, ..tiny }) == 0));
    }

    #[test]
    fn the_words_carry_every_field() {
        let d = DeviceDraw {
            temperature: 0.7,
            top_k: 50,
            top_p: 0.9,
            min_p: 0.05,
            seed: 0x1234_5678_9abc_def0,
            counter: 0x1_0000_0002,
        };
        assert_eq!(
            d.words(),
            [
                0.7f32.to_bits(),
                50,
                0.9f32.to_bits(),
                0.05f32.to_bits(),
                0x9abc_def0,
                0x1234_5678,
                2,
                1
            ]
        );
    }
}
