// specmoe/core/expert_weights.hpp: views of a layer's weights (router, routed and shared experts).
#pragma once

#include <specmoe/core/bfloat16.hpp>
#include <specmoe/core/error.hpp>
#include <specmoe/core/matrix_view.hpp>
#include <specmoe/core/moe_config.hpp>

#include <cmath>
#include <cstdint>
#include <span>

namespace specmoe {

/// @brief A stack of per-expert matrices `[count, rows, cols]` in caller memory.
///
/// Strides let one view cover engine layouts without copies: vLLM's fused `w13` [E, 2F, H] is two
/// tensors sharing storage (gate rows first, then up rows), each with expert_stride 2FH.
template <class W>
struct expert_tensor {
  W const* data = nullptr;
  std::int64_t count = 0;
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  std::int64_t expert_stride = 0;  ///< elements between consecutive experts' first elements
  std::int64_t row_stride = 0;     ///< elements between consecutive rows of one expert

  /// A densely packed stack.
  static expert_tensor packed(W const* data, std::int64_t count, std::int64_t rows, std::int64_t cols) {
    return {data, count, rows, cols, rows * cols, cols};
  }
  /// Expert e's matrix.
  [[nodiscard]] matrix_view<W const> operator[](std::int64_t e) const noexcept {
    return {data + e * expert_stride, rows, cols, row_stride};
  }
};

/// @brief SwiGLU expert weights: y = down · (silu(gate · x) ⊙ (up · x)).
///
/// Shapes: gate and up [count, ffn, hidden], down [count, hidden, ffn] (PyTorch Linear layout:
/// out_features rows, in_features columns). For routed experts `count` = num_experts and the
/// tensor is indexed by global expert id; for shared experts `count` = num_shared_experts.
template <class W>
struct ffn_weights {
  expert_tensor<W> gate;
  expert_tensor<W> up;
  expert_tensor<W> down;

  /// Separate, densely packed gate, up and down stacks (transformers' Mixtral/Qwen/DeepSeek layout).
  static ffn_weights dense(W const* gate, W const* up, W const* down, std::int64_t count, std::int64_t hidden,
                           std::int64_t ffn) {
    return {expert_tensor<W>::packed(gate, count, ffn, hidden), expert_tensor<W>::packed(up, count, ffn, hidden),
            expert_tensor<W>::packed(down, count, hidden, ffn)};
  }
  /// vLLM's layout: w13 [count, 2*ffn, hidden] (gate rows, then up rows) and w2 [count, hidden, ffn].
  static ffn_weights fused_gate_up(W const* w13, W const* w2, std::int64_t count, std::int64_t hidden,
                                   std::int64_t ffn) {
    return {{w13, count, ffn, hidden, 2 * ffn * hidden, hidden},
            {w13 + ffn * hidden, count, ffn, hidden, 2 * ffn * hidden, hidden},
            expert_tensor<W>::packed(w2, count, hidden, ffn)};
  }

