// specmoe/router/gate.hpp: the real router on the host (softmax top-k, sigmoid grouped top-k).
#pragma once

#include <specmoe/core/bfloat16.hpp>
#include <specmoe/core/error.hpp>
#include <specmoe/core/expert_weights.hpp>
#include <specmoe/core/moe_config.hpp>
#include <specmoe/core/routing.hpp>
#include <specmoe/detail/host/ffn.hpp>
#include <specmoe/router/gate_math.hpp>

#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

namespace specmoe {

namespace detail {
// Score order of the gates: larger first; equal scores -> lower index first (deterministic, and
// what the GPU kernels reproduce).
inline bool ranks_before(float a, int ia, float b, int ib) noexcept { return a > b || (a == b && ia < ib); }

// Writes the k best of `score[0, n)` among those with allowed[i] into out (best first).
inline void select_topk(float const* score, int n, std::uint8_t const* allowed, int k, std::int32_t* out) {
  for (int j = 0; j < k; ++j) {
    int best = -1;
    for (int i = 0; i < n; ++i) {
      if (allowed && !allowed[i]) continue;
      bool taken = false;
      for (int p = 0; p < j; ++p) taken = taken || out[p] == i;
      if (taken) continue;
      if (best < 0 || ranks_before(score[i], i, score[best], best)) best = i;
    }
    out[j] = best;
  }
}
}  // namespace detail

/// @brief Routes one token from its router logits [num_experts].
///
/// softmax_topk (Mixtral, Qwen): p = softmax(logits); choose top_k of p (+ bias if given);
///   w = p, divided by the sum of the chosen p when `renormalize`; times routed_scaling_factor.
/// sigmoid_grouped_topk (DeepSeek-V3): s = sigmoid(logits); c = s + bias; a group's score is the
///   sum of its two best c; keep the topk_groups best groups; choose top_k of c inside them;
///   w = s, divided by (sum + 1e-20) when `renormalize`; times routed_scaling_factor.
/// Ties go to the lower expert (or group) id. Logits must be finite (checked by `route`).
inline void route_token(float const* logits, std::span<float const> bias, moe_config const& cfg,
                        std::int32_t* ids, float* weights) {
  auto const E = cfg.num_experts, k = cfg.top_k;
  std::vector<float> score(static_cast<std::size_t>(E)), choice(static_cast<std::size_t>(E));
  if (cfg.gate.kind == gate_kind::softmax_topk) {
    float m = logits[0];
    for (int e = 1; e < E; ++e) m = logits[e] > m ? logits[e] : m;
    // The denominator is summed in the GPU's order: 32 strided partial sums, then a butterfly
    // (lane 0's result), so both gates divide by the same float.
    float part[detail::gate_sum_lanes] = {};
    for (int e = 0; e < E; ++e) {
      score[static_cast<std::size_t>(e)] = detail::gate_exp(logits[e] - m);
      part[e % detail::gate_sum_lanes] = detail::add_rn(part[e % detail::gate_sum_lanes], score[static_cast<std::size_t>(e)]);
    }
    for (int off = detail::gate_sum_lanes / 2; off > 0; off /= 2) {
      float next[detail::gate_sum_lanes];
      for (int l = 0; l < detail::gate_sum_lanes; ++l) next[l] = detail::add_rn(part[l], part[l ^ off]);
      for (int l = 0; l < detail::gate_sum_lanes; ++l) part[l] = next[l];
    }
    float const sum = part[0];
    for (int e = 0; e < E; ++e) score[static_cast<std::size_t>(e)] = score[static_cast<std::size_t>(e)] / sum;
  } else {
    for (int e = 0; e < E; ++e) score[static_cast<std::size_t>(e)] = detail::gate_sigmoid(logits[e]);
  }
  for (int e = 0; e < E; ++e) {
    choice[static_cast<std::size_t>(e)] = detail::add_rn(score[static_cast<std::size_t>(e)], bias.empty() ? 0.0f : bias[static_cast<std::size_t>(e)]);
  }
  std::vector<std::uint8_t> allowed;
  if (cfg.gate.kind == gate_kind::sigmoid_grouped_topk && cfg.gate.topk_groups < cfg.gate.num_groups) {
    auto const G = cfg.gate.num_groups, per = E / G;
    std::vector<float> group_score(static_cast<std::size_t>(G));
    for (int g = 0; g < G; ++g) {
      std::int32_t best[2] = {-1, -1};
      auto const take = per < 2 ? per : 2;
      detail::select_topk(choice.data() + g * per, per, nullptr, take, best);
      float s = 0.0f;
      for (int j = 0; j < take; ++j) s = s + choice[static_cast<std::size_t>(g * per + best[j])];
      group_score[static_cast<std::size_t>(g)] = s;
    }
    std::vector<std::int32_t> kept(static_cast<std::size_t>(cfg.gate.topk_groups));
    detail::select_topk(group_score.data(), G, nullptr, cfg.gate.topk_groups, kept.data());
    allowed.assign(static_cast<std::size_t>(E), 0);
    for (auto g : kept) {
      for (int i = 0; i < per; ++i) allowed[static_cast<std::size_t>(g * per + i)] = 1;
    }
  }
  detail::select_topk(choice.data(), E, allowed.empty() ? nullptr : allowed.data(), k, ids);
  float sum = 0.0f;
  for (int j = 0; j < k; ++j) {
    weights[j] = score[static_cast<std::size_t>(ids[j])];
    sum = sum + weights[j];
  }
  if (cfg.gate.renormalize) {
    float const denom = cfg.gate.kind == gate_kind::sigmoid_grouped_topk ? sum + 1e-20f : sum;
    for (int j = 0; j < k; ++j) weights[j] = weights[j] / denom;
  }
  for (int j = 0; j < k; ++j) weights[j] = weights[j] * cfg.gate.routed_scaling_factor;
}

/// @brief Router logits [n, num_experts] of n fp32 rows x [n, hidden] (no checks).
template <class W>
std::vector<float> router_logits(float const* x, std::int64_t n, gate_weights<W> const& gw) {
  std::vector<float> logits(static_cast<std::size_t>(n * gw.weight.rows));
  detail::host::matmul_rows(x, n, gw.weight, logits.data());
  return logits;
}

/// @brief Routes n fp32 rows into `out` (resized to [n, top_k]).
///
/// @param first_token, rank only name the token in error messages.
/// @throw specmoe::error `non_finite` naming the token (and rank) whose logits hold NaN or Inf.
template <class W>
void route(float const* x, std::int64_t n, gate_weights<W> const& gw, moe_config const& cfg, routing& out,
           std::int64_t first_token = 0, int rank = 0) {
  auto const logits = router_logits(x, n, gw);
  auto const E = cfg.num_experts;
  out.resize(n, cfg.top_k);
  for (std::int64_t t = 0; t < n; ++t) {
    float const* l = logits.data() + t * E;
    for (int e = 0; e < E; ++e) {
      SPECMOE_EXPECTS(std::isfinite(l[e]), errc::non_finite, "router logit of token ", first_token + t, " (rank ",
                      rank, ") for expert ", e, " is not finite (", l[e], ")");
    }
    route_token(l, gw.score_bias, cfg, out.topk_ids.data() + t * cfg.top_k, out.topk_weights.data() + t * cfg.top_k);
  }
}

}  // namespace specmoe
