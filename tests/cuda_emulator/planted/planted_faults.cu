// Kernels with one planted fault each, to show that the emulator (../cuda_runtime.h) reports
// it. Built only for emulation, by tests/test_cuda_emulated.py. run_case(name) runs its case
// under both schedules (threads first to last, then last to first) and returns "ok", "nan" (an
// output read uninitialised shared memory), "schedules disagree" (a race) or the emulated
// runtime's error text.
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include <cuda_runtime.h>

namespace {

constexpr int THREADS = 64;

struct Plant {
  int overflow = 0, skip_store = 0, early_return = 0, race = 0;
};

// Each thread stores its id in shared memory and, after the barrier, reads its neighbour's.
__global__ void neighbours(float* out, Plant plant) {
  float* smem = static_cast<float*>(sba_emu::dynamic_shared_memory());
  const int t = threadIdx.x, next = (t + 1) % blockDim.x;
  if (plant.early_return && t == 0) return;
  if (!plant.skip_store) smem[t] = static_cast<float>(t);
  if (plant.overflow && t == 0) smem[blockDim.x] = 1.f;  // one float past the launch's bytes
  __syncthreads();
  if (plant.race) smem[t] += blockDim.x;  // the neighbour may read before or after this
  out[blockIdx.x * blockDim.x + t] = smem[next] - (plant.race ? blockDim.x : 0);
}

// One launch under the current schedule: the outputs, or the error text.
std::string launch(int blocks, int threads, size_t bytes, Plant plant, std::vector<float>& out) {
  out.assign(blocks * threads, -1.f);
  neighbours<<<blocks, threads, bytes>>>(out.data(), plant);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return cudaGetErrorString(err);
  for (int i = 0; i < blocks * threads; ++i) {
    if (std::isnan(out[i])) return "nan";
    if (out[i] != static_cast<float>((i % threads + 1) % threads)) return "wrong value at " + std::to_string(i);
  }
  return "ok";
}

std::string both_schedules(int blocks, int threads, size_t bytes, Plant plant) {
  std::vector<float> first, reversed;
  const std::string forward = launch(blocks, threads, bytes, plant, first);
  setenv("SBA_EMU_SCHEDULE", "reverse", 1);
  const std::string backward = launch(blocks, threads, bytes, plant, reversed);
  unsetenv("SBA_EMU_SCHEDULE");
  if (forward != backward || (forward == "ok" && first != reversed)) return "schedules disagree";
  return forward;
}

}  // namespace

extern "C" const char* run_case(const char* name) {
  static std::string result;
  const size_t bytes = THREADS * sizeof(float);
  const std::string c = name;
  if (c == "clean") result = both_schedules(4, THREADS, bytes, {});
  else if (c == "shared_overflow") result = both_schedules(2, THREADS, bytes, {.overflow = 1});
  else if (c == "divergent_barrier") result = both_schedules(1, THREADS, bytes, {.early_return = 1});
  else if (c == "too_much_shared") result = both_schedules(1, THREADS, 64 * 1024, {});  // no opt-in
  else if (c == "too_many_threads") result = both_schedules(1, 2048, bytes, {});
  else if (c == "uninitialized_shared") result = both_schedules(1, THREADS, bytes, {.skip_store = 1});
  else if (c == "race") result = both_schedules(2, THREADS, bytes, {.race = 1});
  else result = "unknown case";
  return result.c_str();
}
