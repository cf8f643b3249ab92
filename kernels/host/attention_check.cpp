// kernels/attention.cu's v2 kernels on the host (cuda_host.hpp, which also emulates mma.sync,
// ldmatrix.trans and cp.async), against attention computed plainly in f32 over the same paged
// cache:
// - paged_decode_<HD> and paged_decode2_<HD> over decode tokens, a short chunk (causal within
//   it) and a CUDA-graph padding row (position 0, block 0), at 1, 3, 8 and 64 (the most) split-K
//   partitions, with and without a sliding window; the split counters must be back at 0 after
//   each launch; v1's paged_attention_scalar (+ attention_combine) the same way, also at a head
//   dim v2 has no kernel for (96);
// - flash_prefill_<HD> over chunks that start at 0 and past cached context, with and without a
//   window.
// Outputs are bf16 and P is rounded to bf16 before P·V (as on the GPU), so a value may differ
// from the f32 reference by 0.01 + 2 % of the row's largest magnitude. Prints one line per case;
// exits 1 on the first mismatch. crates/vajra-engine/src/backend/host_kernels.rs runs it.
#include "cuda_host.hpp"

#include "../common.cuh"
#include "../attention.cu"

#include <string>

namespace {

uint64_t state = 0x853c49e6748fea9bull;
float next_uniform() { return host::uniform(state); }

struct Cache {
    int q_heads, kv_heads, hd, block_size, num_blocks;
    std::vector<bf16> k, v;
    Cache(int qh, int kvh, int d, int bs, int nb)
        : q_heads(qh), kv_heads(kvh), hd(d), block_size(bs), num_blocks(nb),
          k((size_t)nb * bs * kvh * d), v(k.size()) {
        for (auto& x : k) x = f2bf(2.0f * next_uniform() - 1.0f);
        for (auto& x : v) x = f2bf(2.0f * next_uniform() - 1.0f);
    }
    int qkv_width() const { return (q_heads + 2 * kv_heads) * hd; }
};

// Attention of query row `q` (head qh) at position `pos` over keys [lo, pos] of `table`, in f32.
std::vector<float> reference(const Cache& c, const bf16* q, int qh, int pos, int window,
                             const int* table) {
    int g = qh / (c.q_heads / c.kv_heads), lo = window > 0 ? std::max(0, pos + 1 - window) : 0;
    float scale = 1.0f / std::sqrt((float)c.hd);
    std::vector<float> s;
    std::vector<size_t> rows;
    float mx = -INFINITY;
    for (int j = lo; j <= pos; ++j) {
        size_t slot = (size_t)table[j / c.block_size] * c.block_size + j % c.block_size;
        size_t row = (slot * c.kv_heads + g) * c.hd;
        float dot = 0.0f;
        for (int d = 0; d < c.hd; ++d) dot += bf2f(q[d]) * bf2f(c.k[row + d]);
        s.push_back(dot * scale);
        rows.push_back(row);
        mx = std::max(mx, dot * scale);
    }
    std::vector<float> out(c.hd, 0.0f);
    float den = 0.0f;
    for (size_t i = 0; i < s.size(); ++i) {
        float p = std::exp(s[i] - mx);
        den += p;
        for (int d = 0; d < c.hd; ++d) out[d] += p * bf2f(c.v[rows[i] + d]);
    }
    for (auto& x : out) x /= den;
    return out;
}

bool close(const char* what, const std::string& where, const bf16* got,
           const std::vector<float>& want) {
    float scale = 0.0f, worst = 0.0f;
    for (float w : want) scale = std::max(scale, std::fabs(w));
    for (size_t d = 0; d < want.size(); ++d) {
        float e = std::fabs(bf2f(got[d]) - want[d]);
        worst = std::max(worst, e);
        if (!(e <= 0.01f + 0.02f * scale)) {
            std::fprintf(stderr, "%s, %s: dim %zu is %g, want %g\n", what, where.c_str(), d,
                         bf2f(got[d]), want[d]);
            return false;
        }
    }
    return true;
}

using DecodeFn = void (*)(const bf16*, const bf16*, const bf16*, bf16*, float*, float*,
                          const int*, const int*, const int*, const int*, int, int, int, int,
                          float, int, int*);

// One decode launch's buffers and sizes.
struct DecodeArgs {
    const bf16 *qkv, *k_cache, *v_cache;
    bf16* out;
    float *ws_acc, *ws_ml;
    const int *list, *seq, *pos, *tables;
    int tokens, max_blocks, block_size, q_heads, kv_heads, hd, splits, window;
    int* done;
};

// v2: one paged_decode_<HD> launch (it merges its own splits).
std::function<void(const DecodeArgs&)> v2(DecodeFn kernel) {
    return [kernel](const DecodeArgs& a) {
        float scale_log2 = 1.4426950408889634f / std::sqrt((float)a.hd);
        host::launch({(unsigned)a.tokens, (unsigned)a.kv_heads, (unsigned)a.splits}, {128}, [=] {
            kernel(a.qkv, a.k_cache, a.v_cache, a.out, a.ws_acc, a.ws_ml, a.list, a.seq, a.pos,
                   a.tables, a.max_blocks, a.block_size, a.q_heads, a.kv_heads, scale_log2,
                   a.window, a.done);
        });
    };
}

// v1: paged_attention_scalar, then attention_combine when there are splits.
void v1(const DecodeArgs& a) {
    float scale = 1.0f / std::sqrt((float)a.hd);
    int qkv_width = (a.q_heads + 2 * a.kv_heads) * a.hd;
    host::launch({(unsigned)a.tokens, (unsigned)a.kv_heads, (unsigned)a.splits}, {ATT_THREADS},
                 [=] {
                     paged_attention_scalar(a.qkv, a.k_cache, a.v_cache, a.out, a.ws_acc,
                                            a.ws_ml, a.list, a.seq, a.pos, a.tables,
                                            a.max_blocks, a.block_size, a.q_heads, a.kv_heads,
                                            a.hd, qkv_width, scale, a.window);
                 });
    if (a.splits > 1)
        host::launch({(unsigned)a.tokens, (unsigned)a.q_heads}, {ATT_THREADS}, [=] {
            attention_combine(a.ws_acc, a.ws_ml, a.out, a.list, a.q_heads, a.hd, a.splits);
        });
}

// Decode-kernel case: four sequences, listed tokens = decodes, a 3-token chunk and a padding row,
// at each split count of `split_counts`.
bool check_decode(const char* name, std::function<void(const DecodeArgs&)> run, int q_heads,
                  int kv_heads, int hd, int window, std::vector<int> split_counts) {
    const int bs = 16, max_blocks = 20;
    Cache c(q_heads, kv_heads, hd, bs, 64);
    // Sequences' block tables: scattered blocks; sequence 3 is a padding row's (block 0).
    std::vector<int> tables(4 * max_blocks, 0);
    for (int s = 0; s < 3; ++s)
        for (int b = 0; b < max_blocks; ++b) tables[s * max_blocks + b] = (7 * b + 13 * s + 1) % 63 + 1;
    // Tokens: (sequence, position). Sequence 1's three tokens are a chunk.
    const int seqs[] = {0, 1, 1, 1, 2, 3}, pos[] = {300, 37, 38, 39, 5, 0};
    const int tokens = 6;
    std::vector<bf16> qkv((size_t)tokens * c.qkv_width());
    for (auto& x : qkv) x = f2bf(2.0f * next_uniform() - 1.0f);
    std::vector<int> list(tokens);
    for (int t = 0; t < tokens; ++t) list[t] = t;
    std::string counts;
    for (int splits : split_counts) {
        counts += (counts.empty() ? "" : "/") + std::to_string(splits);
        std::vector<bf16> out((size_t)tokens * q_heads * hd, 0);
        std::vector<float> ws_acc((size_t)tokens * q_heads * splits * hd, NAN);
        std::vector<float> ws_ml((size_t)tokens * q_heads * splits * 2, NAN);
        std::vector<int> done((size_t)tokens * kv_heads, 0);
        for (int rep = 0; rep < 2; ++rep) {  // twice: the counters must have been reset
            run({qkv.data(), c.k.data(), c.v.data(), out.data(), ws_acc.data(), ws_ml.data(),
                 list.data(), seqs, pos, tables.data(), tokens, max_blocks, bs, q_heads, kv_heads,
                 hd, splits, window, done.data()});
            for (int d : done)
                if (d != 0) {
                    std::fprintf(stderr, "%s: a split counter is %d after the launch\n", name, d);
                    return false;
                }
        }
        for (int t = 0; t < tokens; ++t)
            for (int qh = 0; qh < q_heads; ++qh) {
                auto want = reference(c, qkv.data() + (size_t)t * c.qkv_width() + qh * hd, qh,
                                      pos[t], window, tables.data() + seqs[t] * max_blocks);
                std::string where = "splits " + std::to_string(splits) + ", window " +
                                    std::to_string(window) + ", token " + std::to_string(t) +
                                    ", head " + std::to_string(qh);
                if (!close(name, where, out.data() + ((size_t)t * q_heads + qh) * hd, want))
                    return false;
            }
    }
    std::printf("%s matches f32 attention: q heads %d, kv heads %d, window %d, splits %s\n", name,
                q_heads, kv_heads, window, counts.c_str());
    return true;
}

using PrefillFn = void (*)(const bf16*, const bf16*, const bf16*, const int*, int, bf16*, int,
                           int, int, int, int, int, int, float);

// Prefill-kernel case: a chunk of `tq` queries from position `start` (rows from `first` on).
bool check_prefill(const char* name, PrefillFn kernel, int q_heads, int kv_heads, int hd, int tq,
                   int start, int window) {
    const int bs = 16, first = 3;
    Cache c(q_heads, kv_heads, hd, bs, 40);
    std::vector<int> table(40);
    for (int b = 0; b < 40; ++b) table[b] = (11 * b + 5) % 40;
    int rows = first + tq;
    std::vector<bf16> qkv((size_t)rows * c.qkv_width());
    for (auto& x : qkv) x = f2bf(2.0f * next_uniform() - 1.0f);
    std::vector<bf16> out((size_t)rows * q_heads * hd, 0);
    float scale_log2 = 1.4426950408889634f / std::sqrt((float)hd);
    {
        const bf16 *q = qkv.data(), *kc = c.k.data(), *vc = c.v.data();
        const int* tb = table.data();
        bf16* o = out.data();
        int qkv_w = c.qkv_width();
        host::launch({(unsigned)((tq + 63) / 64), (unsigned)q_heads}, {128}, [=] {
            kernel(q, kc, vc, tb, bs, o, first, tq, start, window, q_heads, kv_heads, qkv_w,
                   scale_log2);
        });
    }
    for (int i = 0; i < tq; ++i)
        for (int qh = 0; qh < q_heads; ++qh) {
            auto want = reference(c, qkv.data() + (size_t)(first + i) * c.qkv_width() + qh * hd,
                                  qh, start + i, window, table.data());
            std::string where = "start " + std::to_string(start) + ", window " +
                                std::to_string(window) + ", query " + std::to_string(i) +
                                ", head " + std::to_string(qh);
            if (!close(name, where, out.data() + ((size_t)(first + i) * q_heads + qh) * hd, want))
                return false;
        }
    std::printf("%s matches f32 attention: %d queries from position %d, q heads %d, kv heads %d, "
                "window %d\n",
                name, tq, start, q_heads, kv_heads, window);
    return true;
}

}  // namespace

int main() {
    bool ok = check_decode("paged_decode_64", v2(paged_decode_64), 8, 2, 64, 0, {1, 3, 8, 64}) &&
              check_decode("paged_decode_128", v2(paged_decode_128), 4, 1, 128, 0, {1, 3, 8}) &&
              check_decode("paged_decode2_32", v2(paged_decode2_32), 8, 1, 32, 0, {1, 3, 8}) &&
              check_decode("paged_decode_16", v2(paged_decode_16), 4, 2, 16, 40, {1, 3, 8}) &&
              check_decode("paged_attention_scalar (v1)", v1, 8, 2, 64, 0, {1, 5}) &&
              check_decode("paged_attention_scalar (v1)", v1, 4, 4, 96, 40, {1, 3}) &&
              check_prefill("flash_prefill_64", flash_prefill_64, 4, 2, 64, 70, 0, 0) &&
              check_prefill("flash_prefill_32", flash_prefill_32, 2, 1, 32, 90, 150, 0) &&
              check_prefill("flash_prefill_128", flash_prefill_128, 2, 2, 128, 20, 60, 0) &&
              check_prefill("flash_prefill_16", flash_prefill_16, 4, 1, 16, 100, 30, 48);
    return ok ? 0 : 1;
}
