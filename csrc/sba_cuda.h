// SBA CUDA kernels: the launch API shared by the .cu files and the torch binding.
//
// Layout (SPEC section 2): node tensors are [B, N, H, d] with the last dim contiguous and the
// other strides given in elements; index is int32 [P, M] (-1 in padding slots), lengths int32
// [P]. The bias, when present, is contiguous fp32 [Hb, P, M, M] with Hb = 1 (shared by heads) or H.
// Scores, softmax and accumulators are fp32 whatever the input type. These headers hold no
// torch types, so nvcc compiles the kernels without torch.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace sba {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// Strides of a [B, L, H, d] tensor, in elements (the last dim's is 1).
struct RowStrides {
  int64_t batch, row, head;
};

struct AttentionProblem {
  int batch, heads, nodes, parts, max_size, head_dim;
  float scale;
  const int32_t* index;    // [P, M]
  const int32_t* lengths;  // [P]
  const float* bias;       // [Hb, P, M, M] fp32, or nullptr
  int bias_heads;          // Hb: 1 or H
  DType dtype;
  cudaStream_t stream;
};

// o [B, N, H, d] and lse [B, H, N] (fp32, natural log) from q, k, v.
cudaError_t attention_forward(const AttentionProblem& p, const void* q, RowStrides sq, const void* k, RowStrides sk,
                              const void* v, RowStrides sv, void* o, RowStrides so, float* lse);

// dq, dk, dv (contiguous [B, N, H, d]) and, when dbias != nullptr, dbias (fp32, bias layout).
// delta is caller-provided scratch of B*H*N floats.
cudaError_t attention_backward(const AttentionProblem& p, const void* q, RowStrides sq, const void* k,
                               RowStrides sk, const void* v, RowStrides sv, const void* o, RowStrides so,
                               const void* dout, RowStrides sdo, const float* lse, float* delta, void* dq,
                               void* dk, void* dv, float* dbias);

// z [B, P, C] = per-subgraph mean of x [B, N, C] (row strides given; channels contiguous).
cudaError_t segment_mean_forward(const void* x, int64_t sx_batch, int64_t sx_row, void* z, int batch, int parts,
                                 int max_size, int channels, const int32_t* index, const int32_t* lengths,
                                 DType dtype, cudaStream_t stream);

// dx [B, N, C] (contiguous) = dz[b, part(i)] / n_part(i).
cudaError_t segment_mean_backward(const void* dz, int64_t sz_batch, int64_t sz_row, void* dx, int batch,
                                  int nodes, int channels, const int64_t* assignment, const int32_t* lengths,
                                  DType dtype, cudaStream_t stream);

}  // namespace sba
