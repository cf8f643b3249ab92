// Attention over the paged KV cache, for mixed batches (the cache already holds this step's K/V:
// kv_write runs first).
//
// Two generations of kernels live here; the backend picks one with its `KernelSet` setting
// (`VAJRA_CUDA_KERNELS=v1|v2`, v2 by default) so one build can measure both on the same GPU.
//   v1: paged_attention_scalar for decode tokens and short chunks; long prefill chunks as cuBLAS
//       GEMMs over gathered K/V with causal_softmax (gather_kv, causal_softmax below).
//   v2: paged_decode_<head_dim> and flash_prefill_<head_dim>: tensor-core mma.sync, online
//       softmax on the accumulator fragments, K/V read straight from the paged cache.
//
// paged_attention_scalar (v1): every listed token attends causally to its request's context
// through the block table. One block per (token, KV head, split) serves all the query heads of that KV
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

// Keys [begin, end) of split s of `splits` for a token at position pos: its visible keys
// [lo, pos] (lo from the sliding window) cut into equal contiguous ranges. Every paged kernel
// and the split-K merge must agree on these ranges.
__device__ __forceinline__ void split_range(int pos, int window, int s, int splits, int* begin,
                                            int* end) {
    int lo = window > 0 ? max(0, pos + 1 - window) : 0;
    int per = (pos + 1 - lo + splits - 1) / splits;
    *begin = lo + s * per;
    *end = min(pos + 1, *begin + per);
}

extern "C" __global__ void paged_attention_scalar(
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
    int begin, end;
    split_range(pos, window, s, splits, &begin, &end);
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
// grid = (listed tokens, q_heads), block = 128 threads. The partials' (m, l) pairs are read once,
// in parallel, into shared memory (a loop of dependent-looking loads over the splits would be a
// memory round trip per split), then each thread sums its head dims over the splits.
extern "C" __global__ void attention_combine(const float* __restrict__ ws_acc,
                                             const float* __restrict__ ws_ml, bf16* __restrict__ out,
                                             const int* __restrict__ tok_list, int q_heads,
                                             int head_dim, int splits) {
    __shared__ float wgt[64];  // e^(m_s - M) per split (MAX_SPLITS = 64)
    __shared__ float scratch[32];
    int t = tok_list[blockIdx.x], h = blockIdx.y;
    size_t base = ((size_t)t * q_heads + h) * splits;
    float ms = -INFINITY, ls = 0.0f;
    if (threadIdx.x < splits) {
        ms = ws_ml[2 * (base + threadIdx.x)];
        ls = ws_ml[2 * (base + threadIdx.x) + 1];
    }
    float mx = block_max(ms, scratch);
    float w = ms > -INFINITY ? __expf(ms - mx) : 0.0f;
    float denom = block_sum(ls * w, scratch);
    if (threadIdx.x < splits) wgt[threadIdx.x] = w;
    __syncthreads();
    float inv = denom > 0.0f ? 1.0f / denom : 0.0f;
    bf16* orow = out + (size_t)t * q_heads * head_dim + h * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float num = 0.0f;
#pragma unroll 8
        for (int s = 0; s < splits; ++s) num += ws_acc[(base + s) * head_dim + d] * wgt[s];
        orow[d] = f2bf(num * inv);
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

// ---------------------------------------------------------------------------------------------
// ---------------------------------------------------------------------------------------------
// flash_prefill_<HD> (v2): attention of one long prefill chunk on tensor cores, FlashAttention-2
// style. grid = (ceil(chunk / 64), q_heads), block = 128 threads (4 warps × 16 query rows).
// Per key tile of 64: the tile's K and V rows are copied from the paged cache (through the
// request's block table) into shared memory (cp.async); S = Q Kᵀ with mma.sync m16n8k16 (bf16 in, f32
// accumulate; Q fragments stay in registers), the causal/window mask and an online softmax on
// the accumulator fragments, then O += P V with P reused from S's registers as the A operand
// and V's fragments loaded with ldmatrix.trans.
// Query i of the chunk sits at position start + i and sees keys lo(i) ..= start + i; rows past
// the chunk are computed and dropped. Needs sm_80+ (the host checks); HD ∈ {16, 32, 64, 128}.

#define FL_BQ 64
#define FL_BK 64
#define FL_THREADS 128

__device__ __forceinline__ unsigned pack_bf2(float lo, float hi) {
    return (unsigned)f2bf(lo) | ((unsigned)f2bf(hi) << 16);
}

#ifndef VAJRA_HOST  // kernels/host/cuda_host.hpp emulates these five instructions on the host
__device__ __forceinline__ void mma_bf16_16816(float* c, const unsigned* a, unsigned b0,
                                               unsigned b1) {
#if __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();
#endif
}

// Shared-memory helpers of the tensor-core kernels (sm_80+; PTX inline, NVRTC has no headers).
__device__ __forceinline__ unsigned smem_addr(const void* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// Four 8×8 b16 matrices, transposed: thread i gets {M[2(i%4)][i/4], M[2(i%4)+1][i/4]} of each,
// i.e. the B fragments of m16n8k16 from a row-major [k][n] tile. Lanes 8j..8j+7 give the row
// addresses of matrix j.
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned addr, unsigned& r0, unsigned& r1,
                                                  unsigned& r2, unsigned& r3) {
#if __CUDA_ARCH__ >= 800
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr)
                 : "memory");
#else
    __trap();
#endif
}

