// specmoe/core/moe_config.hpp: the shape of one MoE layer and how its router gates.
#pragma once

#include <specmoe/core/error.hpp>

#include <cstdint>
#include <ostream>
#include <string>

namespace specmoe {

/// @brief Which router a layer uses.
enum class gate_kind {
  /// Mixtral, Qwen: p = softmax(logits); pick the top_k largest p; weights = p, optionally
  /// divided by their sum (`renormalize`).
  softmax_topk,
  /// DeepSeek-V3: s = sigmoid(logits); choose with s + bias; keep the `topk_groups` groups with
  /// the largest sum of their two best biased scores; pick top_k inside them; weights = s
  /// (unbiased), optionally renormalised, times `routed_scaling_factor`.
  sigmoid_grouped_topk,
};

constexpr char const* to_string(gate_kind k) noexcept {
  return k == gate_kind::softmax_topk ? "softmax_topk" : "sigmoid_grouped_topk";
}

/// @brief Router parameters. Defaults describe Mixtral's gate.
struct gate_config {
  gate_kind kind = gate_kind::softmax_topk;
  bool renormalize = true;              ///< divide the top-k weights by their sum (norm_topk_prob)
  int num_groups = 1;                   ///< n_group (sigmoid_grouped_topk); must divide num_experts
  int topk_groups = 1;                  ///< topk_group: groups kept per token
  float routed_scaling_factor = 1.0f;   ///< multiplies the final routed weights
  bool has_score_bias = false;          ///< a score-correction bias [num_experts] is supplied

  friend bool operator==(gate_config const&, gate_config const&) = default;
};

/// @brief The shape of one MoE layer and the world it runs in.
///
/// Every rank of an expert-parallel group must hold an equal `moe_config`; the layers check this
/// across ranks at construction (`errc::rank_mismatch`).
struct moe_config {
  int hidden_size = 0;          ///< H: width of token activations
  int ffn_size = 0;             ///< F: intermediate width of each routed expert (SwiGLU)
  int num_experts = 0;          ///< E: routed experts
  int top_k = 0;                ///< experts per token
  gate_config gate{};
  int num_shared_experts = 0;   ///< experts every token goes through, weight 1 (DeepSeek)
  int shared_ffn_size = 0;      ///< intermediate width of each shared expert
  int num_ranks = 1;            ///< D: expert-parallel ranks
  int layer = 0;                ///< index of this MoE layer in the model (policies key on it)

  friend bool operator==(moe_config const&, moe_config const&) = default;

  /// @brief Throws `specmoe::error` naming the first field that is out of its domain.
  void validate() const {
    SPECMOE_EXPECTS(hidden_size > 0, errc::invalid_argument, "hidden_size must be positive, got ", hidden_size);
    SPECMOE_EXPECTS(ffn_size > 0, errc::invalid_argument, "ffn_size must be positive, got ", ffn_size);
    SPECMOE_EXPECTS(num_experts > 0, errc::invalid_argument, "num_experts must be positive, got ", num_experts);
    SPECMOE_EXPECTS(top_k > 0, errc::invalid_argument, "top_k must be positive, got ", top_k);
    SPECMOE_EXPECTS(top_k <= num_experts, errc::invalid_argument, "top_k ", top_k, " is larger than num_experts ",
                    num_experts);
    SPECMOE_EXPECTS(num_ranks > 0, errc::invalid_argument, "num_ranks must be positive, got ", num_ranks);
    SPECMOE_EXPECTS(layer >= 0, errc::invalid_argument, "layer must be non-negative, got ", layer);
    SPECMOE_EXPECTS(num_shared_experts >= 0, errc::invalid_argument, "num_shared_experts must be >= 0, got ",
                    num_shared_experts);
    SPECMOE_EXPECTS(num_shared_experts == 0 || shared_ffn_size > 0, errc::invalid_argument,
                    "shared_ffn_size must be positive when there are shared experts, got ", shared_ffn_size);
    SPECMOE_EXPECTS(gate.routed_scaling_factor > 0.0f && gate.routed_scaling_factor < 1e30f, errc::invalid_argument,
                    "routed_scaling_factor must be positive and finite, got ", gate.routed_scaling_factor);
    if (gate.kind == gate_kind::sigmoid_grouped_topk) {
      SPECMOE_EXPECTS(gate.num_groups > 0 && num_experts % gate.num_groups == 0, errc::invalid_argument,
                      "num_groups ", gate.num_groups, " must divide num_experts ", num_experts);
      SPECMOE_EXPECTS(gate.topk_groups > 0 && gate.topk_groups <= gate.num_groups, errc::invalid_argument,
                      "topk_groups ", gate.topk_groups, " must be in [1, num_groups ", gate.num_groups, "]");
      SPECMOE_EXPECTS(top_k <= gate.topk_groups * (num_experts / gate.num_groups), errc::invalid_argument, "top_k ",
                      top_k, " exceeds the experts in the kept groups (", gate.topk_groups, " x ",
                      num_experts / gate.num_groups, ")");
    } else {
      SPECMOE_EXPECTS(gate.num_groups == 1 && gate.topk_groups == 1, errc::invalid_argument,
                      "num_groups/topk_groups apply to sigmoid_grouped_topk only; softmax_topk needs 1/1, got ",
                      gate.num_groups, "/", gate.topk_groups);
    }
  }

