// Attention over the paged KV cache, for mixed batches (the cache already holds this step's K/V:
// kv_write runs first).
//
// paged_attention: every listed token attends causally to its request's context through the
// block table. One block per (token, KV head, split) serves all the query heads of that KV
// head's group (GQA), so each K/V row is read once per group, not once per query head.
//
//   grid  = (listed tokens, kv_heads, splits)     block = 128 threads (4 warps)
//   key j of token t: slot = block_tables[seq(t) * max_blocks + j / block_size] * block_size
//                            + j % block_size
//
// Split-K: a token's keys [lo, pos] are cut into `splits` contiguous ranges with an online
// softmax each (running max m, sum l, accumulator); with splits > 1 the partials go to a
// workspace and attention_combine merges them, so long decode contexts use many SMs at batch 1.
// Scores: one warp per key (lanes over head_dim, coalesced), every head of the group per key;
// then threads over head dims for the V sum (coalesced; each V element read once for all the
// group's heads). Key slots are looked up once per tile. head_dim ≤ 256, group ≤ 8.
//
// Long prefill chunks take another path (host side: gathered K/V, cuBLAS GEMMs, then
// causal_softmax below), because a per-token kernel re-reads the context once per query.

#define ATT_THREADS 128
#define ATT_TILE 64
#define MAX_HEAD_DIM 256
#define MAX_GROUP 8
// Accumulators per thread: (head dims it owns) × (heads of the group).
#define ACC_PER_THREAD (MAX_GROUP * MAX_HEAD_DIM / ATT_THREADS)