// 16 bytes global → shared without passing through registers; zero-filled when !ok (src is
// then not read).
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, bool ok) {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(ok ? 16 : 0)
                 : "memory");
#else
    __trap();
#endif
}

// Closes the group of cp.async copies issued so far (waited on with cp_async_wait_<n>).
__device__ __forceinline__ void cp_async_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most 1 (or 0) committed groups are still in flight.
__device__ __forceinline__ void cp_async_wait_1() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group 1;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void cp_async_wait_0() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
#endif
}
#endif  // VAJRA_HOST

// O[nt] += P · V over one 16-key slice of a row-major V tile (rows = keys, LD elements apart),
// V's B fragments by ldmatrix.trans, two 8-dim tiles a load.
template <int HD>
__device__ __forceinline__ void pv_slice(float (*o)[4], const unsigned* pa, const bf16* vslice,
                                         int ld, int lane) {
    int r = lane & 7, mi = lane >> 3;
    const bf16* row = vslice + ((mi & 1) * 8 + r) * ld + (mi >> 1) * 8;
#pragma unroll
    for (int nt = 0; nt < HD / 8; nt += 2) {
        unsigned b0, b1, b2, b3;
        ldmatrix_x4_trans(smem_addr(row + nt * 8), b0, b1, b2, b3);
        mma_bf16_16816(o[nt], pa, b0, b1);
        mma_bf16_16816(o[nt + 1], pa, b2, b3);
    }
}

template <int HD>
__device__ __forceinline__ void flash_prefill(const bf16* __restrict__ qkv,
                                              const bf16* __restrict__ k_cache,
                                              const bf16* __restrict__ v_cache,
                                              const int* __restrict__ table, int block_size,
                                              bf16* __restrict__ out, int first, int tq, int start,
                                              int window, int q_heads, int kv_heads,
                                              int qkv_width, float scale_log2) {
    const int LD = HD + 8;  // padded rows: the fragment loads below hit 32 distinct banks
    __shared__ __align__(16) bf16 ks[FL_BK * (HD + 8)];
    __shared__ __align__(16) bf16 vs[FL_BK * (HD + 8)];
    __shared__ long long slot_s[FL_BK];
    int qh = blockIdx.y, g = qh / (q_heads / kv_heads);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int gid = lane >> 2, tig = lane & 3;
    int qb = blockIdx.x * FL_BQ, q0 = qb + warp * 16;
    int kv_width = kv_heads * HD, q_width = q_heads * HD;
    // A fragments of Q (rows q0+gid and q0+gid+8; cols tig*2 and tig*2+8 of each 16-wide slice).
    unsigned qf[HD / 16][4];
    const bf16* qbase = qkv + (size_t)first * qkv_width + qh * HD;
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            int row = q0 + gid + (r & 1) * 8, col = kk * 16 + tig * 2 + (r >> 1) * 8;
            qf[kk][r] = row < tq ? *(const unsigned*)(qbase + (size_t)row * qkv_width + col) : 0u;
        }
    }
    float o[HD / 8][4];
