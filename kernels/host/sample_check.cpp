// kernels/sample.cu on the host (cuda_host.hpp): `sample_check IN OUT THREADS` reads IN —
// u32 rows, u32 vocab, rows × vocab f32 logits, rows × 8 u32 sample_rows parameters (all
// little-endian) — runs sample_rows and argmax_rows over the rows with blocks of THREADS, and
// writes OUT: rows i32 tokens from sample_rows, then rows i32 from argmax_rows.
// crates/vajra-engine/src/backend/host_kernels.rs builds and drives it.
#include "cuda_host.hpp"

#include "../common.cuh"
#include "../sample.cu"

#include <fstream>
#include <iterator>

int main(int argc, char** argv) {
    if (argc != 4) {
        std::fprintf(stderr, "usage: sample_check IN OUT THREADS\n");
        return 2;
    }
    std::ifstream in(argv[1], std::ios::binary);
    std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    uint32_t head[2];
    if (bytes.size() < sizeof head) {
        std::fprintf(stderr, "%s: no header\n", argv[1]);
        return 2;
    }
    std::memcpy(head, bytes.data(), sizeof head);
    size_t rows = head[0], vocab = head[1];
    size_t want = sizeof head + 4 * (rows * vocab + rows * 8);
    if (bytes.size() != want) {
        std::fprintf(stderr, "%s: %zu bytes, want %zu\n", argv[1], bytes.size(), want);
        return 2;
    }
    std::vector<float> logits(rows * vocab);
    std::vector<unsigned> params(rows * 8);
    std::memcpy(logits.data(), bytes.data() + sizeof head, 4 * logits.size());
    std::memcpy(params.data(), bytes.data() + sizeof head + 4 * logits.size(), 4 * params.size());
    unsigned threads = (unsigned)std::atoi(argv[3]);
    std::vector<int> out(2 * rows);
    const float* l = logits.data();
    const unsigned* p = params.data();
    int* sampled = out.data();
    int* greedy = out.data() + rows;
    host::launch({(unsigned)rows}, {threads}, [=] { sample_rows(l, (int)vocab, p, sampled); });
    host::launch({(unsigned)rows}, {threads}, [=] { argmax_rows(l, (int)vocab, greedy); });
    std::ofstream o(argv[2], std::ios::binary);
    o.write(reinterpret_cast<const char*>(out.data()), 4 * out.size());
    return o.good() ? 0 : 1;
}
