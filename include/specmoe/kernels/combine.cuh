// specmoe/kernels/combine.cuh: weighted sum of each token's expert outputs (and shared experts),
// back in token order; fused with the un-permute. Skips writing when bad input was flagged, so
// the caller's output stays untouched.
#pragma once

#include <specmoe/kernels/gate.cuh>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace specmoe::kernels {

namespace detail {
__device__ __forceinline__ void load8(__nv_bfloat16 const* p, float (&f)[8]) {
  uint4 const packed = *reinterpret_cast<uint4 const*>(p);
  auto const* h = reinterpret_cast<__nv_bfloat16 const*>(&packed);
#pragma unroll
  for (int c = 0; c < 8; ++c) f[c] = __bfloat162float(h[c]);
}
__device__ __forceinline__ void load8(float const* p, float (&f)[8]) {
  float4 const a = reinterpret_cast<float4 const*>(p)[0], b = reinterpret_cast<float4 const*>(p)[1];
  f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w, f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
}
__device__ __forceinline__ void store8(__nv_bfloat16* p, float const (&f)[8]) {
  uint4 result;
  auto* r = reinterpret_cast<__nv_bfloat16*>(&result);
#pragma unroll
  for (int c = 0; c < 8; ++c) r[c] = __float2bfloat16_rn(f[c]);
  *reinterpret_cast<uint4*>(p) = result;
}
__device__ __forceinline__ void store8(float* p, float const (&f)[8]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(f[0], f[1], f[2], f[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(f[4], f[5], f[6], f[7]);
}
}  // namespace detail

/// out[t] = Out( sum_j w[t,j] * y[position[t,j]] + sum_s shared[s][t] ), j in gate order, fp32
/// (explicitly rounded multiply and add, as the host reference). Thread = 8 columns of a token.
/// Y (expert outputs, shared outputs) and Out are bf16 or fp32. BATCH slots' loads are issued
/// before the first is used: 8 where few threads run (decode: latency-bound), 1 where many do
/// (the registers it takes cost more occupancy than the latency it hides).
template <class Y, class Out, int BATCH>
static __global__ void combine_kernel(Y const* __restrict__ y, std::int32_t const* __restrict__ position,
                                      float const* __restrict__ weights, long long n, int top_k, int hidden,
                                      Y const* __restrict__ shared, int num_shared, Out* __restrict__ out,
                                      long long out_stride, device_status const* __restrict__ status) {
  if (status->bits != 0) return;
  int const vecs = hidden / 8;
  long long const idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  long long const t = idx / vecs;
  if (t >= n) return;
  int const v = static_cast<int>(idx % vecs);
  float acc[8] = {};
  float part[8];
  // BATCH slots at a time: their position and weight loads, then their row loads, are issued before
  // the first is used (one memory latency per batch, not two per slot); the sum keeps gate order.
  for (int j0 = 0; j0 < top_k; j0 += BATCH) {
    int row[BATCH];
    float w[BATCH];
#pragma unroll
    for (int j = 0; j < BATCH; ++j) {
      bool const in = j0 + j < top_k;
      row[j] = in ? position[t * top_k + j0 + j] : -1;
      w[j] = in ? weights[t * top_k + j0 + j] : 0.0f;
    }
    float rows[BATCH][8];
#pragma unroll
    for (int j = 0; j < BATCH; ++j) {
      if (row[j] >= 0) detail::load8(y + static_cast<long long>(row[j]) * hidden + v * 8, rows[j]);
    }
#pragma unroll
    for (int j = 0; j < BATCH; ++j) {
      if (row[j] < 0) continue;
#pragma unroll
      for (int c = 0; c < 8; ++c) acc[c] = __fadd_rn(acc[c], __fmul_rn(w[j], rows[j][c]));
    }
  }
  for (int s = 0; s < num_shared; ++s) {
    detail::load8(shared + (static_cast<long long>(s) * n + t) * hidden + v * 8, part);
#pragma unroll
    for (int c = 0; c < 8; ++c) acc[c] = __fadd_rn(acc[c], part[c]);
  }
  detail::store8(out + t * out_stride + v * 8, acc);
}

/// Up to this many threads (tokens x hidden / 8) the combine batches its loads (see combine_kernel).
inline constexpr long long combine_batched_max_threads = 65536;

template <class Y, class Out>
inline cudaError_t launch_combine(Y const* y, std::int32_t const* position, float const* weights, long long n, int top_k,
                                  int hidden, std::type_identity_t<Y> const* shared, int num_shared, Out* out, long long out_stride,
                                  device_status const* status, cudaStream_t stream) {
  static_assert((std::is_same_v<Y, __nv_bfloat16> || std::is_same_v<Y, float>) &&
                    (std::is_same_v<Out, __nv_bfloat16> || std::is_same_v<Out, float>),
                "combine reads and writes bf16 or fp32");
  if (n == 0) return cudaSuccess;
  long long const threads_total = n * (hidden / 8);
  auto const blocks = static_cast<unsigned>((threads_total + 255) / 256);
  // measured on an H100 (docs/benchmarks.md): batching wins at 1-16 tokens of top-8 (4.7 -> 3.6 us)
  // and Qwen3's 128, loses at DeepSeek-V3's 128 tokens (115k threads) and for top-2
  auto const kernel = top_k >= 4 && threads_total <= combine_batched_max_threads ? combine_kernel<Y, Out, 8> : combine_kernel<Y, Out, 1>;
  kernel<<<blocks, 256, 0, stream>>>(y, position, weights, n, top_k, hidden, shared, num_shared, out, out_stride, status);
  return cudaGetLastError();
}

}  // namespace specmoe::kernels
