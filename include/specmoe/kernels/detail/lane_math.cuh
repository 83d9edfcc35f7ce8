// specmoe/kernels/detail/lane_math.cuh: the per-lane arithmetic the expert GEMM kernels share, so
// that every path rounds and activates alike (silu(g) = g / (1 + expf(-g)), as detail/host/ffn.hpp).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace specmoe::kernels::detail {

__device__ __forceinline__ float silu_mul(float g, float u) { return g / (1.0f + expf(-g)) * u; }

__device__ __forceinline__ void store_pair(__nv_bfloat16* p, float a, float b) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
}
__device__ __forceinline__ void store_pair(float* p, float a, float b) { *reinterpret_cast<float2*>(p) = make_float2(a, b); }
__device__ __forceinline__ void store_one(__nv_bfloat16* p, float a) { *p = __float2bfloat16_rn(a); }
__device__ __forceinline__ void store_one(float* p, float a) { *p = a; }

/// 8 bf16 (one 16-byte vector) as 8 floats.
__device__ __forceinline__ void unpack8(uint4 v, float (&f)[8]) {
  auto const* h = reinterpret_cast<__nv_bfloat162 const*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 const t = __bfloat1622float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

}  // namespace specmoe::kernels::detail
