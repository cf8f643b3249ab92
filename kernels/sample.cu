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

// sample_rows' block size, at most: each thread tallies in its own column of a 16 × 512 table
// (32 KiB of shared memory). cuda.rs launches it with SAMPLE_THREADS.
#define SAMPLE_THREADS 512

// One pass of a floor search, a hexadecimal digit at a time: `k` holds the digits of the key
// above bit `shift + 4` found so far (its lower bits 0); returns the largest digit d (0–15)
// whose candidate k | d << shift still holds, i.e. the row's weight on keys ≥ max(candidate, lo)
// is at least `want`. A logit l weighs 1 (counting, for top-k) or, with `mass`, e^((l − mx)/t)
// (top-p). Each thread tallies its keys in its own column of `tally` (row 0: keys above k's
// digits; row d: keys with k's digits and digit d at `shift`), which then holds suffix sums,
// summed over threads in a fixed order: the result repeats exactly, and it is the key the
// bit-by-bit search of gumbel.rs builds (the weight only grows as the candidate falls).
__device__ __forceinline__ unsigned floor_digit(const float* row, int vocab, unsigned k, int shift,
                                                unsigned lo, bool mass, float mx, float t,
                                                float want, float (*tally)[SAMPLE_THREADS],
                                                float* totals) {
    const unsigned me = threadIdx.x;
    for (int d = 0; d < 16; ++d) tally[d][me] = 0.0f;
    const unsigned long long prefix = (unsigned long long)k >> (shift + 4);
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float l = row[i];
        unsigned x = order_key(l);
        unsigned long long hx = (unsigned long long)x >> (shift + 4);
        if (x < lo || hx < prefix) continue;
        unsigned d = hx > prefix ? 0u : (x >> shift) & 15u;
        if (hx == prefix && d == 0u) continue;  // below every candidate
        tally[d][me] += mass ? expf((l - mx) / t) : 1.0f;
    }
    // Row d (≥ 1) becomes the thread's weight on keys ≥ k | d << shift.
    float s = tally[0][me];
    for (int d = 15; d >= 1; --d) {
        s += tally[d][me];
        tally[d][me] = s;
    }
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int d = 1 + warp; d < 16; d += warps) {
        float v = 0.0f;
        for (int j = lane; j < (int)blockDim.x; j += 32) v += tally[d][j];
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) totals[d] = v;
    }
    __syncthreads();
    for (int d = 15; d >= 1; --d)
        if (totals[d] >= want) return (unsigned)d;
    return 0u;
}

// One token per row. grid = rows, block = SAMPLE_THREADS (or fewer: a multiple of 32); params
// holds 8 words per row: temperature, top_k, top_p, min_p (f32 bits but top_k), seed (low,
// high), counter (low, high). With temperature t > 0 the kept tokens are those whose key reaches
// three floors: top-k's (the k-th largest key) and top-p's (the largest key whose kept mass
// within top-k's set still reaches top_p × that set's mass), each found a hexadecimal digit a
// pass (8 passes over the row; floor_digit), and min-p's (l ≥ mx + t·ln(min_p)); the token is
// the kept one with the largest (l − mx) / t − ln(−ln u), u from Philox at counter (index,
// counter) with the seed as key. t = 0 takes the first largest logit. At most 19 passes over
// the row in all (max, 8 for top-k, the kept mass and 8 for top-p, the draw).
extern "C" __global__ void sample_rows(const float* __restrict__ logits, int vocab,
                                       const unsigned* __restrict__ params,
                                       int* __restrict__ out) {
    __shared__ float scratch[32];
    __shared__ float warp_g[32];
    __shared__ int warp_i[32];
    __shared__ float tally[16][SAMPLE_THREADS];
    __shared__ float totals[16];
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
            for (int shift = 28; shift >= 0; shift -= 4)
                k |= floor_digit(row, vocab, k, shift, 0u, false, mx, t, (float)top_k, tally,
                                 totals)
                     << shift;
            floor_key = k;
        }
        if (top_p < 1.0f) {
            float target = top_p * kept_mass(row, vocab, floor_key, mx, t, scratch);
            unsigned k = 0u;
            for (int shift = 28; shift >= 0; shift -= 4)
                k |= floor_digit(row, vocab, k, shift, floor_key, true, mx, t, target, tally,
                                 totals)
                     << shift;
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
