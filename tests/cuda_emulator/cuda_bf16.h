// CPU stand-in for cuda_bf16.h (see cuda_runtime.h here): bfloat16 as the top half of a float.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = static_cast<uint32_t>(b.bits) << 16;
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

inline __nv_bfloat16 __float2bfloat16(float x) {  // round to nearest even, as the device intrinsic
  if (std::isnan(x)) return {0x7FC0};
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  u += 0x7FFF + ((u >> 16) & 1);
  return {static_cast<uint16_t>(u >> 16)};
}
