//! The roofline model: an operator takes `max(FLOPs / (peak·e_c), bytes / (bandwidth·e_m))`
//! plus a fixed launch cost, where the compute efficiency grows with the problem size,
//! `e_c(m) = E_C·m/(m + M_HALF)` for a GEMM with `m` rows, and memory efficiency is a constant
//! per operator kind.
//!
//! The constants were set once against Vidur's measured H100 `mlp.csv` for Llama-2-7B at TP 1
//! and are not refitted per model or device; `vajra-sim profile error` reports how well the
//! resulting curves match every measured file (README: "Predictor error").

use vajra_core::config::ModelConfig;
use vajra_experiment::catalog::DeviceSpec;

/// Peak fraction large GEMMs reach.
const E_C: f64 = 0.78;
/// GEMM rows at which half of `E_C` is reached.
const M_HALF: f64 = 48.0;
/// Bandwidth fraction of weight-streaming GEMMs.
const E_M_GEMM: f64 = 0.82;
/// Launch and tail cost of a kernel (s).
const LAUNCH: f64 = 4e-6;
/// Peak fraction of FlashAttention-style prefill kernels.
const E_ATTN: f64 = 0.55;
/// Bandwidth fraction of paged decode attention.
const E_M_DECODE: f64 = 0.65;

/// Memory efficiency of each elementwise operator (measured kernels are far from peak).
fn elementwise_eff(op: &str) -> f64 {
    match op {
        "emb" => 0.18,
        "input_layernorm" | "post_attention_layernorm" => 0.32,
        "attn_rope" => 0.35,
        "mlp_act" => 0.6,
        "add" => 0.9,
        _ => 0.5,
    }
}

/// The operators of Vidur's `mlp.csv`, in its column order (the schema is vajra-core's).
pub use vajra_core::config::MLP_OPS;

/// One GEMM of `m × k` by `k × n` (bf16 in and out), seconds.
pub fn gemm(dev: &DeviceSpec, m: f64, k: f64, n: f64, dtype: f64) -> f64 {
    let flops = 2.0 * m * k * n;
    let bytes = dtype * (m * k + k * n + m * n);
    let e_c = E_C * m / (m + M_HALF);
    (flops / (dev.peak_flops * e_c)).max(bytes / (dev.mem_bandwidth * E_M_GEMM)) + LAUNCH
}

/// An elementwise kernel moving `bytes`, seconds.
pub fn elementwise(dev: &DeviceSpec, op: &str, bytes: f64) -> f64 {
    bytes / (dev.mem_bandwidth * elementwise_eff(op)) + LAUNCH * 0.5
}

/// Time of one `mlp.csv` operator for `t` tokens at tensor-parallel width `tp`, seconds per
/// layer (`emb` is once per forward pass).
pub fn op_time(m: &ModelConfig, dev: &DeviceSpec, tp: u32, op: &str, t: f64) -> f64 {
    let d = f64::from(m.dtype_bytes);
    let tpf = f64::from(tp);
    let h = f64::from(m.hidden_size);
    let q = f64::from(m.q_width());
    let kv = f64::from(m.kv_width());
    let i = f64::from(m.intermediate_size);
    match op {
        "attn_pre_proj" => gemm(dev, t, h, (q + 2.0 * kv) / tpf, d),
        "attn_post_proj" => gemm(dev, t, q / tpf, h, d),
        "mlp_up_proj" => gemm(dev, t, h, 2.0 * i / tpf, d),
        "mlp_down_proj" => gemm(dev, t, i / tpf, h, d),
        // Read gate and up, write the product.
        "mlp_act" => elementwise(dev, op, 3.0 * t * i / tpf * d),
        // Read q and k, write them back.
        "attn_rope" => elementwise(dev, op, 2.0 * t * (q + kv) / tpf * d),
        // Read x, write x (norm); read two, write one (add); gather rows (emb).
        "input_layernorm" | "post_attention_layernorm" | "emb" => {
            elementwise(dev, op, 2.0 * t * h * d)
        }
        "add" => elementwise(dev, op, 3.0 * t * h * d),
        _ => 0.0,
    }
}