  /// Experts per rank under an even split (the contiguous-blocks default), rounded up.
  [[nodiscard]] int experts_per_rank_ceil() const noexcept { return (num_experts + num_ranks - 1) / num_ranks; }
};

inline std::ostream& operator<<(std::ostream& os, gate_config const& g) {
  os << to_string(g.kind) << "{renormalize=" << g.renormalize;
  if (g.kind == gate_kind::sigmoid_grouped_topk) {
    os << ", groups=" << g.num_groups << ", topk_groups=" << g.topk_groups << ", bias=" << g.has_score_bias;
  }
  return os << ", scale=" << g.routed_scaling_factor << "}";
}

inline std::ostream& operator<<(std::ostream& os, moe_config const& c) {
  return os << "moe_config{hidden=" << c.hidden_size << ", ffn=" << c.ffn_size << ", experts=" << c.num_experts
            << ", top_k=" << c.top_k << ", gate=" << c.gate << ", shared=" << c.num_shared_experts << "x"
            << c.shared_ffn_size << ", ranks=" << c.num_ranks << ", layer=" << c.layer << "}";
}

/// @brief Names the first field in which two configs differ ("" when equal), for rank-mismatch
/// messages such as "hidden_size 4096 vs 2048".
inline std::string describe_difference(moe_config const& a, moe_config const& b) {
  auto field = [](char const* name, auto x, auto y) { return detail::concat(name, " ", x, " vs ", y); };
  if (a.hidden_size != b.hidden_size) return field("hidden_size", a.hidden_size, b.hidden_size);
  if (a.ffn_size != b.ffn_size) return field("ffn_size", a.ffn_size, b.ffn_size);
  if (a.num_experts != b.num_experts) return field("num_experts", a.num_experts, b.num_experts);
  if (a.top_k != b.top_k) return field("top_k", a.top_k, b.top_k);
  if (!(a.gate == b.gate)) return detail::concat("gate ", a.gate, " vs ", b.gate);
  if (a.num_shared_experts != b.num_shared_experts)
    return field("num_shared_experts", a.num_shared_experts, b.num_shared_experts);
  if (a.shared_ffn_size != b.shared_ffn_size) return field("shared_ffn_size", a.shared_ffn_size, b.shared_ffn_size);
  if (a.num_ranks != b.num_ranks) return field("num_ranks", a.num_ranks, b.num_ranks);
  if (a.layer != b.layer) return field("layer", a.layer, b.layer);
  return {};
}

/// @brief Published model shapes, for examples and benchmarks. `num_ranks` is the EP degree.
namespace models {

/// Mixtral-8x7B: hidden 4096, FFN 14336, 8 experts, top-2, softmax with renormalisation.
inline moe_config mixtral_8x7b(int num_ranks = 1) {
  return {.hidden_size = 4096, .ffn_size = 14336, .num_experts = 8, .top_k = 2, .gate = {}, .num_ranks = num_ranks};
}

/// Qwen3-30B-A3B: hidden 2048, FFN 768, 128 experts, top-8, softmax with norm_topk_prob.
inline moe_config qwen3_30b_a3b(int num_ranks = 1) {
  return {.hidden_size = 2048, .ffn_size = 768, .num_experts = 128, .top_k = 8, .gate = {}, .num_ranks = num_ranks};
}

/// DeepSeek-V2-Lite: hidden 2048, FFN 1408, 64 routed experts, top-6, softmax without
/// renormalisation, two shared experts of FFN 1408 (26 MoE layers; SP-MoE's offloading shape).
inline moe_config deepseek_v2_lite(int num_ranks = 1) {
  return {.hidden_size = 2048,
          .ffn_size = 1408,
          .num_experts = 64,
          .top_k = 6,
          .gate = {.renormalize = false},
          .num_shared_experts = 2,
          .shared_ffn_size = 1408,
          .num_ranks = num_ranks};
}

/// DeepSeek-V3: hidden 7168, FFN 2048, 256 routed experts in 8 groups (4 kept), top-8, sigmoid
/// with score-correction bias, routed scaling 2.5, one shared expert of FFN 2048.
inline moe_config deepseek_v3(int num_ranks = 1) {
  return {.hidden_size = 7168,
          .ffn_size = 2048,
          .num_experts = 256,
          .top_k = 8,
          .gate = {.kind = gate_kind::sigmoid_grouped_topk,
                   .renormalize = true,
                   .num_groups = 8,
                   .topk_groups = 4,
                   .routed_scaling_factor = 2.5f,
                   .has_score_bias = true},
          .num_shared_experts = 1,
          .shared_ffn_size = 2048,
          .num_ranks = num_ranks};
}

}  // namespace models
}  // namespace specmoe
