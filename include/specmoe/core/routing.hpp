// specmoe/core/routing.hpp: the router's answer for a batch: top-k expert ids and weights per token.
#pragma once

#include <specmoe/core/error.hpp>

#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

namespace specmoe {

/// @brief A view of routing over caller memory (DeepEP's `topk_idx` / `topk_weights`).
///
/// Row t holds token t's experts in gate order (best first) and their combine weights. An id of
/// -1 marks an empty slot (engines that mask experts use it); such a slot contributes nothing.
struct routing_view {
  std::span<std::int32_t const> topk_ids;  ///< [num_tokens, top_k]
  std::span<float const> topk_weights;     ///< [num_tokens, top_k]
  std::int64_t num_tokens = 0;
  int top_k = 0;

  [[nodiscard]] std::int32_t id(std::int64_t t, int j) const noexcept { return topk_ids[t * top_k + j]; }
  [[nodiscard]] float weight(std::int64_t t, int j) const noexcept { return topk_weights[t * top_k + j]; }
};

/// @brief Routing the library computed and owns (host memory).
struct routing {
  std::vector<std::int32_t> topk_ids;  ///< [num_tokens, top_k]
  std::vector<float> topk_weights;     ///< [num_tokens, top_k]
  std::int64_t num_tokens = 0;
  int top_k = 0;

  routing() = default;
  routing(std::int64_t n, int k)
      : topk_ids(static_cast<std::size_t>(n * k), -1), topk_weights(static_cast<std::size_t>(n * k), 0.0f),
        num_tokens(n), top_k(k) {}

  void resize(std::int64_t n, int k) {
    num_tokens = n;
    top_k = k;
    topk_ids.assign(static_cast<std::size_t>(n * k), -1);
    topk_weights.assign(static_cast<std::size_t>(n * k), 0.0f);
  }
  [[nodiscard]] std::int32_t id(std::int64_t t, int j) const noexcept { return topk_ids[static_cast<std::size_t>(t * top_k + j)]; }
  [[nodiscard]] float weight(std::int64_t t, int j) const noexcept { return topk_weights[static_cast<std::size_t>(t * top_k + j)]; }
  [[nodiscard]] routing_view view() const noexcept { return {topk_ids, topk_weights, num_tokens, top_k}; }
  operator routing_view() const noexcept { return view(); }  // NOLINT: a routing is usable wherever a view is
};

/// @brief Checks routing supplied by a caller: shapes, ids in [0, num_experts) or -1, no expert twice
/// within a token, finite weights. Throws `specmoe::error` naming the token and slot.
inline void validate_routing(routing_view r, int num_experts, std::int64_t expected_tokens, int expected_top_k) {
  SPECMOE_EXPECTS(r.num_tokens == expected_tokens, errc::shape_mismatch, "routing has ", r.num_tokens,
                  " tokens, the batch has ", expected_tokens);
  SPECMOE_EXPECTS(r.top_k == expected_top_k, errc::shape_mismatch, "routing has top_k ", r.top_k,
                  ", the layer expects ", expected_top_k);
  auto const n = static_cast<std::size_t>(r.num_tokens * r.top_k);
  SPECMOE_EXPECTS(r.topk_ids.size() == n && r.topk_weights.size() == n, errc::shape_mismatch,
                  "routing arrays hold ", r.topk_ids.size(), " ids and ", r.topk_weights.size(),
                  " weights, expected ", n, " each (num_tokens x top_k)");
  for (std::int64_t t = 0; t < r.num_tokens; ++t) {
    for (int j = 0; j < r.top_k; ++j) {
      auto const e = r.id(t, j);
      SPECMOE_EXPECTS(e >= -1 && e < num_experts, errc::expert_out_of_range, "expert id ", e, " of token ", t,
                      " slot ", j, " is out of range [0, ", num_experts, ")");
      SPECMOE_EXPECTS(std::isfinite(r.weight(t, j)), errc::non_finite, "routing weight of token ", t, " slot ", j,
                      " is not finite (", r.weight(t, j), ")");
      for (int i = 0; i < j && e >= 0; ++i) {
        SPECMOE_EXPECTS(r.id(t, i) != e, errc::expert_out_of_range, "expert ", e, " appears twice in token ", t,
                        " (slots ", i, " and ", j, ")");
      }
    }
  }
}

}  // namespace specmoe
