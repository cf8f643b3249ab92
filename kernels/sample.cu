// Sampling on the device, so that a step copies one id per request back instead of a
// vocabulary of floats:
// - argmax_rows: the greedy token of each logits row (first maximum wins, as argmax does);
// - sample_rows: temperature, top-k, top-p and min-p, then a seeded Gumbel-max draw
//   (crates/vajra-engine/src/sampler/gumbel.rs is its reference, step for step).
// Penalties and log-probabilities stay with the host sampler, over copied rows.

extern "C" __global__ void argmax_rows(const float* logits, int vocab, int* out) {
    __shared__ float best_v[1024];
    __shared__ int best_i[1024];
    const float* row = logits + (size_t)blockIdx.x * vocab;
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float v = row[i];
        if (v > bv) { bv = v; bi = i; }
    }
    best_v[threadIdx.x] = bv;
    best_i[threadIdx.x] = bi;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) {
            float ov = best_v[threadIdx.x + stride];
            int oi = best_i[threadIdx.x + stride];
            if (ov > best_v[threadIdx.x] || (ov == best_v[threadIdx.x] && oi < best_i[threadIdx.x])) {
                best_v[threadIdx.x] = ov;
                best_i[threadIdx.x] = oi;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = best_i[0] == 0x7fffffff ? 0 : best_i[0];
}

// Philox4x32-10 (Salmon et al., SC 2011), its first output word, for counter (c0, c1, c2, c3)
// and key (k0, k1): gumbel.rs's `philox(..)[0]`.
__device__ __forceinline__ unsigned philox_first(unsigned c0, unsigned c1, unsigned c2,
                                                 unsigned c3, unsigned k0, unsigned k1) {
#pragma unroll
    for (int r = 0; r < 10; ++r) {
        unsigned hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
        unsigned hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    return c0;
}

// A key with the order of the floats (gumbel.rs's `order_key`).
__device__ __forceinline__ unsigned order_key(float f) {
    unsigned u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The warp's largest (value, index), ties to the lower index; every lane ends with it.
__device__ __forceinline__ void warp_argmax(float& v, int& i) {
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, v, o);
        int oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (ov > v || (ov == v && oi < i)) {
            v = ov;
            i = oi;
        }
    }
}

// Kept mass Σ e^((l_i − mx) / t) over the row's logits whose key is at least `from`.
__device__ __forceinline__ float kept_mass(const float* row, int vocab, unsigned from, float mx,
                                           float t, float* scratch) {
    float m = 0.0f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float l = row[i];
        if (order_key(l) >= from) m += expf((l - mx) / t);
    }
    return block_sum(m, scratch);
}

// One token per row. grid = rows, block = 1024 threads; params holds 8 words per row:
// temperature, top_k, top_p, min_p (f32 bits but top_k), seed (low, high), counter (low, high).
// With temperature t > 0 the kept tokens are those whose key reaches three floors, each built
// bit by bit from the top (32 passes over the row each): top-k's (the k-th largest key), top-p's
// (the largest key whose kept mass within top-k's set still reaches top_p × that set's mass)
// and min-p's (l ≥ mx + t·ln(min_p)); the token is the kept one with the largest
// (l − mx) / t − ln(−ln u), u from Philox at counter (index, counter) with the seed as key.
// t = 0 takes the first largest logit.
extern "C" __global__ void sample_rows(const float* __restrict__ logits, int vocab,
                                       const unsigned* __restrict__ params,
                                       int* __restrict__ out) {
    __shared__ float scratch[32];
    __shared__ float warp_g[32];
    __shared__ int warp_i[32];
    const float* row = logits + (size_t)blockIdx.x * vocab;
    const unsigned* p = params + 8 * (size_t)blockIdx.x;
    float t = __uint_as_float(p[0]), top_p = __uint_as_float(p[2]),
          min_p = __uint_as_float(p[3]);
    unsigned top_k = p[1];
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) mx = fmaxf(mx, row[i]);
    mx = block_max(mx, scratch);
    unsigned floor_key = 0u;
    if (t > 0.0f) {
        if (top_k > 0u && top_k < (unsigned)vocab) {
            unsigned k = 0u;
            for (int bit = 31; bit >= 0; --bit) {
                unsigned cand = k | (1u << bit);
                float n = 0.0f;
                for (int i = threadIdx.x; i < vocab; i += blockDim.x)
                    n += order_key(row[i]) >= cand ? 1.0f : 0.0f;
                if (block_sum(n, scratch) >= (float)top_k) k = cand;
            }
            floor_key = k;
        }
        if (top_p < 1.0f) {
            float target = top_p * kept_mass(row, vocab, floor_key, mx, t, scratch);
            unsigned k = 0u;
            for (int bit = 31; bit >= 0; --bit) {
                unsigned cand = k | (1u << bit);
                if (kept_mass(row, vocab, max(cand, floor_key), mx, t, scratch) >= target) k = cand;
            }
            floor_key = max(floor_key, k);
        }
        // No fused multiply-add: the reference rounds the product and the sum apart.
        if (min_p > 0.0f) floor_key = max(floor_key, order_key(__fadd_rn(mx, __fmul_rn(t, logf(min_p)))));
        floor_key = min(floor_key, order_key(mx));
    }
    float bg = -INFINITY;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float l = row[i], g = l;
        if (t > 0.0f) {
            if (order_key(l) < floor_key) continue;
            unsigned x = philox_first((unsigned)i, p[6], p[7], 0u, p[4], p[5]);
            float u = ((float)(x >> 9) + 0.5f) * (1.0f / 8388608.0f);
            g = (l - mx) / t - logf(-logf(u));
        }
        if (g > bg) {
            bg = g;
            bi = i;
        }
    }
    // The block's largest, ties to the lower index (each thread's is already its first).
    warp_argmax(bg, bi);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        warp_g[warp] = bg;
        warp_i[warp] = bi;
    }
    __syncthreads();
    if (warp != 0) return;
    int warps = blockDim.x >> 5;
    bg = lane < warps ? warp_g[lane] : -INFINITY;
    bi = lane < warps ? warp_i[lane] : 0x7fffffff;
    warp_argmax(bg, bi);
    if (lane == 0) out[blockIdx.x] = bi == 0x7fffffff ? 0 : bi;
}
