// Sampling helpers on the device: the greedy token of each logits row (first maximum wins, as
// argmax does), so greedy steps copy one id per request back instead of a vocabulary of floats.
// Random sampling (temperature, top-k/top-p/min-p, penalties, seeds) runs on the host sampler
// over copied rows, so that it is bit-for-bit the CPU reference's.

extern "C" __global__ void argmax_rows(const float* logits, int vocab, int* out) {
    __shared__ float best_v[1024];
    __shared__ int best_i[1024];
    const float* row = logits + (size_t)blockIdx.x * vocab;
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float v = row[i];
        if (v > bv) { bv = v; bi = i; }
    }
    best_v[threadIdx.x] = bv;
    best_i[threadIdx.x] = bi;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) {
            float ov = best_v[threadIdx.x + stride];
            int oi = best_i[threadIdx.x + stride];
            if (ov > best_v[threadIdx.x] || (ov == best_v[threadIdx.x] && oi < best_i[threadIdx.x])) {
                best_v[threadIdx.x] = ov;
                best_i[threadIdx.x] = oi;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = best_i[0] == 0x7fffffff ? 0 : best_i[0];
}