#pragma unroll
    for (int nt = 0; nt < HD / 8; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.0f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;  // rows gid and gid + 8
    int p0 = start + q0 + gid, p1 = p0 + 8;
    int last = start + min(qb + FL_BQ, tq) - 1;  // the block's last query position
    int blo = window > 0 ? max(0, start + qb + 1 - window) : 0;
    int wlast = start + q0 + 15, wfirst = window > 0 ? max(0, start + q0 + 1 - window) : 0;
    for (int kt = (blo / FL_BK) * FL_BK; kt <= last; kt += FL_BK) {
        __syncthreads();  // the previous tile's readers are done
        for (int k = threadIdx.x; k < FL_BK; k += FL_THREADS) {
            int j = kt + k;
            slot_s[k] = j <= last ? (long long)table[j / block_size] * block_size + j % block_size
                                  : -1;
        }
        __syncthreads();
        for (int i = threadIdx.x; i < FL_BK * (HD / 8); i += FL_THREADS) {
            int r = i / (HD / 8), c = (i % (HD / 8)) * 8;
            long long sl = slot_s[r];
            size_t off = sl >= 0 ? sl * kv_width + g * HD + c : 0;
            cp_async16(smem_addr(ks + r * LD + c), k_cache + off, sl >= 0);
            cp_async16(smem_addr(vs + r * LD + c), v_cache + off, sl >= 0);
        }
        cp_async_commit();
        cp_async_wait_0();
        __syncthreads();
        // Warp-uniform: a tile wholly outside this warp's rows' ranges (or no rows) is skipped.
        if (q0 >= tq || kt > wlast || kt + FL_BK <= wfirst) continue;
        float s[FL_BK / 8][4];
#pragma unroll
        for (int nt = 0; nt < FL_BK / 8; ++nt) {
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
            const bf16* krow = ks + (nt * 8 + gid) * LD + tig * 2;
#pragma unroll
            for (int kk = 0; kk < HD / 16; ++kk) {
                unsigned b0 = *(const unsigned*)(krow + kk * 16);
                unsigned b1 = *(const unsigned*)(krow + kk * 16 + 8);
                mma_bf16_16816(s[nt], qf[kk], b0, b1);
            }
        }
        // Mask, scale (log2 domain) and the rows' running maxima (a row's 4 lanes share it).
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < FL_BK / 8; ++nt) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                int key = kt + nt * 8 + tig * 2 + (i & 1);
                int qp = i < 2 ? p0 : p1;
                bool ok = key <= qp && (window <= 0 || key > qp - window);
                float v = ok ? s[nt][i] * scale_log2 : -INFINITY;
                s[nt][i] = v;
                if (i < 2) mx0 = fmaxf(mx0, v); else mx1 = fmaxf(mx1, v);
            }
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        // A row with no visible key yet keeps a zero base, so no (-inf) - (-inf).
        float b0 = mn0 == -INFINITY ? 0.0f : mn0, b1 = mn1 == -INFINITY ? 0.0f : mn1;
        float c0 = exp2f(m0 - b0), c1 = exp2f(m1 - b1);
        m0 = mn0;
        m1 = mn1;
        float rs0 = 0.0f, rs1 = 0.0f;
#pragma unroll
        for (int nt = 0; nt < FL_BK / 8; ++nt) {
            s[nt][0] = exp2f(s[nt][0] - b0);
            s[nt][1] = exp2f(s[nt][1] - b0);
            s[nt][2] = exp2f(s[nt][2] - b1);
            s[nt][3] = exp2f(s[nt][3] - b1);
            rs0 += s[nt][0] + s[nt][1];
            rs1 += s[nt][2] + s[nt][3];
        }
        l0 = l0 * c0 + rs0;
        l1 = l1 * c1 + rs1;
#pragma unroll
        for (int nt = 0; nt < HD / 8; ++nt) {
            o[nt][0] *= c0;
            o[nt][1] *= c0;
            o[nt][2] *= c1;
            o[nt][3] *= c1;
        }
        // O += P V: S's accumulators of key columns [16j, 16j+16) are P's A fragment for slice j.
#pragma unroll
        for (int j = 0; j < FL_BK / 16; ++j) {
            unsigned pa[4];
            pa[0] = pack_bf2(s[2 * j][0], s[2 * j][1]);
            pa[1] = pack_bf2(s[2 * j][2], s[2 * j][3]);
            pa[2] = pack_bf2(s[2 * j + 1][0], s[2 * j + 1][1]);
            pa[3] = pack_bf2(s[2 * j + 1][2], s[2 * j + 1][3]);
            pv_slice<HD>(o, pa, vs + j * 16 * LD, LD, lane);
        }
    }
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
    int r0 = q0 + gid, r1 = r0 + 8;
#pragma unroll
    for (int nt = 0; nt < HD / 8; ++nt) {
        int col = qh * HD + nt * 8 + tig * 2;
        if (r0 < tq)
            *(unsigned*)(out + (size_t)(first + r0) * q_width + col) =
                pack_bf2(o[nt][0] * inv0, o[nt][1] * inv0);
        if (r1 < tq)
            *(unsigned*)(out + (size_t)(first + r1) * q_width + col) =
                pack_bf2(o[nt][2] * inv1, o[nt][3] * inv1);
    }
}

