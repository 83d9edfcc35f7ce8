// specmoe/kernels/permute.cuh: gather token rows into expert-major order (16-byte accesses).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace specmoe::kernels {

/// xp[i] = x[sorted_slots[i] / top_k] for rows i < offsets_end[0]; bf16 rows of `hidden`
/// elements, hidden % 8 == 0 (one uint4 = 8 bf16 per thread).
static __global__ void gather_rows_kernel(__nv_bfloat16 const* __restrict__ x, long long x_stride, int hidden,
                                   std::int32_t const* __restrict__ sorted_slots, int top_k,
                                   std::int64_t const* __restrict__ rows_end, long long max_rows,
                                   __nv_bfloat16* __restrict__ xp) {
  int const vecs = hidden / 8;
  long long const idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  long long const row = idx / vecs;
  if (row >= max_rows || row >= *rows_end) return;
  int const v = static_cast<int>(idx % vecs);
  long long const token = sorted_slots[row] / top_k;
  reinterpret_cast<uint4*>(xp + row * hidden)[v] = reinterpret_cast<uint4 const*>(x + token * x_stride)[v];
}

inline cudaError_t launch_gather_rows(__nv_bfloat16 const* x, long long x_stride, int hidden,
                                      std::int32_t const* sorted_slots, int top_k, std::int64_t const* rows_end,
                                      long long max_rows, __nv_bfloat16* xp, cudaStream_t stream) {
  if (max_rows == 0) return cudaSuccess;
  long long const threads_total = max_rows * (hidden / 8);
  gather_rows_kernel<<<static_cast<unsigned>((threads_total + 255) / 256), 256, 0, stream>>>(
      x, x_stride, hidden, sorted_slots, top_k, rows_end, max_rows, xp);
  return cudaGetLastError();
}

}  // namespace specmoe::kernels