  [[nodiscard]] std::int64_t count() const noexcept { return gate.count; }
  [[nodiscard]] std::int64_t ffn_size() const noexcept { return gate.rows; }
};

/// @brief The router: logits = weight · x, weight [num_experts, hidden]; DeepSeek-V3's
/// score-correction bias [num_experts] (used to choose experts, not in the weights).
template <class W>
struct gate_weights {
  matrix_view<W const> weight;
  std::span<float const> score_bias;
};

/// @brief Everything one MoE layer computes with. Views only: the caller keeps the memory alive.
template <class W>
struct moe_weights {
  gate_weights<W> router;
  ffn_weights<W> experts;
  ffn_weights<W> shared;  ///< count 0 when the layer has no shared experts
};

namespace detail {
template <class W>
void check_tensor(expert_tensor<W> const& t, char const* name, std::int64_t count, std::int64_t rows,
                  std::int64_t cols) {
  SPECMOE_EXPECTS(t.count == count && t.rows == rows && t.cols == cols, errc::shape_mismatch, name, " is [",
                  t.count, ", ", t.rows, ", ", t.cols, "], the config needs [", count, ", ", rows, ", ", cols, "]");
  SPECMOE_EXPECTS(count == 0 || t.data != nullptr, errc::invalid_argument, name, " points at nothing");
  SPECMOE_EXPECTS(t.row_stride >= t.cols && (count <= 1 || t.expert_stride >= 1), errc::invalid_argument, name,
                  " has row stride ", t.row_stride, " and expert stride ", t.expert_stride, " for ", t.cols,
                  " columns");
}

template <class W>
void check_finite(expert_tensor<W> const& t, char const* name) {
  for (std::int64_t e = 0; e < t.count; ++e) {
    auto const m = t[e];
    for (std::int64_t r = 0; r < m.rows; ++r) {
      for (std::int64_t c = 0; c < m.cols; ++c) {
        SPECMOE_EXPECTS(std::isfinite(to_float(m(r, c))), errc::non_finite, name, "[", e, "][", r, "][", c,
                        "] is not finite (", to_float(m(r, c)), ")");
      }
    }
  }
}
}  // namespace detail

/// @brief Checks that the views match `cfg` (shapes, non-null, bias present iff the gate uses one)
/// and, when `check_values`, that every weight is finite. Throws `specmoe::error` naming the tensor.
template <storage_type W>
void validate_weights(moe_weights<W> const& w, moe_config const& cfg, bool check_values = true) {
  auto const E = cfg.num_experts, H = cfg.hidden_size, F = cfg.ffn_size;
  SPECMOE_EXPECTS(w.router.weight.rows == E && w.router.weight.cols == H, errc::shape_mismatch, "router weight is [",
                  w.router.weight.rows, ", ", w.router.weight.cols, "], the config needs [", E, ", ", H, "]");
  SPECMOE_EXPECTS(w.router.weight.data != nullptr, errc::invalid_argument, "router weight points at nothing");
  if (cfg.gate.has_score_bias) {
    SPECMOE_EXPECTS(static_cast<int>(w.router.score_bias.size()) == E, errc::shape_mismatch, "score bias has ",
                    w.router.score_bias.size(), " entries, the config needs ", E);
  } else {
    SPECMOE_EXPECTS(w.router.score_bias.empty(), errc::invalid_argument,
                    "a score bias was given but gate.has_score_bias is false");
  }
  detail::check_tensor(w.experts.gate, "experts.gate", E, F, H);
  detail::check_tensor(w.experts.up, "experts.up", E, F, H);
  detail::check_tensor(w.experts.down, "experts.down", E, H, F);
  auto const S = cfg.num_shared_experts, SF = cfg.num_shared_experts ? cfg.shared_ffn_size : 0;
  if (S > 0 || w.shared.count() > 0) {
    detail::check_tensor(w.shared.gate, "shared.gate", S, SF, H);
    detail::check_tensor(w.shared.up, "shared.up", S, SF, H);
    detail::check_tensor(w.shared.down, "shared.down", S, H, SF);
  }
  if (!check_values) return;
  for (std::int64_t r = 0; r < E; ++r) {
    for (std::int64_t c = 0; c < H; ++c) {
      SPECMOE_EXPECTS(std::isfinite(to_float(w.router.weight(r, c))), errc::non_finite, "router weight[", r, "][",
                      c, "] is not finite");
    }
  }
  for (std::size_t e = 0; e < w.router.score_bias.size(); ++e) {
    SPECMOE_EXPECTS(std::isfinite(w.router.score_bias[e]), errc::non_finite, "score bias[", e, "] is not finite");
  }
  detail::check_finite(w.experts.gate, "experts.gate");
  detail::check_finite(w.experts.up, "experts.up");
  detail::check_finite(w.experts.down, "experts.down");
  detail::check_finite(w.shared.gate, "shared.gate");
  detail::check_finite(w.shared.up, "shared.up");
  detail::check_finite(w.shared.down, "shared.down");
}

}  // namespace specmoe
