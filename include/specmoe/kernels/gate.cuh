// specmoe/kernels/gate.cuh: router logits -> top-k expert ids and combine weights, fused. Two
// kernels, chosen by token count: one warp per token (throughput, many tokens) and one block per
// token (latency, decode).
//
// The same recipe and tie-breaking as the host gate (router/gate.hpp): larger score first, equal
// scores -> lower expert (or group) id; weights summed in gate order. Both kernels give the host's
// bits.
#pragma once

#include <specmoe/core/moe_config.hpp>
#include <specmoe/router/gate_math.hpp>

#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

namespace specmoe::kernels {

/// Error bits the device kernels raise (the layer turns them into specmoe::error on the host).
enum device_error : int {
  device_error_none = 0,
  device_error_non_finite_logit = 1,
  device_error_expert_out_of_range = 2,
  device_error_non_finite_weight = 4,
  device_error_duplicate_expert = 8,
};

/// Where kernels report bad input without a host round trip: bits, and the first token involved.
struct device_status {
  int bits;
  int pad;
  long long first_token;
};

/// The status word before anything is flagged: no bits, first_token past any token (atomicMin).
inline constexpr device_status clean_device_status{0, 0, 1ll << 62};

/// Plain values of the gate recipe, passed by value to the kernel.
struct gate_params {
  int num_experts = 0;
  int top_k = 0;
  int grouped = 0;        // 0: softmax top-k; 1: sigmoid + bias grouped top-k
  int renormalize = 0;
  int num_groups = 1;
  int topk_groups = 1;
  float scale = 1.0f;
  float const* bias = nullptr;  // [num_experts] or null

