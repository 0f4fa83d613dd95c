// fp32 conversions for every input dtype, and the host-side dispatch over DType.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "sba_cuda.h"

namespace sba {

__device__ inline float to_f(float x) { return x; }
__device__ inline float to_f(__half x) { return __half2float(x); }
__device__ inline float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ inline T from_f(float x);
template <> __device__ inline float from_f<float>(float x) { return x; }
template <> __device__ inline __half from_f<__half>(float x) { return __float2half(x); }
template <> __device__ inline __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// The block's dynamic shared memory, as floats. The CPU emulation build (SBA_CPU_EMULATION,
// tests/cuda_emulator) hands each emulated block its own buffer of exactly the launch's size.
__device__ inline float* shared_floats() {
#ifdef SBA_CPU_EMULATION
  return static_cast<float*>(sba_emu::dynamic_shared_memory());
#else
  extern __shared__ float smem[];
  return smem;
#endif
}

// Calls launch(T{}) with T the C++ type of `dtype`.
template <typename F>
cudaError_t with_dtype(DType dtype, F&& launch) {
  switch (dtype) {
    case DType::kFloat32: return launch(float{});
    case DType::kFloat16: return launch(__half{});
    case DType::kBFloat16: return launch(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace sba
