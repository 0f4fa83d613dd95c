// Subgraph means and their gradient.
#include "dtype.cuh"

namespace sba {
namespace {

constexpr int THREADS = 128;

// One block per (part, batch); threads stride over channels, summing the part's rows in fp32.
template <typename T>
__global__ void mean_kernel(const T* x, int64_t sx_batch, int64_t sx_row, T* z, int parts, int max_size,
                            int channels, const int32_t* index, const int32_t* lengths) {
  const int part = blockIdx.x, b = blockIdx.y;
  const int length = lengths[part];
  const int32_t* rows = index + static_cast<int64_t>(part) * max_size;
  T* out = z + (static_cast<int64_t>(b) * parts + part) * channels;
  for (int c = threadIdx.x; c < channels; c += blockDim.x) {
    float acc = 0.f;
    for (int i = 0; i < length; ++i) acc += to_f(x[b * sx_batch + static_cast<int64_t>(rows[i]) * sx_row + c]);
    out[c] = from_f<T>(acc / length);
  }
}

// One thread per (batch, node, channel) of dx.
template <typename T>
__global__ void mean_grad_kernel(const T* dz, int64_t sz_batch, int64_t sz_row, T* dx, int nodes, int channels,
                                 int64_t total, const int64_t* assignment, const int32_t* lengths) {
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e >= total) return;
  const int c = e % channels;
  const int64_t n = (e / channels) % nodes;
  const int64_t b = e / (static_cast<int64_t>(channels) * nodes);
  const int64_t part = assignment[n];
  dx[e] = from_f<T>(to_f(dz[b * sz_batch + part * sz_row + c]) / lengths[part]);
}

}  // namespace

cudaError_t segment_mean_forward(const void* x, int64_t sx_batch, int64_t sx_row, void* z, int batch, int parts,
                                 int max_size, int channels, const int32_t* index, const int32_t* lengths,
                                 DType dtype, cudaStream_t stream) {
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    mean_kernel<T><<<dim3(parts, batch), THREADS, 0, stream>>>(static_cast<const T*>(x), sx_batch, sx_row,
                                                               static_cast<T*>(z), parts, max_size, channels, index,
                                                               lengths);
    return cudaGetLastError();
  });
}

cudaError_t segment_mean_backward(const void* dz, int64_t sz_batch, int64_t sz_row, void* dx, int batch,
                                  int nodes, int channels, const int64_t* assignment, const int32_t* lengths,
                                  DType dtype, cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(batch) * nodes * channels;
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    mean_grad_kernel<T><<<static_cast<unsigned>((total + 255) / 256), 256, 0, stream>>>(
        static_cast<const T*>(dz), sz_batch, sz_row, static_cast<T*>(dx), nodes, channels, total, assignment,
        lengths);
    return cudaGetLastError();
  });
}

}  // namespace sba
