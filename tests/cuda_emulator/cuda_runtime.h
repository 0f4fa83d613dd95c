// A CPU stand-in for the parts of the CUDA runtime that csrc/ uses, so that CI, which has no
// GPU, can execute the CUDA C++ kernels and their torch binding (tests/test_cuda_emulated.py).
//
// Each block of a launch runs on its own set of CPU threads, one per CUDA thread, with a real
// barrier for __syncthreads and its own dynamic shared memory buffer; blocks run one after
// another. What it checks beyond the numbers:
// * launch configuration: threads per block, grid size, and dynamic shared memory against the
//   48 KB default and the opt-in limit of sm_80 (the smaller of the two targets);
// * shared memory: starts as NaN bytes (a read before any write poisons the output), and a
//   guard zone past the launch's size catches writes beyond it;
// * __syncthreads reached after another thread of the block has returned (divergent barrier).
// It does not model warps, the memory model or races between blocks: compute-sanitizer on a
// GPU does that.
//
// The test rewrites each `kernel<<<grid, block, bytes, stream>>>(args)` of a .cu copy into
// `::sba_emu::Launch(grid, block, bytes, stream).run(kernel, args)` and compiles it as C++
// with -DSBA_CPU_EMULATION and this folder first on the include path.
#pragma once

#include <math.h>

#include <algorithm>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct CUstream_st;
using cudaStream_t = CUstream_st*;

// Each emulated thread's coordinates (set before the kernel body runs).
inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace sba_emu {

constexpr size_t kDefaultSharedBytes = 48 * 1024;
constexpr size_t kOptInSharedBytes = 163 * 1024;  // sm_80; sm_90 allows 227 KB
constexpr size_t kGuardBytes = 256;
constexpr unsigned char kGuardByte = 0xA5;

// The error state: the last launch's error and a message saying what went wrong.
struct State {
  std::mutex lock;
  cudaError_t last = cudaSuccess;
  std::string message;
  std::map<const void*, size_t> shared_limit;  // kernel -> opt-in dynamic shared memory
};
inline State& state() {
  static State s;
  return s;
}

inline void fail(cudaError_t err, const std::string& message) {
  std::lock_guard<std::mutex> hold(state().lock);
  if (state().last == cudaSuccess) {
    state().last = err;
    state().message = message;
  }
}

// One block's barrier and shared memory.
class Block {
 public:
  Block(unsigned threads, size_t shared_bytes)
      : expected_(threads), threads_(threads), shared_bytes_(shared_bytes), shared_(shared_bytes + kGuardBytes, 0xFF) {
    std::fill(shared_.begin() + shared_bytes, shared_.end(), kGuardByte);
  }

  void sync() {
    std::unique_lock<std::mutex> hold(lock_);
    if (expected_ != threads_) divergent_ = true;
    const long generation = generation_;
    if (++arrived_ >= expected_) {
      release();
    } else {
      wake_.wait(hold, [&] { return generation_ != generation; });
    }
  }

  // A thread returned from the kernel: later barriers no longer wait for it.
  void leave() {
    std::lock_guard<std::mutex> hold(lock_);
    if (arrived_ > 0) divergent_ = true;  // others wait at a barrier this thread never reaches
    --expected_;
    if (arrived_ > 0 && arrived_ >= expected_) release();
  }

  void* shared() { return shared_.data(); }

  // What the block did wrong, or "" (checked after every thread has returned).
  std::string fault() const {
    if (divergent_) return "__syncthreads reached after another thread of the block returned";
    for (size_t i = shared_bytes_; i < shared_.size(); ++i)
      if (shared_[i] != kGuardByte) return "a write past the end of the block's dynamic shared memory";
    return "";
  }

 private:
  void release() {  // lock_ held
    arrived_ = 0;
    ++generation_;
    wake_.notify_all();
  }

  std::mutex lock_;
  std::condition_variable wake_;
  unsigned expected_, threads_;
  unsigned arrived_ = 0;
  long generation_ = 0;
  bool divergent_ = false;
  size_t shared_bytes_;
  std::vector<unsigned char> shared_;
};

inline thread_local Block* current_block = nullptr;

inline void* dynamic_shared_memory() { return current_block->shared(); }

// A kernel launch: check the configuration as the runtime would, then run block by block.
class Launch {
 public:
  Launch(dim3 grid, dim3 block, size_t shared_bytes = 0, cudaStream_t = nullptr)
      : grid_(grid), block_(block), shared_bytes_(shared_bytes) {}

  template <typename... Params, typename... Args>
  void run(void (*kernel)(Params...), Args... args) {  // by value: arrays decay, as in a launch
    const unsigned threads = block_.x * block_.y * block_.z;
    if (threads == 0 || threads > 1024 || grid_.x == 0 || grid_.y == 0 || grid_.z == 0 || grid_.y > 65535 ||
        grid_.z > 65535)
      return fail(cudaErrorInvalidConfiguration, "invalid launch configuration");
    if (shared_bytes_ > shared_limit(reinterpret_cast<const void*>(kernel)))
      return fail(cudaErrorInvalidValue, "dynamic shared memory over the kernel's limit (" +
                                             std::to_string(shared_bytes_) + " bytes)");
    for (unsigned bz = 0; bz < grid_.z; ++bz)
      for (unsigned by = 0; by < grid_.y; ++by)
        for (unsigned bx = 0; bx < grid_.x; ++bx) {
          Block block(threads, shared_bytes_);
          std::vector<std::thread> team;
          team.reserve(threads);
          for (unsigned t = 0; t < threads; ++t)
            team.emplace_back([&, t] {
              threadIdx = dim3(t % block_.x, t / block_.x % block_.y, t / (block_.x * block_.y));
              blockIdx = dim3(bx, by, bz);
              blockDim = block_;
              gridDim = grid_;
              current_block = &block;
              kernel(args...);
              block.leave();
            });
          for (auto& th : team) th.join();
          if (const std::string fault = block.fault(); !fault.empty())
            return fail(cudaErrorLaunchFailure, "block (" + std::to_string(bx) + ", " + std::to_string(by) + "): " +
                                                    fault);
        }
  }

 private:
  static size_t shared_limit(const void* kernel) {
    std::lock_guard<std::mutex> hold(state().lock);
    const auto it = state().shared_limit.find(kernel);
    return it == state().shared_limit.end() ? kDefaultSharedBytes : it->second;
  }

  dim3 grid_, block_;
  size_t shared_bytes_;
};

}  // namespace sba_emu

inline void __syncthreads() { sba_emu::current_block->sync(); }

template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel kernel, cudaFuncAttribute attribute, int value) {
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<size_t>(value) > sba_emu::kOptInSharedBytes)
    return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> hold(sba_emu::state().lock);
  sba_emu::state().shared_limit[reinterpret_cast<const void*>(kernel)] = static_cast<size_t>(value);
  return cudaSuccess;
}

inline cudaError_t cudaGetLastError() {
  std::lock_guard<std::mutex> hold(sba_emu::state().lock);
  const cudaError_t err = sba_emu::state().last;
  sba_emu::state().last = cudaSuccess;
  return err;
}

inline const char* cudaGetErrorString(cudaError_t) {
  static thread_local std::string text;
  std::lock_guard<std::mutex> hold(sba_emu::state().lock);
  text = "emulated CUDA error: " + sba_emu::state().message;
  return text.c_str();
}