extern "C" __global__ void paged_attention(
    const bf16* qkv, const bf16* k_cache, const bf16* v_cache, bf16* out,
    float* ws_acc, float* ws_ml, const int* tok_list,
    const int* tok_seq, const int* tok_pos, const int* block_tables, int max_blocks,
    int block_size, int q_heads, int kv_heads, int head_dim, int qkv_width, float scale,
    int window) {
    __shared__ float q[MAX_GROUP * MAX_HEAD_DIM];
    __shared__ float scores[MAX_GROUP][ATT_TILE];
    __shared__ float m_s[MAX_GROUP], l_s[MAX_GROUP], corr_s[MAX_GROUP];
    int t = tok_list[blockIdx.x], g = blockIdx.y, s = blockIdx.z, splits = gridDim.z;
    int group = q_heads / kv_heads;
    int seq = tok_seq[t], pos = tok_pos[t];
    int kv_width = kv_heads * head_dim;
    int lo = window > 0 ? max(0, pos + 1 - window) : 0;
    int n = pos + 1 - lo;
    int per = (n + splits - 1) / splits;
    int begin = lo + s * per, end = min(pos + 1, begin + per);
    const bf16* qrow = qkv + (size_t)t * qkv_width + g * group * head_dim;
    int width = group * head_dim;
    for (int i = threadIdx.x; i < width; i += blockDim.x) q[i] = bf2f(qrow[i]) * scale;
    if (threadIdx.x < group) { m_s[threadIdx.x] = -INFINITY; l_s[threadIdx.x] = 0.0f; }
    __syncthreads();
    const int* table = block_tables + (size_t)seq * max_blocks;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    float acc[ACC_PER_THREAD];
#pragma unroll
    for (int a = 0; a < ACC_PER_THREAD; ++a) acc[a] = 0.0f;
    __shared__ long long slot_s[ATT_TILE];
    for (int tile = begin; tile < end; tile += ATT_TILE) {
        int count = min(ATT_TILE, end - tile);
        // Each key's cache slot, looked up once per tile.
        for (int k = threadIdx.x; k < count; k += blockDim.x) {
            int j = tile + k;
            slot_s[k] = (long long)table[j / block_size] * block_size + j % block_size;
        }
        __syncthreads();
        for (int k = warp; k < count; k += warps) {
            const bf16* krow = k_cache + (size_t)slot_s[k] * kv_width + g * head_dim;
            float kv[MAX_HEAD_DIM / 32];
#pragma unroll
            for (int c = 0; c < MAX_HEAD_DIM / 32; ++c) {
                int d = lane + 32 * c;
                kv[c] = d < head_dim ? bf2f(krow[d]) : 0.0f;
            }
            for (int h = 0; h < group; ++h) {
                float dot = 0.0f;
#pragma unroll
                for (int c = 0; c < MAX_HEAD_DIM / 32; ++c) {
                    int d = lane + 32 * c;
                    if (d < head_dim) dot += q[h * head_dim + d] * kv[c];
                }
                for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
                if (lane == 0) scores[h][k] = dot;
            }
        }
        __syncthreads();
        // Online softmax, one warp per head of the group.
        for (int h = warp; h < group; h += warps) {
            float mx = -INFINITY;
            for (int k = lane; k < count; k += 32) mx = fmaxf(mx, scores[h][k]);
            for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
            float m_new = fmaxf(m_s[h], mx);
            float sum = 0.0f;
            for (int k = lane; k < count; k += 32) {
                float p = __expf(scores[h][k] - m_new);
                scores[h][k] = p;
                sum += p;
            }
            for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
            if (lane == 0) {
                float c = __expf(m_s[h] - m_new);
                corr_s[h] = c;
                l_s[h] = l_s[h] * c + sum;
                m_s[h] = m_new;
            }
        }
        __syncthreads();
        // V sum: each thread owns head dims; every V element is read once for the whole group.
#pragma unroll
        for (int c = 0; c < MAX_HEAD_DIM / ATT_THREADS; ++c) {
            int d = threadIdx.x + c * ATT_THREADS;
            if (d < head_dim) {
                float sums[MAX_GROUP];
#pragma unroll
                for (int h = 0; h < MAX_GROUP; ++h) sums[h] = h < group ? acc[c * MAX_GROUP + h] * corr_s[h] : 0.0f;
                for (int k = 0; k < count; ++k) {
                    float v = bf2f(v_cache[(size_t)slot_s[k] * kv_width + g * head_dim + d]);
#pragma unroll
                    for (int h = 0; h < MAX_GROUP; ++h)
                        if (h < group) sums[h] += scores[h][k] * v;
                }
#pragma unroll
                for (int h = 0; h < MAX_GROUP; ++h) acc[c * MAX_GROUP + h] = sums[h];
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int c = 0; c < MAX_HEAD_DIM / ATT_THREADS; ++c) {
        int d = threadIdx.x + c * ATT_THREADS;
        if (d >= head_dim) continue;
        for (int h = 0; h < group; ++h) {
            float a = acc[c * MAX_GROUP + h];
            int qh = g * group + h;
            if (splits == 1) {
                float l = l_s[h];
                out[(size_t)t * q_heads * head_dim + qh * head_dim + d] = f2bf(l > 0.0f ? a / l : 0.0f);
            } else {
                size_t part = ((size_t)t * q_heads + qh) * splits + s;
                ws_acc[part * head_dim + d] = a;
                if (d == 0) {
                    ws_ml[2 * part] = m_s[h];
                    ws_ml[2 * part + 1] = l_s[h];
                }
            }
        }
    }
}

// Merges split-K partials: out = sum_s acc_s * e^(m_s - M) / sum_s l_s * e^(m_s - M).
// grid = (listed tokens, q_heads).
extern "C" __global__ void attention_combine(const float* ws_acc, const float* ws_ml, bf16* out,
                                             const int* tok_list, int q_heads, int head_dim,
                                             int splits) {
    int t = tok_list[blockIdx.x], h = blockIdx.y;
    size_t base = ((size_t)t * q_heads + h) * splits;
    float mx = -INFINITY;
    for (int s = 0; s < splits; ++s) mx = fmaxf(mx, ws_ml[2 * (base + s)]);
    float denom = 0.0f;
    for (int s = 0; s < splits; ++s) {
        float ms = ws_ml[2 * (base + s)];
        if (ms > -INFINITY) denom += ws_ml[2 * (base + s) + 1] * __expf(ms - mx);
    }
    bf16* orow = out + (size_t)t * q_heads * head_dim + h * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float num = 0.0f;
        for (int s = 0; s < splits; ++s) {
            float ms = ws_ml[2 * (base + s)];
            if (ms > -INFINITY) num += ws_acc[(base + s) * head_dim + d] * __expf(ms - mx);
        }
        orow[d] = f2bf(denom > 0.0f ? num / denom : 0.0f);
    }
}

// Copies one request's context [0, ctx) from the paged cache into contiguous
// [kv_head][ctx][head_dim] K and V buffers (for the GEMM prefill path).
// grid = (ctx, kv_heads), block = head_dim threads (≤ 1024).
extern "C" __global__ void gather_kv(const bf16* k_cache, const bf16* v_cache, const int* table,
                                     int block_size, int kv_heads, int head_dim, int ctx,
                                     bf16* k_out, bf16* v_out) {
    int j = blockIdx.x, g = blockIdx.y, d = threadIdx.x;
    size_t slot = (size_t)table[j / block_size] * block_size + j % block_size;
    size_t src = (slot * kv_heads + g) * head_dim + d;
    size_t dst = ((size_t)g * ctx + j) * head_dim + d;
    k_out[dst] = k_cache[src];
    v_out[dst] = v_cache[src];
}

// Row softmax of scores S[group][rows][ctx] (f32, already scaled) with the causal mask of a
// chunk whose first query sits at position `start`: query i sees keys lo(i)..start+i.
// Writes P (bf16, same layout). grid = (rows, group), block = 256 threads.
extern "C" __global__ void causal_softmax(const float* s, bf16* p, int rows, int ctx, int start,
                                          int window) {
    __shared__ float scratch[32];
    int i = blockIdx.x, h = blockIdx.y;
    const float* row = s + ((size_t)h * rows + i) * ctx;
    bf16* prow = p + ((size_t)h * rows + i) * ctx;
    int hi = start + i;
    int lo = window > 0 ? max(0, hi + 1 - window) : 0;
    float mx = -INFINITY;
    for (int j = lo + threadIdx.x; j <= hi; j += blockDim.x) mx = fmaxf(mx, row[j]);
    mx = block_max(mx, scratch);
    float sum = 0.0f;
    for (int j = lo + threadIdx.x; j <= hi; j += blockDim.x) sum += __expf(row[j] - mx);
    sum = block_sum(sum, scratch);
    float inv = 1.0f / sum;
    for (int j = threadIdx.x; j < ctx; j += blockDim.x)
        prow[j] = (j >= lo && j <= hi) ? f2bf(__expf(row[j] - mx) * inv) : (bf16)0;
}
