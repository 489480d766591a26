// growops_cuda/wgrad_lt.h: the cuBLASLt GEMM behind linear_wgrad, free of torch so it compiles (and can be
// checked) with the CUDA toolkit and cuBLAS headers alone. See wgrad.cu for the op around it.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace growops_cuda {

struct LtDescriptors {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  ~LtDescriptors() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

// A planned GEMM: descriptors and the algorithm cuBLASLt chose, and the workspace it needs.
struct WgradPlan {
  LtDescriptors h;
  cublasLtMatmulHeuristicResult_t heuristic = {};
};

// The largest power of two (at most 256) that divides the address: what cuBLASLt may assume about a pointer.
inline uint32_t pointer_alignment(const void* p) {
  const uintptr_t address = reinterpret_cast<uintptr_t>(p);
  uint32_t alignment = 1;
  while (alignment < 256 && address % (2 * alignment) == 0) alignment *= 2;
  return alignment;
}

// Plans dW = grad_out^T @ x in fp32 from `type` (CUDA_R_16BF or CUDA_R_16F) inputs; with `bias` non-null the
// BGRADB epilogue writes db (fp32, one per output feature) there. The pointers are only inspected for their
// alignment (a contiguous view may start mid-allocation; cuBLASLt otherwise assumes 256 bytes). Returns false
// where cuBLASLt has no algorithm.
//
// Column-major view of the row-major tensors: x (N, in) is A = (in x N), ld in; grad_out (N, out) is
// B = (out x N), ld out, used transposed; dW (out, in) is D = (in x out), ld in. So D = A @ B^T with m = in,
// n = out, k = N, and BGRADB reduces op(B) over k: one value per column of D, i.e. per output feature.
inline bool plan_wgrad(cublasLtHandle_t handle, cudaDataType_t type, int64_t tokens, int64_t in, int64_t out,
                       const void* grad_out, const void* x, const float* dw, float* bias, size_t max_workspace,
                       WgradPlan& plan) {
  LtDescriptors& h = plan.h;
  if (cublasLtMatmulDescCreate(&h.op, CUBLAS_COMPUTE_32F, CUDA_R_32F) != CUBLAS_STATUS_SUCCESS) return false;
  const cublasOperation_t trans_a = CUBLAS_OP_N, trans_b = CUBLAS_OP_T;
  if (cublasLtMatmulDescSetAttribute(h.op, CUBLASLT_MATMUL_DESC_TRANSA, &trans_a, sizeof(trans_a)) !=
          CUBLAS_STATUS_SUCCESS ||
      cublasLtMatmulDescSetAttribute(h.op, CUBLASLT_MATMUL_DESC_TRANSB, &trans_b, sizeof(trans_b)) !=
          CUBLAS_STATUS_SUCCESS) {
    return false;
  }
  if (bias != nullptr) {
    const cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_BGRADB;
    const cudaDataType_t bias_type = CUDA_R_32F;
    if (cublasLtMatmulDescSetAttribute(h.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)) !=
            CUBLAS_STATUS_SUCCESS ||
        cublasLtMatmulDescSetAttribute(h.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)) !=
            CUBLAS_STATUS_SUCCESS ||
        cublasLtMatmulDescSetAttribute(h.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type, sizeof(bias_type)) !=
            CUBLAS_STATUS_SUCCESS) {
      return false;
    }
  }
  if (cublasLtMatrixLayoutCreate(&h.a, type, in, tokens, in) != CUBLAS_STATUS_SUCCESS ||
      cublasLtMatrixLayoutCreate(&h.b, type, out, tokens, out) != CUBLAS_STATUS_SUCCESS ||
      cublasLtMatrixLayoutCreate(&h.d, CUDA_R_32F, in, out, in) != CUBLAS_STATUS_SUCCESS ||
      cublasLtMatmulPreferenceCreate(&h.pref) != CUBLAS_STATUS_SUCCESS) {
    return false;
  }
  if (cublasLtMatmulPreferenceSetAttribute(h.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &max_workspace,
                                           sizeof(max_workspace)) != CUBLAS_STATUS_SUCCESS) {
    return false;
  }
  // A is x, B is grad_out, C and D are dw.
  const uint32_t align_a = pointer_alignment(x), align_b = pointer_alignment(grad_out), align_d = pointer_alignment(dw);
  if (cublasLtMatmulPreferenceSetAttribute(h.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_a,
                                           sizeof(align_a)) != CUBLAS_STATUS_SUCCESS ||
      cublasLtMatmulPreferenceSetAttribute(h.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_b,
                                           sizeof(align_b)) != CUBLAS_STATUS_SUCCESS ||
      cublasLtMatmulPreferenceSetAttribute(h.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_d,
                                           sizeof(align_d)) != CUBLAS_STATUS_SUCCESS ||
      cublasLtMatmulPreferenceSetAttribute(h.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_d,
                                           sizeof(align_d)) != CUBLAS_STATUS_SUCCESS) {
    return false;
  }
  int found = 0;
  return cublasLtMatmulAlgoGetHeuristic(handle, h.op, h.a, h.b, h.d, h.d, h.pref, 1, &plan.heuristic, &found) ==
             CUBLAS_STATUS_SUCCESS &&
         found > 0;
}

// Runs a planned GEMM: dw = grad_out^T @ x (beta = 0: dw is overwritten, never accumulated into).
inline bool run_wgrad(cublasLtHandle_t handle, const WgradPlan& plan, const void* grad_out, const void* x, float* dw,
                      void* workspace, cudaStream_t stream) {
  const float alpha = 1.0f, beta = 0.0f;
  return cublasLtMatmul(handle, plan.h.op, &alpha, x, plan.h.a, grad_out, plan.h.b, &beta, dw, plan.h.d, dw,
                        plan.h.d, &plan.heuristic.algo, workspace, plan.heuristic.workspaceSize, stream) ==
         CUBLAS_STATUS_SUCCESS;
}

}  // namespace growops_cuda
