// specmoe/kernels/router_logits.cuh: the router's logits for a handful of tokens (decode), one
// block per expert streaming its router row once for all tokens. cuBLAS's GEMM for one token took
// 6.6 us on an H100 for a 0.5 MiB router (Qwen3-30B-A3B), where the bytes need 0.2 us: at these
// sizes the launch and its latency chain are the cost, so the layer takes this kernel up to
// router_logits_max_tokens tokens and cuBLAS above.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace specmoe::kernels {

/// Most tokens the block-per-expert kernel takes (its accumulators live in registers). Each block
/// reads all n token rows from L2 once, so the kernel's L2 traffic grows as E x n x H; at 16
/// tokens it still beat cuBLAS's GEMM on the issue-4 shapes (docs/benchmarks.md, issue 4).
inline constexpr int router_logits_max_tokens = 16;

namespace detail {
inline constexpr int router_logits_threads = 256;  // one block per expert: 8 warps split its row

/// logits[t * E + e] = sum_h router[e, h] * x[t, h] for t < n <= N, by the whole block (fp32
/// accumulate). Thread i sums the 8-column chunks i, i + 256, ... in order; each warp reduces by a
/// butterfly, and thread t adds the 8 warps' sums in warp order: the same bits on every run. The
/// row is split over the block, not a warp, so that every load of it is in flight at once (a
/// warp per expert took 2 to 7 dependent round trips to HBM for a 4-14 KiB row; docs/benchmarks.md,
/// issue 4, twelfth step). Every thread of the block must call it (it synchronises).
template <int N>
__device__ inline void router_logits_of_expert(__nv_bfloat16 const* __restrict__ router, std::int64_t stride, int E, int H,
                                               __nv_bfloat16 const* __restrict__ x, int n, int e, float* __restrict__ logits) {
  static_assert(router_logits_threads == 256, "chunk stride below");
  __shared__ float warp_sums[router_logits_threads / 32][N];
  int const tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  auto const* w = router + e * stride;
  float acc[N] = {};
#pragma unroll 4
  for (int h = tid * 8; h < H; h += router_logits_threads * 8) {
    uint4 const wv = __ldg(reinterpret_cast<uint4 const*>(w + h));
    auto const* wp = reinterpret_cast<__nv_bfloat162 const*>(&wv);
#pragma unroll
    for (int t = 0; t < N; ++t) {
      if (t >= n) break;  // N rounds n up to 4, 8 or 16
      uint4 const xv = __ldg(reinterpret_cast<uint4 const*>(x + static_cast<std::int64_t>(t) * H + h));
      auto const* xp = reinterpret_cast<__nv_bfloat162 const*>(&xv);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        float2 const wf = __bfloat1622float2(wp[i]), xf = __bfloat1622float2(xp[i]);
        acc[t] = fmaf(wf.x, xf.x, acc[t]);
        acc[t] = fmaf(wf.y, xf.y, acc[t]);
      }
    }
  }
#pragma unroll
  for (int t = 0; t < N; ++t) {
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) acc[t] += __shfl_xor_sync(0xffffffffu, acc[t], s);
  }
  if (lane == 0) {
#pragma unroll
    for (int t = 0; t < N; ++t) warp_sums[warp][t] = acc[t];
  }
  __syncthreads();
  if (tid < n) {
    float sum = 0.0f;
#pragma unroll
    for (int v = 0; v < router_logits_threads / 32; ++v) sum += warp_sums[v][tid];
    logits[static_cast<std::int64_t>(tid) * E + e] = sum;
  }
}

template <int N>
static __global__ void __launch_bounds__(router_logits_threads)
    router_logits_kernel(__nv_bfloat16 const* __restrict__ router, std::int64_t stride, int E, int H,
                         __nv_bfloat16 const* __restrict__ x, int n, float* __restrict__ logits) {
  router_logits_of_expert<N>(router, stride, E, H, x, n, static_cast<int>(blockIdx.x), logits);
}
}  // namespace detail

/// Whether launch_router_logits takes this problem: n in [1, router_logits_max_tokens], 16-byte
/// aligned rows (H and stride multiples of 8). Otherwise the caller uses a GEMM.
inline bool router_logits_supported(__nv_bfloat16 const* router, std::int64_t stride, int E, int H, __nv_bfloat16 const* x,
                                    std::int64_t n) {
  bool const aligned = ((reinterpret_cast<std::uintptr_t>(router) | reinterpret_cast<std::uintptr_t>(x)) & 15u) == 0;
  return n >= 1 && n <= router_logits_max_tokens && E >= 1 && H >= 8 && H % 8 == 0 && stride % 8 == 0 && stride >= H && aligned;
}

/// logits^T [E, n] column-major (logits[t * E + e]) = router [E, H] (row stride `stride`) . x^T for
/// x [n, H] bf16 rows; cudaErrorInvalidValue (nothing launched) unless router_logits_supported.
inline cudaError_t launch_router_logits(__nv_bfloat16 const* router, std::int64_t stride, int E, int H,
                                        __nv_bfloat16 const* x, std::int64_t n, float* logits, cudaStream_t stream) {
  if (!router_logits_supported(router, stride, E, H, x, n)) return cudaErrorInvalidValue;
  dim3 const grid(static_cast<unsigned>(E)), block(detail::router_logits_threads);
  switch (n) {
    case 1: detail::router_logits_kernel<1><<<grid, block, 0, stream>>>(router, stride, E, H, x, static_cast<int>(n), logits); break;
    case 2: detail::router_logits_kernel<2><<<grid, block, 0, stream>>>(router, stride, E, H, x, static_cast<int>(n), logits); break;
    case 3: case 4: detail::router_logits_kernel<4><<<grid, block, 0, stream>>>(router, stride, E, H, x, static_cast<int>(n), logits); break;
    case 5: case 6: case 7: case 8:
      detail::router_logits_kernel<8><<<grid, block, 0, stream>>>(router, stride, E, H, x, static_cast<int>(n), logits);
      break;
    default: detail::router_logits_kernel<16><<<grid, block, 0, stream>>>(router, stride, E, H, x, static_cast<int>(n), logits); break;
  }
  return cudaGetLastError();
}

}  // namespace specmoe::kernels
