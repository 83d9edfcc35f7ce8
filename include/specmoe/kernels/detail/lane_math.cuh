// specmoe/kernels/detail/lane_math.cuh: the arithmetic the expert GEMM kernels share, so that every
// path rounds and activates alike (silu(g) = g / (1 + expf(-g)), as detail/host/ffn.hpp), and the
// two stream kernels sum in one order (the same bits from either).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

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

/// acc[i][j][r] += wf[i][j][e] * xf[e] for e = 0..7 in order: one 8-column step of a stream
/// kernel's lane for activation row r (RPW output rows of NMAT matrices).
template <int RPW, int NMAT, int R>
__device__ __forceinline__ void accumulate_row(float (&acc)[RPW][NMAT][R], float const (&wf)[RPW][NMAT][8], float const (&xf)[8],
                                               int r) {
#pragma unroll
  for (int i = 0; i < RPW; ++i)
#pragma unroll
    for (int j = 0; j < NMAT; ++j)
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[i][j][r] = fmaf(wf[i][j][e], xf[e], acc[i][j][r]);
}

/// The end of a stream kernel's warp: each sum reduced across the lanes (butterfly), then lane r
/// writes activation row r < rows: out[(m0 + r) ldo + n_first + i] for the valid output rows i,
/// silu(gate) * up where NMAT = 2. R <= 32.
template <int RPW, int NMAT, int R, class OutT>
__device__ __forceinline__ void warp_reduce_store(float (&acc)[RPW][NMAT][R], int rows, bool const (&valid)[RPW], std::int64_t m0,
                                                  int n_first, OutT* __restrict__ out, std::int64_t ldo) {
  static_assert(R <= 32, "a lane writes each row");
  int const lane = static_cast<int>(threadIdx.x) & 31;
#pragma unroll
  for (int i = 0; i < RPW; ++i)
#pragma unroll
    for (int j = 0; j < NMAT; ++j)
#pragma unroll
      for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int s = 16; s > 0; s >>= 1) acc[i][j][r] += __shfl_xor_sync(0xffffffffu, acc[i][j][r], s);
      }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (lane == r && r < rows) {
#pragma unroll
      for (int i = 0; i < RPW; ++i) {
        if (!valid[i]) continue;
        float v;
        if constexpr (NMAT == 2) {
          v = silu_mul(acc[i][0][r], acc[i][1][r]);
        } else {
          v = acc[i][0][r];
        }
        store_one(out + (m0 + r) * ldo + n_first + i, v);
      }
    }
  }
}

}  // namespace specmoe::kernels::detail
