// Runs Vajra's plain CUDA C kernels (no inline PTX) on the host, so that their logic is tested on
// machines with no GPU. A block's threads are OS threads; `__syncthreads` is a barrier over the
// block and a warp shuffle a barrier over its warp's 32 lanes; `__shared__` arrays are statics
// (blocks run one after another). The float functions are the C library's, not CUDA's, so
// results agree with a GPU's up to the last bit of `expf`/`logf`: this checks algorithms, not
// rounding, register pressure or speed (those are NVRTC's, ptxas's and the GPU tests' job).
#pragma once

#include <array>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};

namespace host {
inline dim3 block_dim, grid_dim;
inline thread_local dim3 thread_idx, block_idx;
inline std::unique_ptr<std::barrier<>> block_barrier;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline std::vector<std::array<uint32_t, 32>> warp_words;

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
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                block_barrier = std::make_unique<std::barrier<>>(block.x);
                warp_barriers.clear();
                for (unsigned w = 0; w < warps; ++w)
                    warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
                std::vector<std::thread> threads;
                threads.reserve(block.x);
                for (unsigned t = 0; t < block.x; ++t)
                    threads.emplace_back([=] {
                        thread_idx = {t, 0, 0};
                        block_idx = {bx, by, bz};
                        kernel();
                    });
                for (auto& th : threads) th.join();
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

inline void __syncthreads() { host::block_barrier->arrive_and_wait(); }

// Every lane of the warp must call it (as every shuffle in kernels/ does: full mask).
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask) {
    static_assert(sizeof(T) == 4, "32-bit shuffles only");
    unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    host::warp_words[warp][lane] = bits;
    host::warp_barriers[warp]->arrive_and_wait();
    bits = host::warp_words[warp][lane ^ (unsigned)lane_mask];
    host::warp_barriers[warp]->arrive_and_wait();
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