#define FLASH_PREFILL(HD)                                                                      \
    extern "C" __global__ void __launch_bounds__(FL_THREADS) flash_prefill_##HD(               \
        const bf16* qkv, const bf16* k_cache, const bf16* v_cache, const int* table,           \
        int block_size, bf16* out, int first, int tq, int start, int window, int q_heads,      \
        int kv_heads, int qkv_width, float scale_log2) {                                       \
        flash_prefill<HD>(qkv, k_cache, v_cache, table, block_size, out, first, tq, start,     \
                          window, q_heads, kv_heads, qkv_width, scale_log2);                   \
    }
FLASH_PREFILL(16)
FLASH_PREFILL(32)
FLASH_PREFILL(64)
FLASH_PREFILL(128)

// ---------------------------------------------------------------------------------------------
// paged_decode_<HD> (v2): attention of the listed tokens (decodes and short chunks) on tensor
// cores. The same grid, arguments, split-K ranges and workspace layout as
// paged_attention_scalar: a block per (token, KV head, split), 128 threads. A token's group of
// query heads (≤ 8) is the MMA's row tile (rows past the group are zero padding), so each key is
// multiplied against every head of its group at once:
// - the block's key range is dealt to its 4 warps in tiles of 16 keys; a warp copies its tile's
//   K and V rows from the paged cache into its own shared memory (16-byte loads, all in flight
//   together, cp.async), then S = Q Kᵀ (2 MMAs a 16-dim slice), the online softmax on the
//   accumulator fragments, and O += P V as in flash_prefill (no block barrier in the loop);
// - the warps' (m, l, O) are merged through shared memory at the end; with split-K the last
//   split block of a (token, KV head) merges the splits' partials itself (`done` counts the
//   finished splits; zero on entry, reset by that block), so attention_combine is not launched.
//   Maxima are in log2 units (exp2f) throughout.
// HD ∈ {16, 32, 64, 128}; sm_80+ (the host checks).

#define DM_KEYS 16
#define DM_WARPS (ATT_THREADS / 32)

// The K/V copy of one 16-key tile of a warp (cp.async; keys at or past `end` zero-filled).
template <int HD>
__device__ __forceinline__ void decode_tile_copy(bf16* kw, bf16* vw, const bf16* k_cache,
                                                 const bf16* v_cache, const int* table,
                                                 int block_size, int kv_width, int g, int ts,
                                                 int end, int lane) {
    const int LD = HD + 8, VEC = DM_KEYS * HD / 8 / 32;  // 16-byte pieces per lane per matrix
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
        int e = lane + 32 * i, r = e / (HD / 8), c = (e % (HD / 8)) * 8, j = ts + r;
        int slot = j < end ? table[j / block_size] * block_size + j % block_size : -1;
        size_t off = slot >= 0 ? (size_t)slot * kv_width + g * HD + c : 0;
        cp_async16(smem_addr(kw + r * LD + c), k_cache + off, slot >= 0);
        cp_async16(smem_addr(vw + r * LD + c), v_cache + off, slot >= 0);
    }
    cp_async_commit();
}

// Dynamic shared memory of paged_decode: per warp STAGES × (K tile, V tile).
#ifndef VAJRA_HOST  // on the host: an array of cuda_host.hpp
extern __shared__ __align__(16) unsigned char decode_smem[];
#endif

