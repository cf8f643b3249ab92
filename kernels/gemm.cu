// skinny_gemm_<NT> (v2): y[t][n] = x[t][k] · W[n][k]ᵀ for a few token rows (t ≤ 8·NT: decode
// steps), on tensor cores with the roles swapped: the weight's rows are the MMA's M side (16
// output features a tile), the tokens its N side (8 a tile), so no MMA lane idles on padding
// rows and every weight byte is read once with 16-byte loads. cuBLAS picks kernels tuned for
// square-ish shapes here and reaches 60–90 % of the copy bandwidth (measured on an H100).
//
// grid = (n / 16), block = 256 threads: the block's 8 warps share its 16 output features and
// split K between them (partial sums meet in shared memory). Many warps, because ptxas issues
// each warp's weight loads only a chunk or two ahead of their MMAs (seen in the SASS), so the
// bytes in flight per SM come from the number of warps. Per 32-wide K chunk each lane
// loads 8 consecutive k of weight rows gid and gid + 8 and of token row gid; a chunk is two
// m16n8k16 MMAs whose k order is permuted identically on both operands (logical k 2·tig, +1,
// +8, +9 of the first MMA are physical 8·tig .. 8·tig + 3, of the second 8·tig + 4 .. + 7), so
// each lane's 16-byte load is its whole fragment. Needs k % 32 == 0, n % 16 == 0, sm_80+.

#define SK_WARPS 8
#define SK_THREADS (SK_WARPS * 32)

__device__ __forceinline__ void sk_mma(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                       unsigned b0, unsigned b1) {
#if __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    __trap();
#endif
}

template <int NT, int U>
__device__ __forceinline__ void skinny_gemm(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                            bf16* __restrict__ y, int t, int k, int n) {
    __shared__ float part[SK_WARPS][16 * 8 * NT];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    int n0 = blockIdx.x * 16;
    const bf16* w0 = w + (size_t)(n0 + gid) * k + tig * 8;
    const bf16* w1 = w0 + (size_t)8 * k;
    float c[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) c[nt][0] = c[nt][1] = c[nt][2] = c[nt][3] = 0.0f;
    int chunks = k / 32, per = (chunks + SK_WARPS - 1) / SK_WARPS;
    int cb = warp * per, ce = min(chunks, cb + per);
    // Token rows past t load row t - 1 (valid memory; their sums are never written), so the
    // loads below carry no conditions and all U chunks' loads are in flight together.
    const bf16* xr[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) xr[nt] = x + (size_t)min(nt * 8 + gid, t - 1) * k + tig * 8;
    int ch = cb;
    for (; ch + U <= ce; ch += U) {
        uint4 a0[U], a1[U], xb[U][NT];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            size_t off = (size_t)(ch + u) * 32;
            a0[u] = *(const uint4*)(w0 + off);
            a1[u] = *(const uint4*)(w1 + off);
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) xb[u][nt] = *(const uint4*)(xr[nt] + off);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                sk_mma(c[nt], a0[u].x, a1[u].x, a0[u].y, a1[u].y, xb[u][nt].x, xb[u][nt].y);
                sk_mma(c[nt], a0[u].z, a1[u].z, a0[u].w, a1[u].w, xb[u][nt].z, xb[u][nt].w);
            }
        }
    }
    for (; ch < ce; ++ch) {
        size_t off = (size_t)ch * 32;
        uint4 a0 = *(const uint4*)(w0 + off), a1 = *(const uint4*)(w1 + off);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            uint4 xb = *(const uint4*)(xr[nt] + off);
            sk_mma(c[nt], a0.x, a1.x, a0.y, a1.y, xb.x, xb.y);
            sk_mma(c[nt], a0.z, a1.z, a0.w, a1.w, xb.z, xb.w);
        }
    }
    // c[nt][i]: feature gid (+8 for i ≥ 2), token nt·8 + 2·tig + (i & 1).
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            int f = gid + (i >> 1) * 8, tok = nt * 8 + tig * 2 + (i & 1);
            part[warp][f * 8 * NT + tok] = c[nt][i];
        }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < 16 * 8 * NT; e += SK_THREADS) {
        int f = e / (8 * NT), tok = e % (8 * NT);
        if (tok < t) {
            float v = 0.0f;
#pragma unroll
            for (int wi = 0; wi < SK_WARPS; ++wi) v += part[wi][e];
            y[(size_t)tok * n + n0 + f] = f2bf(v);
        }
    }
}

#define SKINNY_GEMM(NT, U)                                                                     \
    extern "C" __global__ void __launch_bounds__(SK_THREADS) skinny_gemm_##NT(                 \
        const bf16* x, const bf16* w, bf16* y, int t, int k, int n) {                          \
        skinny_gemm<NT, U>(x, w, y, t, k, n);                                                  \
    }
SKINNY_GEMM(1, 8)
SKINNY_GEMM(2, 4)
SKINNY_GEMM(4, 2)
