// Torch binding of the SBA CUDA kernels: tensors in, launches through sba_cuda.h, tensors out.
// The Python side (sba_kernels/cuda_backend.py) checks arguments first with readable errors;
// the TORCH_CHECKs here guard the same contract for callers that come straight to C++.
#include <torch/extension.h>
#ifndef SBA_CPU_EMULATION
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "sba_cuda.h"

namespace {

// Where the kernels run. The emulation build (tests/cuda_emulator) runs this file and the
// kernels on the CPU over CPU tensors, so CI, which has no GPU, executes them; it also
// fills outputs with NaN so that an element no kernel writes shows up.
#ifdef SBA_CPU_EMULATION
bool on_kernel_device(const at::Tensor& t) { return t.is_cpu(); }
cudaStream_t current_stream() { return nullptr; }
struct DeviceGuard {
  explicit DeviceGuard(at::Device) {}
};
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::full(sizes, NAN, options);
}
#else
bool on_kernel_device(const at::Tensor& t) { return t.is_cuda(); }
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
using DeviceGuard = c10::cuda::CUDAGuard;
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) { return at::empty(sizes, options); }
#endif

sba::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return sba::DType::kFloat32;
    case at::kHalf: return sba::DType::kFloat16;
    case at::kBFloat16: return sba::DType::kBFloat16;
    default: TORCH_CHECK(false, "sba cuda: dtype must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

sba::RowStrides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

void check_rows(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(on_kernel_device(t) && t.dim() == 4 && t.stride(3) == 1, "sba cuda: ", name,
              " must be a CUDA [B, N, H, d] tensor with a contiguous last dim");
  TORCH_CHECK(t.sizes() == like.sizes() && t.scalar_type() == like.scalar_type(), "sba cuda: ", name,
              " must match q in shape and dtype");
}

sba::AttentionProblem problem(const at::Tensor& q, const at::Tensor& index, const at::Tensor& lengths,
                              const c10::optional<at::Tensor>& bias, double scale) {
  TORCH_CHECK(on_kernel_device(index) && index.scalar_type() == at::kInt && index.dim() == 2 && index.is_contiguous(),
              "sba cuda: index must be a contiguous CUDA int32 [P, M] tensor");
  TORCH_CHECK(on_kernel_device(lengths) && lengths.scalar_type() == at::kInt && lengths.numel() == index.size(0),
              "sba cuda: lengths must be a CUDA int32 [P] tensor");
  TORCH_CHECK(q.size(3) <= 128, "sba cuda: head dim must be <= 128");
  sba::AttentionProblem p{};
  p.batch = q.size(0);
  p.nodes = q.size(1);
  p.heads = q.size(2);
  p.head_dim = q.size(3);
  p.parts = index.size(0);
  p.max_size = index.size(1);
  p.scale = static_cast<float>(scale);
  p.index = index.data_ptr<int32_t>();
  p.lengths = lengths.data_ptr<int32_t>();
  p.dtype = dtype_of(q);
  p.stream = current_stream();
  p.bias = nullptr;
  p.bias_heads = 1;
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.is_contiguous() && b.scalar_type() == at::kFloat && b.dim() == 4 &&
                    b.size(1) == p.parts && b.size(2) == p.max_size && b.size(3) == p.max_size &&
                    (b.size(0) == 1 || b.size(0) == p.heads),
                "sba cuda: bias must be a contiguous float32 [1 or H, P, M, M] tensor");
    p.bias = b.data_ptr<float>();
    p.bias_heads = b.size(0);
  }
  return p;
}

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "sba cuda: ", what, " failed: ", cudaGetErrorString(err));
}

std::vector<at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const at::Tensor& index, const at::Tensor& lengths,
                                          const c10::optional<at::Tensor>& bias, double scale) {
  check_rows(q, "q", q);
  check_rows(k, "k", q);
  check_rows(v, "v", q);
  const DeviceGuard guard(q.device());
  const auto p = problem(q, index, lengths, bias, scale);
  auto o = new_output(q.sizes(), q.options());
  auto lse = new_output({p.batch, p.heads, p.nodes}, q.options().dtype(at::kFloat));
  check(sba::attention_forward(p, q.data_ptr(), strides_of(q), k.data_ptr(), strides_of(k), v.data_ptr(),
                               strides_of(v), o.data_ptr(), strides_of(o), lse.data_ptr<float>()),
        "attention forward");
  return {o, lse};
}

