// specmoe/kernels/gate.cuh: router logits -> top-k expert ids and combine weights, one warp per token.
//
// The same recipe and tie-breaking as the host gate (router/gate.hpp): larger score first, equal
// scores -> lower expert (or group) id; weights summed in gate order.
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

/// Launches topk_gate_kernel for n tokens on `stream`. Requires top_k <= 32 and num_groups <= 32.
inline cudaError_t launch_topk_gate(float const* logits, long long n, gate_params const& p, std::int32_t* ids,
                                    float* weights, device_status* status, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  auto const blocks = static_cast<unsigned>((n + gate_warps_per_block - 1) / gate_warps_per_block);
  std::size_t const smem = static_cast<std::size_t>(gate_warps_per_block) * 2 * static_cast<std::size_t>(p.num_experts) * sizeof(float);
  if (smem > 48 * 1024) {
    auto const err = cudaFuncSetAttribute(topk_gate_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  topk_gate_kernel<<<blocks, gate_warps_per_block * 32, smem, stream>>>(logits, n, p, ids, weights, status);
  return cudaGetLastError();
}

}  // namespace specmoe::kernels
