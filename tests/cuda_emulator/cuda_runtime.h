// A CPU stand-in for the parts of the CUDA runtime that csrc/ uses, so that CI, which has no
// GPU, can execute the CUDA C++ kernels and their torch binding (tests/test_cuda_emulated.py).
//
// The threads of a block are fibers on one CPU thread (ucontext). Each runs until its next
// __syncthreads or its end; then the next one runs, in the schedule's order, and round after
// round until all have returned. Blocks run one after another, each with its own dynamic
// shared memory buffer. Being cooperative, a run is deterministic for a given order, and the
// order is a knob: SBA_EMU_SCHEDULE=reverse runs each round's threads last to first. A kernel
// whose threads touch the same shared or global data between two barriers, one of them
// writing (a race), gives results that depend on that order, so running both orders and
// comparing bit for bit is this emulator's racecheck. It also checks:
// * launch configuration: threads per block, grid size, and dynamic shared memory against the
//   48 KB default and the opt-in limit of sm_80 (the smaller of the two targets);
// * shared memory: starts as NaN bytes (a read before any write poisons the output), and a
//   guard zone past the launch's size catches writes beyond it;
// * __syncthreads reached by some threads of a block after others returned (divergent barrier).
// It does not model warps, the memory model, or races between blocks (which run in order):
// compute-sanitizer on a GPU does that.
//
// The test rewrites each `kernel<<<grid, block, bytes, stream>>>(args)` of a .cu copy into
// `::sba_emu::Launch(grid, block, bytes, stream).run(kernel, args)` and compiles it as C++
// with -DSBA_CPU_EMULATION and this folder first on the include path.
#pragma once

#include <math.h>

#include <ucontext.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <map>
#include <mutex>
#include <string>
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

// The running emulated thread's coordinates (the scheduler sets them before each resume).
inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace sba_emu {

constexpr size_t kDefaultSharedBytes = 48 * 1024;
constexpr size_t kOptInSharedBytes = 163 * 1024;  // sm_80; sm_90 allows 227 KB
constexpr size_t kGuardBytes = 256;
constexpr size_t kStackBytes = 64 * 1024;  // per emulated thread; the kernels keep little on it
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

// One block: its threads as fibers, and its shared memory.
class Block {
 public:
  Block(unsigned threads, size_t shared_bytes, std::vector<std::vector<char>>& stacks)
      : fibers_(threads), stacks_(stacks), shared_bytes_(shared_bytes), shared_(shared_bytes + kGuardBytes, 0xFF) {
    std::fill(shared_.begin() + shared_bytes, shared_.end(), kGuardByte);
  }

  // Runs `body` as every thread of the block, round by round, each round in `order`.
  void run(const std::function<void()>& body, const std::vector<unsigned>& order) {
    body_ = &body;
    for (unsigned t = 0; t < fibers_.size(); ++t) {
      ucontext_t& c = fibers_[t].context;
      getcontext(&c);
      c.uc_stack.ss_sp = stacks_[t].data();
      c.uc_stack.ss_size = stacks_[t].size();
      c.uc_link = &scheduler_;
      makecontext(&c, &Block::start, 0);
    }
    for (;;) {
      unsigned waiting = 0, returned = 0;
      for (unsigned t : order) {
        if (fibers_[t].done) {
          ++returned;
          continue;
        }
        current_ = t;
        resume(t);
        fibers_[t].done ? ++returned : ++waiting;
      }
      if (waiting == 0) break;
      if (returned > 0) divergent_ = true;  // a barrier that some threads will never reach
    }
  }

  // __syncthreads: back to the scheduler until every live thread has reached it.
  void sync() { swapcontext(&fibers_[current_].context, &scheduler_); }

  void* shared() { return shared_.data(); }

  // What the block did wrong, or "".
  std::string fault() const {
    if (divergent_) return "__syncthreads reached after another thread of the block returned";
    for (size_t i = shared_bytes_; i < shared_.size(); ++i)
      if (shared_[i] != kGuardByte) return "a write past the end of the block's dynamic shared memory";
    return "";
  }

 private:
  struct Fiber {
    ucontext_t context;
    bool done = false;
  };

  void resume(unsigned t);
  static void start();

  std::vector<Fiber> fibers_;
  std::vector<std::vector<char>>& stacks_;
  ucontext_t scheduler_;
  unsigned current_ = 0;
  const std::function<void()>* body_ = nullptr;
  bool divergent_ = false;
  size_t shared_bytes_;
  std::vector<unsigned char> shared_;
};

inline thread_local Block* current_block = nullptr;

inline void Block::resume(unsigned t) {
  threadIdx = dim3(t % blockDim.x, t / blockDim.x % blockDim.y, t / (blockDim.x * blockDim.y));
  swapcontext(&scheduler_, &fibers_[t].context);
}

inline void Block::start() {  // a fiber's entry: the kernel body, then back to the scheduler
  Block* block = current_block;
  (*block->body_)();
  block->fibers_[block->current_].done = true;
}

// Each round's thread order: SBA_EMU_SCHEDULE=reverse runs last to first.
inline std::vector<unsigned> schedule(unsigned threads) {
  std::vector<unsigned> order(threads);
  for (unsigned t = 0; t < threads; ++t) order[t] = t;
  const char* env = std::getenv("SBA_EMU_SCHEDULE");
  if (env && std::string(env) == "reverse") std::reverse(order.begin(), order.end());
  return order;
}

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
    std::vector<std::vector<char>> stacks(threads, std::vector<char>(kStackBytes));
    const std::vector<unsigned> order = schedule(threads);
    blockDim = block_;
    gridDim = grid_;
    for (unsigned bz = 0; bz < grid_.z; ++bz)
      for (unsigned by = 0; by < grid_.y; ++by)
        for (unsigned bx = 0; bx < grid_.x; ++bx) {
          Block block(threads, shared_bytes_, stacks);
          blockIdx = dim3(bx, by, bz);
          current_block = &block;
          block.run([&] { kernel(args...); }, order);
          current_block = nullptr;
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