std::vector<at::Tensor> attention_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, const at::Tensor& o, const at::Tensor& lse,
                                           const at::Tensor& index, const at::Tensor& lengths,
                                           const c10::optional<at::Tensor>& bias, double scale, bool need_dbias) {
  for (auto [t, name] : {std::pair{&k, "k"}, {&v, "v"}, {&o, "o"}, {&dout, "dout"}}) check_rows(*t, name, q);
  TORCH_CHECK(!need_dbias || bias.has_value(), "sba cuda: need_dbias without a bias");
  const DeviceGuard guard(q.device());
  const auto p = problem(q, index, lengths, bias, scale);
  auto delta = new_output({p.batch, p.heads, p.nodes}, q.options().dtype(at::kFloat));
  auto dq = new_output(q.sizes(), q.options());
  auto dk = new_output(q.sizes(), q.options());
  auto dv = new_output(q.sizes(), q.options());
  // Padding entries never reach the scores: their gradient stays 0.
  auto dbias = need_dbias ? at::zeros(bias->sizes(), q.options().dtype(at::kFloat)) : at::empty({0}, q.options());
  check(sba::attention_backward(p, q.data_ptr(), strides_of(q), k.data_ptr(), strides_of(k), v.data_ptr(),
                                strides_of(v), o.data_ptr(), strides_of(o), dout.data_ptr(), strides_of(dout),
                                lse.data_ptr<float>(), delta.data_ptr<float>(), dq.data_ptr(), dk.data_ptr(),
                                dv.data_ptr(), need_dbias ? dbias.data_ptr<float>() : nullptr),
        "attention backward");
  return {dq, dk, dv, dbias};   // dbias fp32, like the bias the kernels read
}

at::Tensor segment_mean_forward(const at::Tensor& x, const at::Tensor& index, const at::Tensor& lengths) {
  TORCH_CHECK(on_kernel_device(x) && x.dim() == 3 && x.stride(2) == 1, "sba cuda: x must be a CUDA [B, N, C] tensor");
  const DeviceGuard guard(x.device());
  auto z = new_output({x.size(0), index.size(0), x.size(2)}, x.options());
  check(sba::segment_mean_forward(x.data_ptr(), x.stride(0), x.stride(1), z.data_ptr(), x.size(0), index.size(0),
                                  index.size(1), x.size(2), index.data_ptr<int32_t>(), lengths.data_ptr<int32_t>(),
                                  dtype_of(x), current_stream()),
        "segment mean forward");
  return z;
}

at::Tensor segment_mean_backward(const at::Tensor& dz, const at::Tensor& assignment, const at::Tensor& lengths) {
  TORCH_CHECK(on_kernel_device(dz) && dz.dim() == 3 && dz.stride(2) == 1, "sba cuda: dz must be a CUDA [B, P, C] tensor");
  TORCH_CHECK(assignment.scalar_type() == at::kLong, "sba cuda: assignment must be int64");
  const DeviceGuard guard(dz.device());
  auto dx = new_output({dz.size(0), assignment.size(0), dz.size(2)}, dz.options());
  check(sba::segment_mean_backward(dz.data_ptr(), dz.stride(0), dz.stride(1), dx.data_ptr(), dz.size(0),
                                   assignment.size(0), dz.size(2), assignment.data_ptr<int64_t>(),
                                   lengths.data_ptr<int32_t>(), dtype_of(dz), current_stream()),
        "segment mean backward");
  return dx;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "SBA CUDA C++ kernels (see sba_kernels/cuda_backend.py)";
  m.def("attention_forward", &attention_forward, "subgraph attention forward: (o, lse)");
  m.def("attention_backward", &attention_backward, "subgraph attention backward: (dq, dk, dv, dbias)");
  m.def("segment_mean_forward", &segment_mean_forward, "per-subgraph mean");
  m.def("segment_mean_backward", &segment_mean_backward, "gradient of the per-subgraph mean");
}
