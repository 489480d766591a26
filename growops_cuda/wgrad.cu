// growops_cuda: the fp32 weight and bias gradient of one use of a linear layer, in one cuBLASLt call.
//
//   dW (out, in) = grad_out^T (out, N) @ x (N, in)      bf16/fp16 inputs, fp32 accumulation, fp32 output
//   db (out)     = sum over the N tokens of grad_out     fp32
//
// cuBLASLt's BGRADB epilogue reduces db during the GEMM's own pass over grad_out, so grad_out is read once instead
// of twice (GEMM, then a separate reduction). Where cuBLASLt offers no algorithm for that epilogue with fp32 output,
// the GEMM runs without it and db is a separate reduction. The Python side (growops/ops/extension.py) declares the
// op, checks this kernel against the reference once after building, and falls back to the reference on failure.

#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublasLt.h>

#include "wgrad_lt.h"

#include <tuple>

namespace {

constexpr size_t kWorkspaceBytes = 32u << 20;

// Which path produced the result, returned to Python for the benchmark and the tests.
enum Path : int64_t { kFusedEpilogue = 0, kGemmThenReduction = 1, kFailed = -1 };

cudaDataType_t cuda_type(at::ScalarType t) {
  TORCH_CHECK(t == at::kBFloat16 || t == at::kHalf, "growops_cuda.linear_wgrad: inputs must be bf16 or fp16, got ",
              t);
  return t == at::kBFloat16 ? CUDA_R_16BF : CUDA_R_16F;
}

// One cuBLASLt GEMM writing dw (and db through the epilogue when `bias` is non-null); false where cuBLASLt has no
// algorithm for this configuration, in which case nothing was written.
bool lt_wgrad(const at::Tensor& g, const at::Tensor& x, at::Tensor& dw, float* bias) {
  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  growops_cuda::WgradPlan plan;
  if (!growops_cuda::plan_wgrad(handle, cuda_type(x.scalar_type()), x.size(0), x.size(1), g.size(1), g.data_ptr(),
                                x.data_ptr(), dw.data_ptr<float>(), bias, kWorkspaceBytes, plan)) {
    return false;
  }
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(plan.heuristic.workspaceSize)}, x.options().dtype(at::kByte));
  return growops_cuda::run_wgrad(handle, plan, g.data_ptr(), x.data_ptr(), dw.data_ptr<float>(),
                                 workspace.data_ptr(), at::cuda::getCurrentCUDAStream());
}

// (dW fp32 (out, in), db fp32 (out,) or (0,), path). grad_out (N, out) and x (N, in): contiguous, same dtype.
std::tuple<at::Tensor, at::Tensor, int64_t> linear_wgrad(const at::Tensor& grad_out, const at::Tensor& x,
                                                         bool with_bias) {
  TORCH_CHECK(grad_out.is_cuda() && x.is_cuda(), "growops_cuda.linear_wgrad: CUDA tensors expected");
  TORCH_CHECK(grad_out.dim() == 2 && x.dim() == 2 && grad_out.size(0) == x.size(0),
              "growops_cuda.linear_wgrad: expected grad_out (N, out) and x (N, in), got ", grad_out.sizes(), " and ",
              x.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), "growops_cuda.linear_wgrad: dtypes differ: ",
              grad_out.scalar_type(), " and ", x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor g = grad_out.contiguous(), xc = x.contiguous();
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor dw = at::empty({g.size(1), xc.size(1)}, f32);
  at::Tensor db = at::empty({with_bias ? g.size(1) : 0}, f32);
  if (g.size(0) == 0) {  // no tokens: cuBLASLt rejects k = 0
    dw.zero_();
    db.zero_();
    return {dw, db, kGemmThenReduction};
  }
  if (with_bias && lt_wgrad(g, xc, dw, db.data_ptr<float>())) return {dw, db, kFusedEpilogue};
  if (!lt_wgrad(g, xc, dw, nullptr)) return {dw, db, kFailed};
  if (with_bias) db.copy_(g.sum({0}, /*keepdim=*/false, at::kFloat));
  return {dw, db, kGemmThenReduction};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear_wgrad", &linear_wgrad,
        "fp32 weight and bias gradient of a linear layer's use: (grad_out (N, out), x (N, in), with_bias) -> "
        "(dW, db, path) with path 0 = fused BGRADB epilogue, 1 = GEMM then reduction, -1 = no cuBLASLt algorithm");
}
