// kernels/layers.cu on the host (cuda_host.hpp): v2's fused rope_kv_write against v1's rope then
// kv_write, which the GPU tests check against the CPU backend. For a few shapes (head dims 16 to
// 128, GQA groups 1 to 4) and tokens at scattered cache slots, one a padding row (slot −1, as a
// CUDA-graph decode step pads its batch): the rotated Q/K rows and both caches must be equal bit
// for bit, every cache slot no token names must keep what it held, and the caches must hold the
// token's rotated K and unrotated V. Prints one line per shape; exits 1 on the first mismatch.
// crates/vajra-engine/src/backend/host_kernels.rs builds and runs it.
#include "cuda_host.hpp"

#include "../common.cuh"
#include "../layers.cu"

namespace {

uint64_t state = 0x9e3779b97f4a7c15ull;
float next_uniform() { return host::uniform(state); }

int fail(const char* what, int q_heads, int kv_heads, int head_dim, size_t at) {
    std::fprintf(stderr, "layers_check (q %d, kv %d, head dim %d): %s differs at %zu\n", q_heads,
                 kv_heads, head_dim, what, at);
    return 1;
}

int check(int q_heads, int kv_heads, int head_dim) {
    const int tokens = 5, num_slots = 12;
    const int slots[tokens] = {5, -1, 0, 11, 7};
    const int pos[tokens] = {3, 0, 17, 250, 41};
    const int qkv_width = (q_heads + 2 * kv_heads) * head_dim, kv_width = kv_heads * head_dim;
    std::vector<bf16> qkv((size_t)tokens * qkv_width);
    for (auto& v : qkv) v = f2bf(4.0f * next_uniform() - 2.0f);
    std::vector<float> inv_freq(head_dim / 2);
    for (int i = 0; i < head_dim / 2; ++i)
        inv_freq[i] = 1.0f / std::pow(10000.0f, 2.0f * i / head_dim);
    const bf16 untouched = 0x7fc1;  // a NaN no kernel writes
    std::vector<bf16> qkv_a = qkv, qkv_b = qkv;
    std::vector<bf16> k_a((size_t)num_slots * kv_width, untouched), v_a = k_a, k_b = k_a, v_b = k_a;
    const unsigned pair_threads = (unsigned)((head_dim / 2 + 31) / 32 * 32);
    {
        bf16 *q = qkv_a.data(), *kc = k_a.data(), *vc = v_a.data();
        const int *ps = pos, *ss = slots;
        const float* f = inv_freq.data();
        host::launch({(unsigned)tokens, (unsigned)(q_heads + kv_heads)}, {pair_threads},
                     [=] { rope(q, ps, f, qkv_width, head_dim); });
        host::launch({(unsigned)tokens}, {64},
                     [=] { kv_write(q, kc, vc, ss, qkv_width, q_heads * head_dim, kv_width); });
    }
    {
        bf16 *q = qkv_b.data(), *kc = k_b.data(), *vc = v_b.data();
        const int *ps = pos, *ss = slots;
        const float* f = inv_freq.data();
        host::launch({(unsigned)tokens, (unsigned)(q_heads + 2 * kv_heads)}, {pair_threads}, [=] {
            rope_kv_write(q, ps, f, ss, kc, vc, qkv_width, q_heads, kv_heads, head_dim);
        });
    }
    for (size_t i = 0; i < qkv_a.size(); ++i)
        if (qkv_a[i] != qkv_b[i]) return fail("the rotated qkv row", q_heads, kv_heads, head_dim, i);
    for (size_t i = 0; i < k_a.size(); ++i) {
        if (k_a[i] != k_b[i]) return fail("the K cache", q_heads, kv_heads, head_dim, i);
        if (v_a[i] != v_b[i]) return fail("the V cache", q_heads, kv_heads, head_dim, i);
    }
    for (int s = 0; s < num_slots; ++s) {
        int t = -1;
        for (int j = 0; j < tokens; ++j)
            if (slots[j] == s) t = j;
        for (int i = 0; i < kv_width; ++i) {
            size_t at = (size_t)s * kv_width + i;
            bf16 want_k = t < 0 ? untouched : qkv_b[(size_t)t * qkv_width + q_heads * head_dim + i];
            bf16 want_v =
                t < 0 ? untouched : qkv[(size_t)t * qkv_width + (q_heads + kv_heads) * head_dim + i];
            if (k_b[at] != want_k) return fail("a K cache slot", q_heads, kv_heads, head_dim, at);
            if (v_b[at] != want_v) return fail("a V cache slot", q_heads, kv_heads, head_dim, at);
        }
    }
    // Rotation happened: position 0 keeps its row, the others moved.
    bool moved = false;
    for (int i = 0; i < qkv_width; ++i) moved |= qkv_b[(size_t)2 * qkv_width + i] != qkv[(size_t)2 * qkv_width + i];
    for (int i = 0; i < (q_heads + kv_heads) * head_dim; ++i)
        if (qkv_b[(size_t)1 * qkv_width + i] != qkv[(size_t)1 * qkv_width + i])
            return fail("a position-0 row (no rotation)", q_heads, kv_heads, head_dim, i);
    if (!moved) return fail("nothing rotated: token 2's row", q_heads, kv_heads, head_dim, 0);
    std::printf("rope_kv_write = rope + kv_write: q heads %d, kv heads %d, head dim %d\n", q_heads,
                kv_heads, head_dim);
    return 0;
}

}  // namespace

int main() {
    const int shapes[][3] = {{4, 1, 16}, {4, 2, 64}, {8, 2, 128}, {2, 2, 32}};
    for (auto& s : shapes)
        if (check(s[0], s[1], s[2])) return 1;
    return 0;
}
