// specmoe/kernels/combine.cuh: weighted sum of each token's expert outputs (and shared experts),
// back in token order; fused with the un-permute. Skips writing when bad input was flagged, so
// the caller's output stays untouched.
#pragma once

#include <specmoe/kernels/gate.cuh>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace specmoe::kernels {

/// out[t] = bf16( sum_j w[t,j] * y[position[t,j]] + sum_s shared[s][t] ), j in gate order, fp32
/// (explicitly rounded multiply and add, as the host reference). Thread = 8 columns of a token.
static __global__ void combine_kernel(__nv_bfloat16 const* __restrict__ y, std::int32_t const* __restrict__ position,
                               float const* __restrict__ weights, long long n, int top_k, int hidden,
                               __nv_bfloat16 const* __restrict__ shared, int num_shared,
                               __nv_bfloat16* __restrict__ out, long long out_stride,
                               device_status const* __restrict__ status) {
  if (status->bits != 0) return;
  int const vecs = hidden / 8;
  long long const idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  long long const t = idx / vecs;
  if (t >= n) return;
  int const v = static_cast<int>(idx % vecs);
  float acc[8] = {};
  for (int j = 0; j < top_k; ++j) {
    int const row = position[t * top_k + j];
    if (row < 0) continue;
    float const w = weights[t * top_k + j];
    uint4 const packed = reinterpret_cast<uint4 const*>(y + static_cast<long long>(row) * hidden)[v];
    auto const* h = reinterpret_cast<__nv_bfloat16 const*>(&packed);
#pragma unroll
    for (int c = 0; c < 8; ++c) acc[c] = __fadd_rn(acc[c], __fmul_rn(w, __bfloat162float(h[c])));
  }
  for (int s = 0; s < num_shared; ++s) {
    uint4 const packed = reinterpret_cast<uint4 const*>(shared + (static_cast<long long>(s) * n + t) * hidden)[v];
    auto const* h = reinterpret_cast<__nv_bfloat16 const*>(&packed);
#pragma unroll
    for (int c = 0; c < 8; ++c) acc[c] = __fadd_rn(acc[c], __bfloat162float(h[c]));
  }
  uint4 result;
  auto* r = reinterpret_cast<__nv_bfloat16*>(&result);
#pragma unroll
  for (int c = 0; c < 8; ++c) r[c] = __float2bfloat16_rn(acc[c]);
  reinterpret_cast<uint4*>(out + t * out_stride)[v] = result;
}

inline cudaError_t launch_combine(__nv_bfloat16 const* y, std::int32_t const* position, float const* weights,
                                  long long n, int top_k, int hidden, __nv_bfloat16 const* shared, int num_shared,
                                  __nv_bfloat16* out, long long out_stride, device_status const* status,
                                  cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  long long const threads_total = n * (hidden / 8);
  combine_kernel<<<static_cast<unsigned>((threads_total + 255) / 256), 256, 0, stream>>>(
      y, position, weights, n, top_k, hidden, shared, num_shared, out, out_stride, status);
  return cudaGetLastError();
}

}  // namespace specmoe::kernels