template <int HD, int STAGES>
__device__ __forceinline__ void paged_decode(
    const bf16* __restrict__ qkv, const bf16* __restrict__ k_cache,
    const bf16* __restrict__ v_cache, bf16* __restrict__ out, float* __restrict__ ws_acc,
    float* __restrict__ ws_ml, const int* __restrict__ tok_list, const int* __restrict__ tok_seq,
    const int* __restrict__ tok_pos, const int* __restrict__ block_tables, int max_blocks,
    int block_size, int q_heads, int kv_heads, float scale_log2, int window,
    int* __restrict__ done) {
    const int LD = HD + 8, TILE = 2 * DM_KEYS * (HD + 8);  // a K and a V tile, in bf16
    // Per warp: STAGES K/V tile pairs (dynamic shared memory, STAGES × DM_WARPS × TILE bf16);
    // reused after the key loop for the warps' O (8 rows × HD f32 each).
    bf16* kvs = (bf16*)decode_smem;
    __shared__ float wm[DM_WARPS][8], wl[DM_WARPS][8];
    int t = tok_list[blockIdx.x], g = blockIdx.y, s = blockIdx.z, splits = gridDim.z;
    int group = q_heads / kv_heads;
    int seq = tok_seq[t], pos = tok_pos[t];
    int kv_width = kv_heads * HD;
    int begin, end;
    split_range(pos, window, s, splits, &begin, &end);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    // A fragments of Q: row gid is the group's head gid (rows gid + 8 are padding).
    unsigned qf[HD / 16][2];
    const bf16* qrow = qkv + (size_t)t * (q_heads + 2 * kv_heads) * HD + (g * group + gid) * HD;
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
        qf[kk][0] = gid < group ? *(const unsigned*)(qrow + kk * 16 + tig * 2) : 0u;
        qf[kk][1] = gid < group ? *(const unsigned*)(qrow + kk * 16 + 8 + tig * 2) : 0u;
    }
    float o[HD / 8][4];
#pragma unroll
    for (int nt = 0; nt < HD / 8; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.0f;
    float m0 = -INFINITY, l0 = 0.0f;
    const int* table = block_tables + (size_t)seq * max_blocks;
    bf16* wbuf = kvs + (size_t)warp * STAGES * TILE;
    // With 2 stages the next tile's copy is in flight while this one is computed.
    int ts = begin + warp * DM_KEYS, buf = 0;
    if (STAGES == 2 && ts < end)
        decode_tile_copy<HD>(wbuf, wbuf + DM_KEYS * LD, k_cache, v_cache, table, block_size,
                             kv_width, g, ts, end, lane);
    for (; ts < end; ts += DM_WARPS * DM_KEYS, buf ^= (STAGES - 1)) {
        bf16* kw = wbuf + buf * TILE;
        bf16* vw = kw + DM_KEYS * LD;
        if (STAGES == 2) {
            int nx = ts + DM_WARPS * DM_KEYS;
            if (nx < end) {
                bf16* nk = wbuf + (buf ^ 1) * TILE;
                decode_tile_copy<HD>(nk, nk + DM_KEYS * LD, k_cache, v_cache, table, block_size,
                                     kv_width, g, nx, end, lane);
                cp_async_wait_1();
            } else {
                cp_async_wait_0();
            }
        } else {
            decode_tile_copy<HD>(kw, vw, k_cache, v_cache, table, block_size, kv_width, g, ts,
                                 end, lane);
            cp_async_wait_0();
        }
        __syncwarp();
        float sc[2][4];
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
            sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.0f;
            const bf16* krow = kw + (nt * 8 + gid) * LD + tig * 2;
#pragma unroll
            for (int kk = 0; kk < HD / 16; ++kk) {
                unsigned a[4] = {qf[kk][0], 0u, qf[kk][1], 0u};
                mma_bf16_16816(sc[nt], a, *(const unsigned*)(krow + kk * 16),
                               *(const unsigned*)(krow + kk * 16 + 8));
            }
        }
        // Row gid's scores of keys ts + nt*8 + 2*tig + i (i < 2); keys past the end masked.
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                int key = ts + nt * 8 + tig * 2 + i;
                float v = key < end ? sc[nt][i] * scale_log2 : -INFINITY;
                sc[nt][i] = v;
                mx = fmaxf(mx, v);
            }
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        float mn = fmaxf(m0, mx);  // finite: the tile's first key (ts < end) is visible
        float c = exp2f(m0 - mn);
        m0 = mn;
        float rs = 0.0f;
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
            sc[nt][0] = exp2f(sc[nt][0] - mn);
            sc[nt][1] = exp2f(sc[nt][1] - mn);
            rs += sc[nt][0] + sc[nt][1];
        }
        l0 = l0 * c + rs;
        unsigned pa[4] = {pack_bf2(sc[0][0], sc[0][1]), 0u, pack_bf2(sc[1][0], sc[1][1]), 0u};
