//! Dense f32 kernels of the CPU backend: `y = x · Wᵀ` with weights stored as Hugging Face does
//! (`[out_features, in_features]`, row-major), RMSNorm, SiLU-and-multiply.
//!
//! Cost model: a step with few rows (decode) is bound by reading the weights once, so it runs
//! as dot products over weight rows, split across rayon workers by output feature (each weight
//! row is read once for all input rows). Many rows (prefill) go to `matrixmultiply`'s packed
//! SGEMM, split across workers by input rows when every worker gets enough of them, else by
//! output feature.

use rayon::prelude::*;

/// Rows at or below which a product runs as weight-row dot products.
const GEMV_MAX_ROWS: usize = 16;
/// Output features per rayon task in the dot-product path.
const FEATURES_PER_TASK: usize = 64;
/// Fewest input rows per rayon task when the SGEMM path splits by rows (each task packs the
/// whole weight matrix); below that it splits by output feature. On SmolLM2's shapes on two
/// cores the feature split was 15-35 % faster up to 128 rows, even at 192 and 256, and 3-10 %
/// slower at 512 (2026-11-27), so the two paths meet where their costs do.
const MIN_ROWS_PER_TASK: usize = 128;

/// `out[m × n] = x[m × k] · w[n × k]ᵀ`.
///
/// # Panics
/// If a slice length does not match the dimensions.
pub fn matmul_t(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32]) {
    assert_eq!(x.len(), m * k, "matmul_t: x is m × k");
    assert_eq!(w.len(), n * k, "matmul_t: w is n × k");
    assert_eq!(out.len(), m * n, "matmul_t: out is m × n");
    if m == 0 || n == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    if m <= GEMV_MAX_ROWS {
        by_features(w, k, FEATURES_PER_TASK, m, n, out, |wb, o| {
            gemv_block(x, m, k, wb, o);
        });
    } else if m >= threads * MIN_ROWS_PER_TASK {
        let rows = m.div_ceil(threads);
        out.par_chunks_mut(rows * n)
            .zip(x.par_chunks(rows * k))
            .for_each(|(o, xb)| sgemm_t(xb, xb.len() / k, k, w, n, o));
    } else {
        // Too few rows to give every worker a large share: split the output features instead
        // (by rows, 17 to 127 rows on two workers were one task and one core idled).
        let per = n.div_ceil(threads).next_multiple_of(FEATURES_PER_TASK);
        by_features(w, k, per, m, n, out, |wb, o| {
            sgemm_t(x, m, k, wb, wb.len() / k, o);
        });
    }
}

/// Runs `f(weight rows, out block)` on blocks of `per` output features in parallel, each into
/// its own `m × block` buffer, and gathers the blocks into the columns of `out`.
fn by_features(
    w: &[f32],
    k: usize,
    per: usize,
    m: usize,
    n: usize,
    out: &mut [f32],
    f: impl Fn(&[f32], &mut [f32]) + Sync,
) {
    let blocks: Vec<Vec<f32>> = w
        .par_chunks(per * k)
        .map(|wb| {
            let mut o = vec![0.0; m * (wb.len() / k)];
            f(wb, &mut o);
            o
        })
        .collect();
    for (b, o) in blocks.iter().enumerate() {
        let n0 = b * per;
        let nb = o.len() / m;
        for i in 0..m {
            out[i * n + n0..i * n + n0 + nb].copy_from_slice(&o[i * nb..(i + 1) * nb]);
        }
    }
}

/// `o[i · nb + j] = x_i · wb_j` for a block of weight rows: each weight row is read once for
/// all input rows. Compiled twice, for AVX2+FMA (chosen at run time) and for the baseline.
fn gemv_block(x: &[f32], m: usize, k: usize, wb: &[f32], o: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        #[allow(unsafe_code)]
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        unsafe {
            return gemv_block_avx2(x, m, k, wb, o);
        }
    }
    gemv_block_portable(x, m, k, wb, o);
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2,fma")]
unsafe fn gemv_block_avx2(x: &[f32], m: usize, k: usize, wb: &[f32], o: &mut [f32]) {
    gemv_block_portable(x, m, k, wb, o);
}

#[inline(always)]
fn gemv_block_portable(x: &[f32], m: usize, k: usize, wb: &[f32], o: &mut [f32]) {
    let nb = wb.len() / k;
    for (j, wr) in wb.chunks_exact(k).enumerate() {
        for i in 0..m {
            o[i * nb + j] = dot(&x[i * k..(i + 1) * k], wr);
        }
    }
}

/// One SGEMM call, `o = x · wᵀ`, through `matrixmultiply` with strides that read `w` transposed.
#[allow(unsafe_code)]
fn sgemm_t(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, o: &mut [f32]) {
    assert!(x.len() >= m * k && w.len() >= n * k && o.len() >= m * n);
    // SAFETY: the assertion above shows every element addressed by the given dimensions and
    // strides lies inside its slice; `o` is exclusively borrowed and does not alias `x` or `w`.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            x.as_ptr(),
            k as isize,
            1,
            w.as_ptr(),
            1,
            k as isize,
            0.0,
            o.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

/// Dot product with sixteen independent accumulators (two 8-wide vectors under AVX2; a fixed
/// summation order, so results are reproducible run to run).
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    const W: usize = 16;
    let mut acc = [0.0f32; W];
    let ca = a.chunks_exact(W);
    let cb = b.chunks_exact(W);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..W {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = 0.0;
    for v in acc {
        s += v;
    }
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// RMSNorm of each `h`-wide row of `x` into `out`: `x / sqrt(mean(x²) + eps) · weight`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let h = weight.len();
    for (xr, or) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / h as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, v), w) in or.iter_mut().zip(xr).zip(weight) {
            *o = v * inv * w;
        }
    }
}

/// SiLU-and-multiply over rows laid out as `[gate (i) | up (i)]`: `out = silu(gate) · up`.
pub fn silu_mul(gate_up: &[f32], i: usize, out: &mut [f32]) {
    for (gu, o) in gate_up.chunks_exact(2 * i).zip(out.chunks_exact_mut(i)) {
        let (g, u) = gu.split_at(i);
        for ((o, g), u) in o.iter_mut().zip(g).zip(u) {
            *o = g / (1.0 + (-g).exp()) * u;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut o = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                o[i * n + j] = (0..k).map(|l| x[i * k + l] * w[j * k + l]).sum();
            }
        }
        o
    }

    #[test]
    fn every_product_path_matches_a_naive_product() {
        let (k, n) = (37, 131);
        for m in [1, 3, 16, 17, 70, 300] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0)
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) / 7.0)
                .collect();
            let mut o = vec![0.0; m * n];
            matmul_t(&x, m, k, &w, n, &mut o);
            for (a, b) in o.iter().zip(naive(&x, m, k, &w, n)) {
                assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "m={m}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn rms_norm_scales_rows_to_unit_rms() {
        let x = [3.0f32, 4.0, 0.0, 0.0];
        let mut o = [0.0; 4];
        rms_norm(&x, &[1.0, 2.0], 0.0, &mut o);
        let r = (12.5f32).sqrt();
        assert!((o[0] - 3.0 / r).abs() < 1e-6 && (o[1] - 8.0 / r).abs() < 1e-6);
    }
}
