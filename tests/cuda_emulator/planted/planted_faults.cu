// Kernels with one planted fault each, to show that the emulator (../cuda_runtime.h) reports
// it. Built only for emulation, by tests/test_cuda_emulated.py; run_case(name) returns "ok",
// "nan" (an output read uninitialised shared memory) or the emulated runtime's error text.
#include <cmath>
#include <cstring>
#include <string>

#include <cuda_runtime.h>

namespace {

constexpr int THREADS = 64;

// Each thread stores its id in shared memory and reads its neighbour's after the barrier.
__global__ void neighbours(float* out, int overflow, int skip_store, int early_return) {
  float* smem = static_cast<float*>(sba_emu::dynamic_shared_memory());
  const int t = threadIdx.x;
  if (early_return && t == 0) return;
  if (!skip_store) smem[t] = static_cast<float>(t);
  if (overflow && t == 0) smem[blockDim.x] = 1.f;  // one float past the launch's bytes
  __syncthreads();
  out[blockIdx.x * blockDim.x + t] = smem[(t + 1) % blockDim.x];
}

std::string launch(int blocks, int threads, size_t bytes, int overflow, int skip_store, int early_return) {
  float out[4 * THREADS];
  for (float& x : out) x = -1.f;
  neighbours<<<blocks, threads, bytes>>>(out, overflow, skip_store, early_return);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return cudaGetErrorString(err);
  for (int i = 0; i < blocks * threads; ++i) {
    if (std::isnan(out[i])) return "nan";
    if (out[i] != static_cast<float>((i % threads + 1) % threads)) return "wrong value at " + std::to_string(i);
  }
  return "ok";
}

}  // namespace

extern "C" const char* run_case(const char* name) {
  static std::string result;
  const size_t bytes = THREADS * sizeof(float);
  const std::string c = name;
  if (c == "clean") result = launch(4, THREADS, bytes, 0, 0, 0);
  else if (c == "shared_overflow") result = launch(2, THREADS, bytes, 1, 0, 0);
  else if (c == "divergent_barrier") result = launch(1, THREADS, bytes, 0, 0, 1);
  else if (c == "too_much_shared") result = launch(1, THREADS, 64 * 1024, 0, 0, 0);  // no opt-in
  else if (c == "too_many_threads") result = launch(1, 2048, bytes, 0, 0, 0);
  else if (c == "uninitialized_shared") result = launch(1, THREADS, bytes, 0, 1, 0);
  else result = "unknown case";
  return result.c_str();
}