#pragma unroll
        for (int nt = 0; nt < HD / 8; ++nt) {
            o[nt][0] *= c;
            o[nt][1] *= c;
        }
        pv_slice<HD>(o, pa, vw, LD, lane);
        __syncwarp();  // the tile's readers are done before the next copy overwrites it
    }
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    __syncthreads();  // every warp is done with its tile: the tiles' memory now holds O
    float* wo = (float*)kvs;  // DM_WARPS × 8 × HD floats fit in the tiles' bytes
    if (gid < group) {
#pragma unroll
        for (int nt = 0; nt < HD / 8; ++nt) {
            wo[(warp * 8 + gid) * HD + nt * 8 + tig * 2] = o[nt][0];
            wo[(warp * 8 + gid) * HD + nt * 8 + tig * 2 + 1] = o[nt][1];
        }
        if (tig == 0) {
            wm[warp][gid] = m0;
            wl[warp][gid] = l0;
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < group * HD; i += blockDim.x) {
        int h = i / HD, d = i % HD;
        float mx = -INFINITY;
#pragma unroll
        for (int w = 0; w < DM_WARPS; ++w) mx = fmaxf(mx, wm[w][h]);
        float num = 0.0f, den = 0.0f;
#pragma unroll
        for (int w = 0; w < DM_WARPS; ++w) {
            float e = wm[w][h] > -INFINITY ? exp2f(wm[w][h] - mx) : 0.0f;
            num += wo[(w * 8 + h) * HD + d] * e;
            den += wl[w][h] * e;
        }
        int qh = g * group + h;
        if (splits == 1) {
            out[(size_t)t * q_heads * HD + qh * HD + d] = f2bf(den > 0.0f ? num / den : 0.0f);
        } else {
            size_t part = ((size_t)t * q_heads + qh) * splits + s;
            ws_acc[part * HD + d] = num;
            if (d == 0) {
                ws_ml[2 * part] = mx;  // log2 units, like the merge below
                ws_ml[2 * part + 1] = den;
            }
        }
    }
    if (splits == 1) return;
    // Split-K: the last of the (token, KV head)'s split blocks to finish merges the partials
    // (no second launch). Each block publishes its partials before counting itself done; the
    // last one reads them past L1 (__ldcg: L1 is not coherent across SMs) and resets the
    // counter for the next layer.
    __shared__ int last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        int* c = done + (size_t)t * kv_heads + g;
        last = atomicAdd(c, 1) == splits - 1;
        if (last) *c = 0;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    __shared__ float pm[8 * 64], pl[8 * 64];  // (m, l) of group ≤ 8 heads × splits ≤ 64
    for (int i = threadIdx.x; i < group * splits; i += blockDim.x) {
        size_t part = ((size_t)t * q_heads + g * group + i / splits) * splits + i % splits;
        pm[i] = __ldcg(ws_ml + 2 * part);
        pl[i] = __ldcg(ws_ml + 2 * part + 1);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < group * HD; i += blockDim.x) {
        int h = i / HD, d = i % HD;
        size_t base = ((size_t)t * q_heads + g * group + h) * splits;
        float mx = -INFINITY;
        for (int p = 0; p < splits; ++p) mx = fmaxf(mx, pm[h * splits + p]);
        float num = 0.0f, den = 0.0f;
#pragma unroll 8
        for (int p = 0; p < splits; ++p) {
            float mp = pm[h * splits + p];
            float e = mp > -INFINITY ? exp2f(mp - mx) : 0.0f;
            num += __ldcg(ws_acc + (base + p) * HD + d) * e;
            den += pl[h * splits + p] * e;
        }
        out[(size_t)t * q_heads * HD + (g * group + h) * HD + d] = f2bf(den > 0.0f ? num / den : 0.0f);
    }
}

#define PAGED_DECODE(NAME, HD, STAGES)                                                         \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS, 3) NAME(                         \
        const bf16* qkv, const bf16* k_cache, const bf16* v_cache, bf16* out, float* ws_acc,   \
        float* ws_ml, const int* tok_list, const int* tok_seq, const int* tok_pos,             \
        const int* block_tables, int max_blocks, int block_size, int q_heads, int kv_heads,    \
        float scale_log2, int window, int* done) {                                             \
        paged_decode<HD, STAGES>(qkv, k_cache, v_cache, out, ws_acc, ws_ml, tok_list, tok_seq, tok_pos, \
                         block_tables, max_blocks, block_size, q_heads, kv_heads, scale_log2,  \
                         window, done);                                                        \
    }
PAGED_DECODE(paged_decode_16, 16, 1)
PAGED_DECODE(paged_decode_32, 32, 1)
PAGED_DECODE(paged_decode_64, 64, 1)
PAGED_DECODE(paged_decode_128, 128, 1)
PAGED_DECODE(paged_decode2_16, 16, 2)
PAGED_DECODE(paged_decode2_32, 32, 2)
PAGED_DECODE(paged_decode2_64, 64, 2)
PAGED_DECODE(paged_decode2_128, 128, 2)
