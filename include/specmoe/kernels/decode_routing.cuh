// specmoe/kernels/decode_routing.cuh: a decode step's whole routing in one launch: router logits
// (a block per expert, as router_logits.cuh), then, in the block that finishes last, the block gate
// of each token (gate.cuh) and the layout (layout.cuh's rank count). Each of the three alone is a
// few microseconds of launch and memory latency for almost no bytes (docs/benchmarks.md, issue 4);
// chained in one kernel the step pays one launch and no status reset of its own: the last block
// writes the status word before the gate and the layout may flag bad input in it.
//
// Same results, bit for bit, as launch_router_logits + launch_topk_gate (block path) +
// launch_layout (tiny path): the same device code runs.
//
// Measured on an H100 (docs/benchmarks.md, issue 4, fifth run): faster than the three launches at
// one token (Qwen3-30B-A3B 10.7 -> 9.4 us, DeepSeek-V3 16.2 -> 14.2), slower from two tokens on,
// where the last block gates the tokens one after another (8 tokens: 22.5 -> 44.5 us). The layer
// takes it for one token only.
#pragma once

#include <specmoe/kernels/gate.cuh>
#include <specmoe/kernels/layout.cuh>
#include <specmoe/kernels/router_logits.cuh>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace specmoe::kernels {

/// Most slots (tokens x top_k) the fused routing lays out (its layout is the rank count).
inline constexpr int decode_routing_max_slots = 64;
/// Threads per block of the fused routing: the block gate needs one per expert, the logits one
/// block of router_logits' size per expert.
inline constexpr int decode_routing_threads = gate_block_max_experts;
static_assert(decode_routing_threads == detail::router_logits_threads, "one block size for the logits and the gate");

namespace detail {

/// logits[t * E + e] for this block's expert (blockIdx.x), then the last block to arrive routes
/// every token and lays the slots out. `arrivals`: a counter, zero between launches (the last
/// block resets it), so launches sharing it must be ordered on one stream.
template <int N>
static __global__ void __launch_bounds__(decode_routing_threads)
    decode_routing_kernel(__nv_bfloat16 const* __restrict__ router, std::int64_t stride, int H, __nv_bfloat16 const* __restrict__ x,
                          int n, float* __restrict__ logits, gate_params p, std::int32_t* __restrict__ ids,
                          float* __restrict__ weights, layout_buffers b, device_status* status, unsigned* arrivals) {
  int const E = p.num_experts;
  router_logits_of_expert<N>(router, stride, E, H, x, n, static_cast<int>(blockIdx.x), logits);

  // Publish this block's logits, then count it; the last block sees every block's.
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(arrivals, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  if (threadIdx.x == 0) {
    *arrivals = 0;
    *status = clean_device_status;  // this forward's status: clean until flagged below
  }
  __syncthreads();
  for (int t = 0; t < n; ++t) {
    gate_token_in_block(t, logits, p, ids, weights, status);
    __syncthreads();  // the gate's shared memory is reused by the next token; ids complete for the layout
  }
  tiny_layout_in_block<decode_routing_max_slots>(ids, weights, n * p.top_k, p.top_k, E, b.sorted_slots, b.position, b.offsets,
                                                  status);
}

}  // namespace detail

/// Whether launch_decode_routing takes this step: router_logits_supported (1-16 bf16 tokens, aligned
/// rows), E <= gate_block_max_experts, tokens x top_k <= decode_routing_max_slots.
inline bool decode_routing_supported(__nv_bfloat16 const* router, std::int64_t stride, int H, __nv_bfloat16 const* x, std::int64_t n,
                                     gate_params const& p) {
  return router_logits_supported(router, stride, p.num_experts, H, x, n) && p.num_experts <= gate_block_max_experts &&
         p.top_k >= 1 && p.top_k <= 32 && n * p.top_k <= decode_routing_max_slots;
}

/// Router logits (into `logits`, [n, E]), top-k ids and weights ([n, top_k]) and the layout (`b`'s
/// sorted_slots, position, offsets) of n tokens in one launch; also writes *status (clean, or what
/// the gate and the layout flagged: no reset is needed before it). `arrivals`: one unsigned, zero
/// before the first launch. cudaErrorInvalidValue (nothing launched) unless decode_routing_supported.
inline cudaError_t launch_decode_routing(__nv_bfloat16 const* router, std::int64_t stride, int H, __nv_bfloat16 const* x, std::int64_t n,
                                         float* logits, gate_params const& p, std::int32_t* ids, float* weights, layout_buffers const& b,
                                         device_status* status, unsigned* arrivals, cudaStream_t stream) {
  if (!decode_routing_supported(router, stride, H, x, n, p) || !arrivals || !status) return cudaErrorInvalidValue;
  dim3 const grid(static_cast<unsigned>(p.num_experts)), block(decode_routing_threads);
  int const ni = static_cast<int>(n);
  switch (ni) {
    case 1: detail::decode_routing_kernel<1><<<grid, block, 0, stream>>>(router, stride, H, x, ni, logits, p, ids, weights, b, status, arrivals); break;
    case 2: detail::decode_routing_kernel<2><<<grid, block, 0, stream>>>(router, stride, H, x, ni, logits, p, ids, weights, b, status, arrivals); break;
    case 3: case 4: detail::decode_routing_kernel<4><<<grid, block, 0, stream>>>(router, stride, H, x, ni, logits, p, ids, weights, b, status, arrivals); break;
    case 5: case 6: case 7: case 8:
      detail::decode_routing_kernel<8><<<grid, block, 0, stream>>>(router, stride, H, x, ni, logits, p, ids, weights, b, status, arrivals);
      break;
    default: detail::decode_routing_kernel<16><<<grid, block, 0, stream>>>(router, stride, H, x, ni, logits, p, ids, weights, b, status, arrivals); break;
  }
  return cudaGetLastError();
}

}  // namespace specmoe::kernels