  static gate_params from(moe_config const& c, float const* bias) {
    return {c.num_experts, c.top_k, c.gate.kind == gate_kind::sigmoid_grouped_topk ? 1 : 0, c.gate.renormalize ? 1 : 0,
            c.gate.num_groups, c.gate.topk_groups, c.gate.routed_scaling_factor, bias};
  }
};

namespace detail {

__device__ inline void report(device_status* status, int bit, long long token) {
  atomicOr(&status->bits, bit);
  atomicMin(reinterpret_cast<unsigned long long*>(&status->first_token), static_cast<unsigned long long>(token));
}

// Warp-wide argmax of (value, index): larger value, then lower index.
__device__ inline void warp_best(float& v, int& i) {
  for (int off = 16; off > 0; off >>= 1) {
    float const ov = __shfl_xor_sync(0xffffffffu, v, off);
    int const oi = __shfl_xor_sync(0xffffffffu, i, off);
    if (ov > v || (ov == v && oi >= 0 && (i < 0 || oi < i))) {
      v = ov;
      i = oi;
    }
  }
}

__device__ inline float warp_max(float v) {
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}
__device__ inline float warp_sum(float v) {
  for (int off = 16; off > 0; off >>= 1) v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

}  // namespace detail

inline constexpr int gate_warps_per_block = 4;

/// logits [n, E] fp32 -> ids [n, k] int32, weights [n, k] fp32. Dynamic shared memory:
/// gate_warps_per_block * 2 * E floats. Non-finite logits flag the token (ids -1, weights 0).
static __global__ void __launch_bounds__(gate_warps_per_block * 32)
    topk_gate_kernel(float const* __restrict__ logits, long long n, gate_params p, std::int32_t* __restrict__ ids,
                     float* __restrict__ weights, device_status* status) {
  extern __shared__ float smem[];
  int const warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  long long const t = static_cast<long long>(blockIdx.x) * gate_warps_per_block + warp;
  if (t >= n) return;
  int const E = p.num_experts, k = p.top_k;
  float* score = smem + static_cast<std::size_t>(warp) * 2 * E;  // [E]
  float* choice = score + E;                                     // [E]
  float const* l = logits + t * E;

  bool finite = true;
  float m = -FLT_MAX;
  for (int e = lane; e < E; e += 32) {
    float const v = l[e];
    finite = finite && isfinite(v);
    m = fmaxf(m, v);
    score[e] = v;
  }
  if (!__all_sync(0xffffffffu, finite)) {
    if (lane == 0) detail::report(status, device_error_non_finite_logit, t);
    for (int j = lane; j < k; j += 32) {
      ids[t * k + j] = -1;
      weights[t * k + j] = 0.0f;
    }
    return;
  }
  if (!p.grouped) {
    m = detail::warp_max(m);
    float s = 0.0f;
    for (int e = lane; e < E; e += 32) {
      float const x = specmoe::detail::gate_exp(score[e] - m);
      score[e] = x;
      s = specmoe::detail::add_rn(s, x);
    }
    s = detail::warp_sum(s);
    s = __shfl_sync(0xffffffffu, s, 0);  // lane 0's butterfly result, as the host reproduces it
    for (int e = lane; e < E; e += 32) score[e] = score[e] / s;
  } else {
    for (int e = lane; e < E; e += 32) score[e] = specmoe::detail::gate_sigmoid(score[e]);
  }
  for (int e = lane; e < E; e += 32) choice[e] = specmoe::detail::add_rn(score[e], p.bias ? p.bias[e] : 0.0f);
  __syncwarp();

  if (p.grouped && p.topk_groups < p.num_groups) {
    // Lane g scores group g (sum of its two best choices), then the warp keeps the best groups.
    int const per = E / p.num_groups;
    int kept_mask_lo = 0;  // groups <= 32 (validated by the layer)
    float gs = -FLT_MAX;
    if (lane < p.num_groups) {
      float const* c = choice + lane * per;
      int b0 = 0;
      for (int i = 1; i < per; ++i) b0 = c[i] > c[b0] ? i : b0;
      gs = c[b0];
      if (per > 1) {
        int b1 = b0 == 0 ? 1 : 0;
        for (int i = 0; i < per; ++i) b1 = (i != b0 && c[i] > c[b1]) ? i : b1;
        gs = __fadd_rn(c[b0], c[b1]);
      }
    }
    for (int r = 0; r < p.topk_groups; ++r) {
      float v = lane < p.num_groups && !((kept_mask_lo >> lane) & 1) ? gs : -FLT_MAX;
      int i = lane < p.num_groups && !((kept_mask_lo >> lane) & 1) ? lane : -1;
      detail::warp_best(v, i);
      kept_mask_lo |= 1 << i;
    }
    for (int e = lane; e < E; e += 32) {
      if (!((kept_mask_lo >> (e / per)) & 1)) choice[e] = -INFINITY;
    }
    __syncwarp();
  }

  // k rounds of warp argmax; a chosen expert's choice becomes -inf.
  int my_id = -1;  // lane j keeps the j-th pick
  for (int j = 0; j < k; ++j) {
    float v = -INFINITY;
    int i = -1;
    for (int e = lane; e < E; e += 32) {
      float const c = choice[e];
      if (c > v || (c == v && c != -INFINITY && i < 0)) {
        v = c;
        i = e;
      }
    }
    detail::warp_best(v, i);
    if (lane == j) my_id = i;
    if (lane == 0) choice[i] = -INFINITY;
    __syncwarp();
  }
  // Weights in gate order; every lane sums them sequentially, as the host does.
  float w = lane < k ? score[my_id] : 0.0f;
  float total = 0.0f;
  for (int j = 0; j < k; ++j) total = __fadd_rn(total, __shfl_sync(0xffffffffu, w, j));
  if (p.renormalize) {
    float const denom = p.grouped ? __fadd_rn(total, 1e-20f) : total;
    w = w / denom;
  }
  w = __fmul_rn(w, p.scale);
  if (lane < k) {
    ids[t * k + lane] = my_id;
    weights[t * k + lane] = w;
  }
}

/// Largest expert count and token count the block-per-token kernel takes (automatic choice).
inline constexpr int gate_block_max_experts = 256;
/// The block kernel is faster up to 1024 tokens (routing bench on an H100: 3.9 / 6.0 / 11.7 µs against
/// the warp kernel's 4.2 / 7.5 / 14.6 for Mixtral / Qwen3 / DeepSeek-V3 shapes), slower at 8192 (8.6 /
/// 27.9 / 71.4 against 8.0 / 19.3 / 46.3), where the warp kernel's fewer threads a token win.
inline constexpr long long gate_block_max_tokens = 1024;

/// logits [n, E] fp32 -> ids [n, k], weights [n, k], one block of round_up(E, 32) threads per token,
/// thread e holding expert e (E <= gate_block_max_experts, k <= 32).
///
/// The warp kernel's latency at a few tokens is serial work: E/32 values per lane and k rounds of
/// warp argmax, each a chain of shuffles. Here every step is parallel over the experts:
///   1. softmax: block max; the denominator summed in the warp kernel's order (32 strided partial
///      sums, lane 0's butterfly), so the division gives the same floats;
///   2. grouped: one thread per group takes its two best choices, each expert then ranks its group
///      among all groups (kept: rank < topk_groups);
///   3. top-k in two stages under the total order (choice desc, id asc): each warp ranks its own 32
///      experts and posts its k best as candidates; a candidate's rank among all warps' candidates
///      equals its rank among all experts whenever that is < k (every expert ahead of it is then
///      in some warp's k best), so rank r < k writes slot r.
/// NOTES: same floats and order as topk_gate_kernel, so the two kernels agree bit for bit.
namespace detail {
/// The block gate of token t, for the whole block (blockDim.x >= round_up(E, 32), at most
/// gate_block_max_experts): topk_gate_block_kernel's body, also run by the fused decode routing
/// (decode_routing.cuh) for each of its tokens. Logits are read from L2 (written by other blocks
/// of that kernel). Callers running it for several tokens put a barrier between them.
__device__ inline void gate_token_in_block(long long t, float const* __restrict__ logits, gate_params const& p,
                                           std::int32_t* __restrict__ ids, float* __restrict__ weights, device_status* status) {
  constexpr int max_warps = gate_block_max_experts / 32;
  struct alignas(8) candidate {
    float choice;
    int expert;
  };
  __shared__ float warp_maxima[max_warps];
  __shared__ float stage[gate_block_max_experts];   // softmax: exp(l - max); grouped: choices
  __shared__ float choices[gate_block_max_experts];  // masked choices, read back by their own warp
  __shared__ float group_score[32];
  __shared__ candidate cand[max_warps * 32];  // [warps, k]
  __shared__ float picked[32];                // the chosen scores in gate order

  int const e = static_cast<int>(threadIdx.x), lane = e % 32, warp = e / 32;
  int const warps = static_cast<int>(blockDim.x) / 32;
  int const E = p.num_experts, k = p.top_k;
  bool const valid = e < E;  // threads past E pad the block
  float const v = valid ? __ldcg(logits + t * E + e) : 0.0f;
  float const b = valid && p.bias ? p.bias[e] : 0.0f;
  if (!p.grouped) {
    float const m = detail::warp_max(valid ? v : -FLT_MAX);
    if (lane == 0) warp_maxima[warp] = m;
  }
  if (__syncthreads_or(valid && !isfinite(v))) {  // (also publishes warp_maxima)
    if (e == 0) detail::report(status, device_error_non_finite_logit, t);
    if (e < k) {
      ids[t * k + e] = -1;
      weights[t * k + e] = 0.0f;
    }
    return;
  }

  float score = 0.0f;
  if (!p.grouped) {
    float m = warp_maxima[0];
    for (int w = 1; w < warps; ++w) m = fmaxf(m, warp_maxima[w]);
    float const x = valid ? specmoe::detail::gate_exp(v - m) : 0.0f;
    stage[e] = x;
    __syncthreads();
    // Every warp sums all of stage itself (no barrier to share one sum), in the warp kernel's order.
    float s = 0.0f;
    for (int i = lane; i < E; i += 32) s = specmoe::detail::add_rn(s, stage[i]);
    s = detail::warp_sum(s);
    s = __shfl_sync(0xffffffffu, s, 0);
    score = x / s;
  } else if (valid) {
    score = specmoe::detail::gate_sigmoid(v);
  }
  float choice = valid ? specmoe::detail::add_rn(score, b) : -INFINITY;

  if (p.grouped && p.topk_groups < p.num_groups) {
    int const G = p.num_groups, per = E / G;
    stage[e] = choice;
    __syncthreads();
    if (e < G) {
      // A group's score is the sum of its two largest choices (as values: ties change nothing).
      float t1 = -INFINITY, t2 = -INFINITY;
      for (int i = e * per; i < (e + 1) * per; ++i) {
        float const c = stage[i];
        t2 = fmaxf(t2, fminf(t1, c));
        t1 = fmaxf(t1, c);
      }
      group_score[e] = per > 1 ? __fadd_rn(t1, t2) : t1;
    }
    __syncthreads();
    if (valid) {
      int const g = e / per;
      float const gs = group_score[g];
      int rank = 0;
      for (int h = 0; h < G; ++h) {
        float const o = group_score[h];
        rank += (o > gs || (o == gs && h < g)) ? 1 : 0;
      }
      if (rank >= p.topk_groups) choice = -INFINITY;
    }
  }

  // Stage 1: rank inside the warp; the k best post themselves as candidates.
  choices[e] = choice;
  __syncwarp();
  float const* mine = choices + warp * 32;
  int local = 0;
  for (int j = 0; j < 32; ++j) {
    float const o = mine[j];
    local += (o > choice || (o == choice && j < lane)) ? 1 : 0;
  }
  if (local < k) cand[warp * k + local] = {choice, e};
  __syncthreads();
  // Stage 2: rank among all candidates.
  int rank = k;
  if (local < k) {
    rank = 0;
    for (int s = 0; s < warps * k; ++s) {
      candidate const o = cand[s];
      rank += (o.choice > choice || (o.choice == choice && o.expert < e)) ? 1 : 0;
    }
    if (rank < k) {
      ids[t * k + rank] = e;
      picked[rank] = score;
    }
  }
  __syncthreads();
  if (rank < k) {
    // Weights summed in gate order, as the warp kernel and the host do.
    float total = 0.0f;
    for (int j = 0; j < k; ++j) total = __fadd_rn(total, picked[j]);
    float w = score;
    if (p.renormalize) {
      float const denom = p.grouped ? __fadd_rn(total, 1e-20f) : total;
      w = w / denom;
    }
    weights[t * k + rank] = __fmul_rn(w, p.scale);
  }
}
}  // namespace detail

static __global__ void __launch_bounds__(gate_block_max_experts)
    topk_gate_block_kernel(float const* __restrict__ logits, gate_params p, std::int32_t* __restrict__ ids,
                           float* __restrict__ weights, device_status* status) {
  detail::gate_token_in_block(blockIdx.x, logits, p, ids, weights, status);
}

/// Which gate kernel launch_topk_gate runs.
enum class gate_path {
  automatic,        ///< block_per_token up to gate_block_max_tokens tokens and gate_block_max_experts experts
  warp_per_token,   ///< topk_gate_kernel: any E (shared memory permitting)
  block_per_token,  ///< topk_gate_block_kernel: E <= gate_block_max_experts
};

/// Launches the gate for n tokens on `stream` through `path` (tests and benches force one; the
/// results are the same bits). Requires top_k <= 32 and num_groups <= 32; block_per_token with
/// more than gate_block_max_experts experts returns cudaErrorInvalidValue.
inline cudaError_t launch_topk_gate(float const* logits, long long n, gate_params const& p, std::int32_t* ids,
                                    float* weights, device_status* status, cudaStream_t stream, gate_path path) {
  if (n == 0) return cudaSuccess;
  if (path == gate_path::automatic) {
    path = n <= gate_block_max_tokens && p.num_experts <= gate_block_max_experts ? gate_path::block_per_token
                                                                                 : gate_path::warp_per_token;
  }
  if (path == gate_path::block_per_token) {
    if (p.num_experts > gate_block_max_experts || p.top_k > 32 || n > 0x7fffffffLL) return cudaErrorInvalidValue;
    auto const threads = static_cast<unsigned>((p.num_experts + 31) / 32 * 32);
    topk_gate_block_kernel<<<static_cast<unsigned>(n), threads, 0, stream>>>(logits, p, ids, weights, status);
    return cudaGetLastError();
  }
  auto const blocks = static_cast<unsigned>((n + gate_warps_per_block - 1) / gate_warps_per_block);
  std::size_t const smem = static_cast<std::size_t>(gate_warps_per_block) * 2 * static_cast<std::size_t>(p.num_experts) * sizeof(float);
  if (smem > 48 * 1024) {
    auto const err = cudaFuncSetAttribute(topk_gate_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  topk_gate_kernel<<<blocks, gate_warps_per_block * 32, smem, stream>>>(logits, n, p, ids, weights, status);
  return cudaGetLastError();
}

/// Launches the gate for n tokens on `stream`, the kernel chosen by token count (gate_path::automatic).
inline cudaError_t launch_topk_gate(float const* logits, long long n, gate_params const& p, std::int32_t* ids,
                                    float* weights, device_status* status, cudaStream_t stream) {
  return launch_topk_gate(logits, n, p, ids, weights, status, stream, gate_path::automatic);
}

}  // namespace specmoe::kernels
