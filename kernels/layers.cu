// Element-wise and row kernels of one transformer layer: embedding gather, residual add fused
// with RMSNorm, bias add, rotary embedding, KV-cache write into paged blocks, SiLU-and-mul, and
// random weight fill (for shape-only models). One block per token row unless stated.

// x[t, :] = table[ids[t], :] (residual stream kept in f32).
extern "C" __global__ void embed(const int* __restrict__ ids, const bf16* __restrict__ table,
                                 float* __restrict__ x, int hidden) {
    const bf16* row = table + (size_t)ids[blockIdx.x] * hidden;
    float* out = x + (size_t)blockIdx.x * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) out[i] = bf2f(row[i]);
}

// orow = xr / sqrt(sum_sq / hidden + eps) * w, rounded to bf16 (HF rounds the normed value to
// the model dtype before the weight multiply; we do the same). The block's threads share a row.
__device__ __forceinline__ void write_normed(const float* __restrict__ xr, float sum_sq,
                                             const bf16* __restrict__ w, bf16* __restrict__ orow,
                                             int hidden, float eps) {
    float inv = rsqrtf(sum_sq / hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
        orow[i] = f2bf(bf2f(w[i]) * bf2f(f2bf(xr[i] * inv)));
}

// x += delta (when delta is not null; delta is a bf16 projection output), then
// out = norm(x) * w (write_normed). The buffers never overlap (__restrict__: without it every
// store to x orders the next element's loads after it, one memory round trip per element).
#define NORM_VPT 8
extern "C" __global__ void add_rms_norm(float* __restrict__ x, const bf16* __restrict__ delta,
                                        const bf16* __restrict__ w, bf16* __restrict__ out,
                                        int hidden, float eps) {
    __shared__ float scratch[32];
    float* xr = x + (size_t)blockIdx.x * hidden;
    const bf16* dr = delta ? delta + (size_t)blockIdx.x * hidden : 0;
    if (hidden <= NORM_VPT * (int)blockDim.x) {
        // The row in registers: x, delta and w loaded at once (one memory round trip), then
        // the reduction, then the stores; nothing is read twice.
        float v[NORM_VPT], wv[NORM_VPT];
        float ss = 0.0f;
#pragma unroll
        for (int k = 0; k < NORM_VPT; ++k) {
            int i = threadIdx.x + k * blockDim.x;
            v[k] = 0.0f;
            wv[k] = 0.0f;
            if (i < hidden) {
                v[k] = xr[i] + (dr ? bf2f(dr[i]) : 0.0f);
                wv[k] = bf2f(w[i]);
                ss += v[k] * v[k];
            }
        }
        float inv = rsqrtf(block_sum(ss, scratch) / hidden + eps);
        bf16* orow = out + (size_t)blockIdx.x * hidden;
#pragma unroll
        for (int k = 0; k < NORM_VPT; ++k) {
            int i = threadIdx.x + k * blockDim.x;
            if (i < hidden) {
                if (dr) xr[i] = v[k];
                orow[i] = f2bf(wv[k] * bf2f(f2bf(v[k] * inv)));
            }
        }
        return;
    }
    float ss = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float v = xr[i];
        if (dr) { v += bf2f(dr[i]); xr[i] = v; }
        ss += v * v;
    }
    write_normed(xr, block_sum(ss, scratch), w, out + (size_t)blockIdx.x * hidden, hidden, eps);
}

// Final norm of selected rows: out[r] = norm(x[rows[r]]) (f32 residual in, bf16 out).
extern "C" __global__ void rms_norm_rows(const float* __restrict__ x, const int* __restrict__ rows,
                                         const bf16* __restrict__ w, bf16* __restrict__ out,
                                         int hidden, float eps) {
    __shared__ float scratch[32];
    const float* xr = x + (size_t)rows[blockIdx.x] * hidden;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) ss += xr[i] * xr[i];
    write_normed(xr, block_sum(ss, scratch), w, out + (size_t)blockIdx.x * hidden, hidden, eps);
}

// y[t, :] += b (Qwen2's Q/K/V biases).
extern "C" __global__ void add_bias(bf16* y, const bf16* b, int width) {
    bf16* row = y + (size_t)blockIdx.x * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) row[i] = f2bf(bf2f(row[i]) + bf2f(b[i]));
}

// Rotary embedding in place on the Q and K heads of each token's fused QKV row, rotate-half
// convention (pairs i and i + head_dim/2), angle = pos * inv_freq[i] in f32 as HF computes it.
// grid = (tokens, q_heads + kv_heads), block = head_dim / 2 threads: one pair per thread.
extern "C" __global__ void rope(bf16* qkv, const int* pos, const float* inv_freq, int qkv_width,
                                int head_dim) {
    int half = head_dim / 2, i = threadIdx.x;
    if (i >= half) return;
    bf16* head = qkv + (size_t)blockIdx.x * qkv_width + blockIdx.y * head_dim;
    float s, c;
    sincosf((float)pos[blockIdx.x] * inv_freq[i], &s, &c);
    float a = bf2f(head[i]), b = bf2f(head[i + half]);
    head[i] = f2bf(a * c - b * s);
    head[i + half] = f2bf(b * c + a * s);
}

