// Paged attention for mixed batches: every new token of a step (prefill-chunk token or decode
// token) attends causally to its request's context through the block table, reading K/V from
// the paged cache (which already holds this step's K/V: kv_write runs first).
//
//   grid  = (tokens, q_heads, splits)    block = 128 threads (4 warps)
//   key j of token t: slot = block_tables[seq(t) * max_blocks + j / block_size] * block_size
//                            + j % block_size
//
// Split-K: a token's keys [lo, pos] are cut into `splits` contiguous ranges, each handled by one
// block with an online softmax (running max m, sum l, accumulator acc); with splits > 1 the
// partials go to a workspace and attention_combine merges them. Long decode contexts thus use
// many SMs even at batch 1. Scores: one warp per key (lanes over head_dim, coalesced loads),
// then threads over head_dim for the V sum (coalesced). head_dim ≤ 256.

#define ATT_THREADS 128
#define ATT_TILE 64
#define MAX_HEAD_DIM 256

extern "C" __global__ void paged_attention(
    const bf16* qkv, const bf16* k_cache, const bf16* v_cache, bf16* out,
    float* ws_acc, float* ws_ml,
    const int* tok_seq, const int* tok_pos, const int* block_tables, int max_blocks,
    int block_size, int q_heads, int kv_heads, int head_dim, int qkv_width, float scale,
    int window) {
    __shared__ float q[MAX_HEAD_DIM];
    __shared__ float scores[ATT_TILE];
    __shared__ float scratch[32];
    int t = blockIdx.x, h = blockIdx.y, s = blockIdx.z, splits = gridDim.z;
    int seq = tok_seq[t], pos = tok_pos[t];
    int g = h / (q_heads / kv_heads);
    int kv_width = kv_heads * head_dim;
    int lo = window > 0 ? max(0, pos + 1 - window) : 0;
    int n = pos + 1 - lo;
    int per = (n + splits - 1) / splits;
    int begin = lo + s * per, end = min(pos + 1, begin + per);
    const bf16* qrow = qkv + (size_t)t * qkv_width + h * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) q[d] = bf2f(qrow[d]) * scale;
    __syncthreads();
    const int* table = block_tables + (size_t)seq * max_blocks;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    float m = -INFINITY, l = 0.0f;
    float acc[MAX_HEAD_DIM / ATT_THREADS] = {0.0f, 0.0f};
    for (int tile = begin; tile < end; tile += ATT_TILE) {
        int count = min(ATT_TILE, end - tile);
        for (int k = warp; k < count; k += warps) {
            int j = tile + k;
            size_t slot = (size_t)table[j / block_size] * block_size + j % block_size;
            const bf16* krow = k_cache + slot * kv_width + g * head_dim;
            float dot = 0.0f;
            for (int d = lane; d < head_dim; d += 32) dot += q[d] * bf2f(krow[d]);
            for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
            if (lane == 0) scores[k] = dot;
        }
        __syncthreads();
        float tmax = -INFINITY;
        for (int k = threadIdx.x; k < count; k += blockDim.x) tmax = fmaxf(tmax, scores[k]);
        tmax = block_max(tmax, scratch);
        float m_new = fmaxf(m, tmax);
        float corr = __expf(m - m_new);
        __syncthreads();
        float psum = 0.0f;
        for (int k = threadIdx.x; k < count; k += blockDim.x) {
            float p = __expf(scores[k] - m_new);
            scores[k] = p;
            psum += p;
        }
        psum = block_sum(psum, scratch);
        __syncthreads();
        l = l * corr + psum;
        m = m_new;
        for (int a = 0, d = threadIdx.x; d < head_dim; ++a, d += blockDim.x) {
            float sum = acc[a] * corr;
            for (int k = 0; k < count; ++k) {
                int j = tile + k;
                size_t slot = (size_t)table[j / block_size] * block_size + j % block_size;
                sum += scores[k] * bf2f(v_cache[slot * kv_width + g * head_dim + d]);
            }
            acc[a] = sum;
        }
        __syncthreads();
    }
    if (splits == 1) {
        bf16* orow = out + (size_t)t * q_heads * head_dim + h * head_dim;
        for (int a = 0, d = threadIdx.x; d < head_dim; ++a, d += blockDim.x)
            orow[d] = f2bf(l > 0.0f ? acc[a] / l : 0.0f);
    } else {
        size_t part = ((size_t)t * q_heads + h) * splits + s;
        for (int a = 0, d = threadIdx.x; d < head_dim; ++a, d += blockDim.x)
            ws_acc[part * head_dim + d] = acc[a];
        if (threadIdx.x == 0) {
            ws_ml[2 * part] = m;
            ws_ml[2 * part + 1] = l;
        }
    }
}

// Merges split-K partials: out = sum_s acc_s * e^(m_s - M) / sum_s l_s * e^(m_s - M).
extern "C" __global__ void attention_combine(const float* ws_acc, const float* ws_ml, bf16* out,
                                             int q_heads, int head_dim, int splits) {
    int t = blockIdx.x, h = blockIdx.y;
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
