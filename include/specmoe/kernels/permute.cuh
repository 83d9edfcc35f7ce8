// specmoe/kernels/permute.cuh: gather token rows into expert-major order (16-byte accesses),
// converting fp32 activations to bf16 on the way where the layer runs fp32 activations.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace specmoe::kernels {

namespace detail {
/// 8 consecutive elements of a row as 8 bf16 (one uint4): a copy for bf16, round-to-nearest for fp32.
__device__ __forceinline__ uint4 load8_as_bf16(__nv_bfloat16 const* p) { return *reinterpret_cast<uint4 const*>(p); }
__device__ __forceinline__ uint4 load8_as_bf16(float const* p) {
  float4 const a = reinterpret_cast<float4 const*>(p)[0], b = reinterpret_cast<float4 const*>(p)[1];
  uint4 r;
  auto* h = reinterpret_cast<__nv_bfloat162*>(&r);
  h[0] = __floats2bfloat162_rn(a.x, a.y);
  h[1] = __floats2bfloat162_rn(a.z, a.w);
  h[2] = __floats2bfloat162_rn(b.x, b.y);
  h[3] = __floats2bfloat162_rn(b.z, b.w);
  return r;
}
}  // namespace detail

/// Rows one gather block copies: a warp a row.
inline constexpr int gather_rows_per_block = 8;
/// 16-byte vectors a lane loads before it stores them: a warp copies up to 32 x 8 vectors of a row
/// in one round trip, and wider rows take more warps (the grid's y dimension), not more rounds.
inline constexpr int gather_vecs_per_lane = 8;
inline constexpr int gather_vecs_per_warp = 32 * gather_vecs_per_lane;

/// xp[i] = bf16(x[sorted_slots[i] / top_k]) for rows i < rows_end[0]; rows of `hidden` elements,
/// hidden % 8 == 0, x bf16 or fp32. A warp copies vectors [256 y, 256 y + 256) of one row (y =
/// blockIdx.y): the slot is loaded once a row (beside rows_end: one latency, not two), and every
/// load of a lane is issued before its first store. (One 16-byte vector a thread over all
/// max_rows rows ran at about half the copy bandwidth at 65536 rows, and an engine rank's gather,
/// whose rows_end is a small part of max_rows, paid for blocks that found no row.)
template <class T>
static __global__ void __launch_bounds__(gather_rows_per_block * 32)
    gather_rows_kernel(T const* __restrict__ x, long long x_stride, int hidden, std::int32_t const* __restrict__ sorted_slots,
                       int top_k, std::int64_t const* __restrict__ rows_end, long long max_rows, __nv_bfloat16* __restrict__ xp) {
  long long const row = static_cast<long long>(blockIdx.x) * gather_rows_per_block + (threadIdx.x >> 5);
  if (row >= max_rows) return;
  std::int32_t const slot = sorted_slots[row];
  if (row >= *rows_end) return;
  int const vecs = hidden / 8;
  int const v0 = static_cast<int>(blockIdx.y) * gather_vecs_per_warp + static_cast<int>(threadIdx.x & 31u);
  T const* const src = x + static_cast<long long>(slot / top_k) * x_stride;
  uint4* const dst = reinterpret_cast<uint4*>(xp + row * hidden);
  uint4 r[gather_vecs_per_lane];
#pragma unroll
  for (int j = 0; j < gather_vecs_per_lane; ++j) {
    int const v = v0 + 32 * j;
    if (v < vecs) r[j] = detail::load8_as_bf16(src + v * 8);
  }
#pragma unroll
  for (int j = 0; j < gather_vecs_per_lane; ++j) {
    int const v = v0 + 32 * j;
    if (v < vecs) dst[v] = r[j];
  }
}

template <class T>
inline cudaError_t launch_gather_rows(T const* x, long long x_stride, int hidden, std::int32_t const* sorted_slots, int top_k,
                                      std::int64_t const* rows_end, long long max_rows, __nv_bfloat16* xp, cudaStream_t stream) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, float>, "gather takes bf16 or fp32 rows");
  if (max_rows == 0) return cudaSuccess;
  dim3 const grid(static_cast<unsigned>((max_rows + gather_rows_per_block - 1) / gather_rows_per_block),
                  static_cast<unsigned>((hidden / 8 + gather_vecs_per_warp - 1) / gather_vecs_per_warp));
  gather_rows_kernel<T><<<grid, gather_rows_per_block * 32, 0, stream>>>(x, x_stride, hidden, sorted_slots, top_k, rows_end, max_rows, xp);
  return cudaGetLastError();
}

/// xb[t] = bf16(x[t]) for n dense rows of `hidden` fp32 (hidden % 8 == 0): the shared experts' input
/// in an fp32-activation layer.
static __global__ void rows_to_bf16_kernel(float const* __restrict__ x, long long elements, __nv_bfloat16* __restrict__ xb) {
  long long const v = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (v * 8 >= elements) return;
  reinterpret_cast<uint4*>(xb)[v] = detail::load8_as_bf16(x + v * 8);
}

inline cudaError_t launch_rows_to_bf16(float const* x, long long n, int hidden, __nv_bfloat16* xb, cudaStream_t stream) {
  long long const vecs = n * hidden / 8;
  if (vecs == 0) return cudaSuccess;
  rows_to_bf16_kernel<<<static_cast<unsigned>((vecs + 255) / 256), 256, 0, stream>>>(x, n * hidden, xb);
  return cudaGetLastError();
}

}  // namespace specmoe::kernels