// rope and kv_write in one launch (v2 kernels): grid = (tokens, q_heads + 2 * kv_heads), block =
// head_dim / 2 threads (rounded up to a warp), one rotate-half pair per thread. Q heads are
// rotated in place; K heads rotated in place and stored at the token's cache slot; V heads
// stored. The values written are rope's and kv_write's, bit for bit. A negative slot (a padding
// row of a CUDA-graph decode step) stores nothing.
extern "C" __global__ void rope_kv_write(bf16* __restrict__ qkv, const int* __restrict__ pos,
                                         const float* __restrict__ inv_freq,
                                         const int* __restrict__ slots, bf16* __restrict__ k_cache,
                                         bf16* __restrict__ v_cache, int qkv_width, int q_heads,
                                         int kv_heads, int head_dim) {
    int half = head_dim / 2, i = threadIdx.x, y = blockIdx.y;
    if (i >= half) return;
    bf16* head = qkv + (size_t)blockIdx.x * qkv_width + y * head_dim;
    int slot = slots[blockIdx.x];
    size_t kv_row = (size_t)slot * kv_heads * head_dim;
    if (y >= q_heads + kv_heads) {
        if (slot < 0) return;
        bf16* dst = v_cache + kv_row + (y - q_heads - kv_heads) * head_dim;
        dst[i] = head[i];
        dst[i + half] = head[i + half];
        return;
    }
    float s, c;
    sincosf((float)pos[blockIdx.x] * inv_freq[i], &s, &c);
    float a = bf2f(head[i]), b = bf2f(head[i + half]);
    bf16 lo = f2bf(a * c - b * s), hi = f2bf(b * c + a * s);
    head[i] = lo;
    head[i + half] = hi;
    if (y >= q_heads && slot >= 0) {
        bf16* dst = k_cache + kv_row + (y - q_heads) * head_dim;
        dst[i] = lo;
        dst[i + half] = hi;
    }
}

// Copies each token's K and V (from the fused QKV row) into the paged cache at its slot
// (block * block_size + offset). Cache layout per layer: [slot][kv_head][head_dim].
extern "C" __global__ void kv_write(const bf16* __restrict__ qkv, bf16* __restrict__ k_cache,
                                    bf16* __restrict__ v_cache, const int* __restrict__ slots,
                                    int qkv_width, int q_width, int kv_width) {
    int slot = slots[blockIdx.x];
    if (slot < 0) return;  // a padding row of a CUDA-graph decode step: no cache slot
    const bf16* row = qkv + (size_t)blockIdx.x * qkv_width;
    size_t base = (size_t)slot * kv_width;
    for (int i = threadIdx.x; i < kv_width; i += blockDim.x) {
        k_cache[base + i] = row[q_width + i];
        v_cache[base + i] = row[q_width + kv_width + i];
    }
}

// out[t, i] = silu(gate[t, i]) * up[t, i] over rows laid out [gate (inter) | up (inter)].
// grid = (ceil(inter / blockDim.x), tokens): one thread per element, so a single decode row
// spreads over many SMs.
extern "C" __global__ void silu_mul(const bf16* gate_up, bf16* out, int inter) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= inter) return;
    const bf16* row = gate_up + (size_t)blockIdx.y * 2 * inter;
    float g = bf2f(row[i]);
    float silu = bf2f(f2bf(g / (1.0f + __expf(-g))));
    out[(size_t)blockIdx.y * inter + i] = f2bf(silu * bf2f(row[inter + i]));
}

// silu_mul with 16-byte loads and stores: 8 elements per thread (inter % 8 == 0, so each row's
// gate and up halves stay 16-byte aligned). grid = (ceil(inter / 8 / blockDim.x), tokens).
__device__ __forceinline__ unsigned silu_mul_pair(unsigned g, unsigned u) {
    float g0 = __uint_as_float(g << 16), g1 = __uint_as_float(g & 0xffff0000u);
    float u0 = __uint_as_float(u << 16), u1 = __uint_as_float(u & 0xffff0000u);
    float s0 = bf2f(f2bf(g0 / (1.0f + __expf(-g0)))), s1 = bf2f(f2bf(g1 / (1.0f + __expf(-g1))));
    return (unsigned)f2bf(s0 * u0) | ((unsigned)f2bf(s1 * u1) << 16);
}

extern "C" __global__ void silu_mul8(const bf16* gate_up, bf16* out, int inter) {
    int i = (blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (i >= inter) return;
    const bf16* row = gate_up + (size_t)blockIdx.y * 2 * inter;
    uint4 g = *(const uint4*)(row + i), u = *(const uint4*)(row + inter + i);
    uint4 r;
    r.x = silu_mul_pair(g.x, u.x);
    r.y = silu_mul_pair(g.y, u.y);
    r.z = silu_mul_pair(g.z, u.z);
    r.w = silu_mul_pair(g.w, u.w);
    *(uint4*)(out + (size_t)blockIdx.y * inter + i) = r;
}

// Deterministic pseudo-random fill, uniform in [-scale, scale] (shape-only models for
// benchmarks and profiling; no host transfer of gigabytes of weights).
extern "C" __global__ void fill_uniform(bf16* x, unsigned long long n, unsigned long long seed, float scale) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned long long z = i + seed * 0x9e3779b97f4a7c15ull;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        z ^= z >> 31;
        float u = (float)(z >> 40) * (1.0f / 16777216.0f);
        x[i] = f2bf((2.0f * u - 1.0f) * scale);
    }
}
