// Runs Vajra's CUDA C kernels on the host, so that their logic is tested on machines with no
// GPU. A block's threads are fibers (ucontext) on one OS thread, switched at barriers:
// `__syncthreads` waits for the block, `__syncwarp` and every warp-wide instruction (shuffles,
// and the emulated mma.sync / ldmatrix of attention.cu) for the warp's 32 lanes; `__shared__`
// arrays are statics (blocks run one after another). A barrier that can never be passed (a
// thread gone before it) aborts with a message instead of hanging. The float functions are
// the C library's, not CUDA's, and products are summed in another order than tensor cores do,
// so results agree with a GPU's up to rounding: this checks algorithms, not rounding, register
// pressure or speed (those are NVRTC's, ptxas's and the GPU tests' job).
#pragma once

#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#include <ucontext.h>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};

namespace host {
inline dim3 block_dim, grid_dim, thread_idx, block_idx;

// A barrier over `expected` threads; `gen` counts the times it opened.
struct Barrier {
    unsigned expected = 0, arrived = 0;
    uint64_t gen = 0;
};

struct Fiber {
    ucontext_t ctx;
    std::unique_ptr<char[]> stack;
    bool done = false;
    int waits_on = -1;  // barrier index (0: the block's, 1 + w: warp w's), or -1
    uint64_t gen = 0;   // that barrier's generation when this fiber arrived
};

constexpr size_t STACK = 128 << 10;
inline std::vector<Fiber> fibers;
inline std::vector<Barrier> barriers;  // the block's, then one per warp
inline ucontext_t scheduler;
inline int running = -1;
inline std::function<void()> body;
inline std::vector<std::array<uint32_t, 32>> warp_words;
// Per warp, up to 8 words from each lane: the operands of a warp-wide instruction.
inline std::vector<std::array<uint32_t, 32 * 8>> warp_operands;

inline void wait_at(int index) {
    Barrier& b = barriers[index];
    if (++b.arrived == b.expected) {
        b.arrived = 0;
        ++b.gen;
        return;
    }
    Fiber& f = fibers[running];
    f.waits_on = index;
    f.gen = b.gen;
    swapcontext(&f.ctx, &scheduler);
}

inline void fiber_main() {
    body();
    fibers[running].done = true;  // uc_link returns to the scheduler
}

// Test data: a uniform number in [0, 1) from an xorshift64 stream.
inline float uniform(uint64_t& state) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return (float)(state >> 40) / 16777216.0f;
}

// Runs `kernel()` over `grid` × `block` threads (block.x a multiple of 32; y and z of the block
// must be 1), a block at a time.
template <class F>
void launch(dim3 grid, dim3 block, F kernel) {
    if (block.x == 0 || block.x % 32 != 0 || block.y != 1 || block.z != 1) {
        std::fprintf(stderr, "host launch: block must be (32·n, 1, 1)\n");
        std::exit(2);
    }
    grid_dim = grid;
    block_dim = block;
    unsigned warps = block.x / 32;
    warp_words.assign(warps, {});
    warp_operands.assign(warps, {});
    if (fibers.size() < block.x) fibers.resize(block.x);
    body = kernel;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                block_idx = {bx, by, bz};
                barriers.assign(1 + warps, {});
                barriers[0].expected = block.x;
                for (unsigned w = 0; w < warps; ++w) barriers[1 + w].expected = 32;
                for (unsigned t = 0; t < block.x; ++t) {
                    Fiber& f = fibers[t];
                    if (!f.stack) f.stack.reset(new char[STACK]);
                    getcontext(&f.ctx);
                    f.ctx.uc_stack.ss_sp = f.stack.get();
                    f.ctx.uc_stack.ss_size = STACK;
                    f.ctx.uc_link = &scheduler;
                    makecontext(&f.ctx, fiber_main, 0);
                    f.done = false;
                    f.waits_on = -1;
                }
                unsigned live = block.x;
                while (live > 0) {
                    bool moved = false;
                    for (unsigned t = 0; t < block.x; ++t) {
                        Fiber& f = fibers[t];
                        if (f.done || (f.waits_on >= 0 && barriers[f.waits_on].gen == f.gen))
                            continue;
                        f.waits_on = -1;
                        running = (int)t;
                        thread_idx = {t, 0, 0};
                        swapcontext(&scheduler, &f.ctx);
                        moved = true;
                        if (f.done) --live;
                    }
                    if (!moved) {
                        std::fprintf(stderr,
                                     "host launch: block (%u, %u, %u) is stuck: %u threads wait at "
                                     "a barrier that some thread will never reach\n",
                                     bx, by, bz, live);
                        std::abort();
                    }
                }
            }
}
}  // namespace host

#define threadIdx host::thread_idx
#define blockIdx host::block_idx
#define blockDim host::block_dim
#define gridDim host::grid_dim
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

inline void __syncthreads() { host::wait_at(0); }