/// The LM head for `s` sampled tokens, seconds (last stage only).
pub fn lm_head(m: &ModelConfig, dev: &DeviceSpec, tp: u32, s: f64) -> f64 {
    if s <= 0.0 {
        return 0.0;
    }
    gemm(
        dev,
        s,
        f64::from(m.hidden_size),
        f64::from(m.vocab_size) / f64::from(tp),
        f64::from(m.dtype_bytes),
    )
}

/// Causal attention FLOPs of a chunk of `c` new tokens over `k` cached ones, all heads of one
/// device: QKᵀ and PV, 2 FLOPs per multiply-add, each new token attending to `k` + its
/// position in the chunk.
pub fn prefill_flops(m: &ModelConfig, tp: u32, c: f64, k: f64) -> f64 {
    4.0 * c * (k + (c + 1.0) / 2.0) * f64::from(m.num_heads * m.head_dim) / f64::from(tp)
}

/// K and V bytes of one token in one layer on one device.
pub fn kv_bytes_per_token_layer(m: &ModelConfig, tp: u32) -> f64 {
    2.0 * f64::from(m.num_kv_heads * m.head_dim) / f64::from(tp) * f64::from(m.dtype_bytes)
}

/// Prefill attention of one layer, seconds: one kernel over every prefill chunk of the batch,
/// with their summed FLOPs and bytes and `tokens` new tokens in all.
pub fn attn_prefill(dev: &DeviceSpec, flops: f64, bytes: f64, tokens: f64) -> f64 {
    let e = E_ATTN * tokens / (tokens + 128.0);
    (flops / (dev.peak_flops * e)).max(bytes / (dev.mem_bandwidth * E_M_DECODE)) + LAUNCH
}

/// Decode attention of one layer over `kv_tokens` cached tokens in total for `batch`
/// requests, seconds.
pub fn attn_decode(m: &ModelConfig, dev: &DeviceSpec, tp: u32, batch: f64, kv_tokens: f64) -> f64 {
    let bytes = kv_tokens * kv_bytes_per_token_layer(m, tp)
        + 2.0 * batch * f64::from(m.num_heads * m.head_dim) / f64::from(tp)
            * f64::from(m.dtype_bytes);
    bytes / (dev.mem_bandwidth * E_M_DECODE) + 2.0 * LAUNCH
}

/// Writing `t` tokens' K and V into paged blocks, one layer, seconds.
pub fn kv_save(m: &ModelConfig, dev: &DeviceSpec, tp: u32, t: f64) -> f64 {
    if t <= 0.0 {
        return 0.0;
    }
    elementwise(dev, "kv_save", 2.0 * t * kv_bytes_per_token_layer(m, tp))
}

/// A ring all-reduce of `bytes` over `tp` devices, seconds.
pub fn all_reduce(dev: &DeviceSpec, tp: u32, bytes: f64) -> f64 {
    if tp <= 1 {
        return 0.0;
    }
    let n = f64::from(tp);
    2.0 * (n - 1.0) / n * bytes / (dev.link_bandwidth * 0.7) + 12e-6
}

/// Sending `bytes` to the next pipeline stage, seconds.
pub fn send_recv(dev: &DeviceSpec, bytes: f64) -> f64 {
    bytes / (dev.link_bandwidth * 0.7) + 10e-6
}

#[cfg(test)]
mod tests {
    use super::*;
    use vajra_experiment::catalog::{device, model};

    #[test]
    fn large_gemms_are_compute_bound_and_small_ones_bandwidth_bound() {
        let h100 = device("h100").unwrap();
        let m = model("Llama-2-7b-hf").unwrap();
        // Vidur measured 0.987 ms (4096 tokens) and 0.064 ms (1 token) for the gate+up GEMM.
        let big = op_time(&m, &h100, 1, "mlp_up_proj", 4096.0) * 1e3;
        let small = op_time(&m, &h100, 1, "mlp_up_proj", 1.0) * 1e3;
        assert!((0.85..1.15).contains(&big), "{big}");
        assert!((0.055..0.075).contains(&small), "{small}");
    }
}