// Every lane of the warp must call it (as every shuffle in kernels/ does: full mask).
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask) {
    static_assert(sizeof(T) == 4, "32-bit shuffles only");
    unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    host::warp_words[warp][lane] = bits;
    host::wait_at(1 + warp);
    bits = host::warp_words[warp][lane ^ (unsigned)lane_mask];
    host::wait_at(1 + warp);
    T out;
    std::memcpy(&out, &bits, 4);
    return out;
}

inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline float __int_as_float(int i) { return __uint_as_float((unsigned)i); }
inline unsigned __umulhi(unsigned a, unsigned b) {
    return (unsigned)(((unsigned long long)a * b) >> 32);
}
inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }

inline void __syncwarp() { host::wait_at(1 + (threadIdx.x >> 5)); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
[[noreturn]] inline void __trap() { std::abort(); }
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
template <class T>
inline T __ldcg(const T* p) {
    return *p;
}

// ---- attention.cu's tensor-core and async-copy instructions (VAJRA_HOST leaves them out) ----
#define VAJRA_HOST 1

// paged_decode's dynamic shared memory (blocks run one at a time).
alignas(16) inline unsigned char decode_smem[232448];

namespace host {
// Shared-memory "addresses" are 32-bit offsets from this byte (the statics standing in for
// shared memory all lie within a few MB of it).
inline char smem_anchor;
inline void* smem_ptr(unsigned addr) {
    return (void*)((uintptr_t)&smem_anchor + (uintptr_t)(intptr_t)(int32_t)addr);
}
inline float bf16_bits(uint32_t h) { return __uint_as_float((h & 0xffffu) << 16); }

// Every lane of the warp hands in `n` words; returns the warp's operands (lane l's word i at
// [8 l + i]) once all have. Call `operands_done` when they have been read.
inline const std::array<uint32_t, 32 * 8>& publish(const uint32_t* words, int n) {
    unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int i = 0; i < n; ++i) warp_operands[warp][8 * lane + i] = words[i];
    wait_at(1 + warp);
    return warp_operands[warp];
}
inline void operands_done() { wait_at(1 + (threadIdx.x >> 5)); }
}  // namespace host

inline unsigned smem_addr(const void* p) {
    return (unsigned)(uint32_t)((uintptr_t)p - (uintptr_t)&host::smem_anchor);
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, c += A·B, with the PTX ISA's fragment
// layout (lane = 4 g + t): a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..], a[2] = A[g][2t+8..],
// a[3] = A[g+8][2t+8..]; b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]; c = C[g][2t], C[g][2t+1],
// C[g+8][2t], C[g+8][2t+1]. Products summed in f32.
inline void mma_bf16_16816(float* c, const unsigned* a, unsigned b0, unsigned b1) {
    const uint32_t mine[6] = {a[0], a[1], a[2], a[3], b0, b1};
    const auto& ops = host::publish(mine, 6);
    auto A = [&](int row, int col) {
        uint32_t w = ops[8 * ((row & 7) * 4 + ((col & 7) >> 1)) + (row >> 3) + 2 * (col >> 3)];
        return host::bf16_bits((col & 1) ? w >> 16 : w);
    };
    auto B = [&](int k, int n) {
        uint32_t w = ops[8 * (n * 4 + ((k & 7) >> 1)) + 4 + (k >> 3)];
        return host::bf16_bits((k & 1) ? w >> 16 : w);
    };
    int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    float d[4];
    for (int i = 0; i < 4; ++i) {
        int row = g + (i >> 1) * 8, col = 2 * t + (i & 1);
        float acc = 0.0f;
        for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
        d[i] = c[i] + acc;
    }
    host::operands_done();
    for (int i = 0; i < 4; ++i) c[i] = d[i];
}

// ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16: lanes 8j..8j+7 give the row addresses of
// matrix j; lane i receives {M_j[2(i%4)][i/4], M_j[2(i%4)+1][i/4]} of each.
inline void ldmatrix_x4_trans(unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2,
                              unsigned& r3) {
    const uint32_t mine[1] = {addr};
    const auto& ops = host::publish(mine, 1);
    int lane = threadIdx.x & 31;
    unsigned r[4];
    for (int j = 0; j < 4; ++j) {
        auto m = [&](int row, int col) {
            const uint16_t* p = (const uint16_t*)host::smem_ptr(ops[8 * (8 * j + row)]);
            return (uint32_t)p[col];
        };
        int row = 2 * (lane % 4), col = lane / 4;
        r[j] = m(row, col) | (m(row + 1, col) << 16);
    }
    host::operands_done();
    r0 = r[0];
    r1 = r[1];
    r2 = r[2];
    r3 = r[3];
}

// cp.async.cg.shared.global, 16 bytes (zeros when !ok): done at once on the host, so the
// commit and wait instructions have nothing left to wait for.
inline void cp_async16(unsigned dst, const void* src, bool ok) {
    if (ok)
        std::memcpy(host::smem_ptr(dst), src, 16);
    else
        std::memset(host::smem_ptr(dst), 0, 16);
}
inline void cp_async_commit() {}
inline void cp_async_wait_1() {}
inline void cp_async_wait_0() {}
