// specmoe/router/concepts.hpp: the RouterPredictor policy — which experts will a token choose?
#pragma once

#include <specmoe/core/error.hpp>
#include <specmoe/core/expert_placement.hpp>
#include <specmoe/core/matrix_view.hpp>
#include <specmoe/core/moe_config.hpp>
#include <specmoe/core/routing.hpp>

#include <algorithm>
#include <concepts>
#include <cstdint>
#include <span>
#include <vector>

namespace specmoe {

/// @brief A predictor's guess for a batch, before the gate runs.
///
/// A predictor fills `experts` (a guess of each token's experts, best first), `rank` (a guess of
/// the rank that will serve most of the token's experts), or both. The layer derives a missing
/// rank from the experts (the rank owning most of them). -1 marks "no guess" in either array.
struct prediction {
  int width = 0;                      ///< experts guessed per token (0: ranks only)
  std::vector<std::int32_t> experts;  ///< [num_tokens, width], -1 = none
  std::vector<int> rank;              ///< [num_tokens], -1 = none
  std::vector<float> confidence;      ///< [num_tokens] in [0, 1] (optional; empty = unknown)

  /// Sizes the arrays for n tokens and `w` experts each, every entry "no guess".
  void reset(std::int64_t n, int w) {
    width = w;
    experts.assign(static_cast<std::size_t>(n) * static_cast<std::size_t>(w), -1);
    rank.assign(static_cast<std::size_t>(n), -1);
    confidence.clear();
  }
  [[nodiscard]] std::int32_t expert(std::int64_t t, int j) const noexcept {
    return experts[static_cast<std::size_t>(t * width + j)];
  }
};

/// @brief What the layer tells a predictor when it asks (step 1, before placement and gate).
struct prediction_request {
  moe_config const& config;                 ///< the layer (config.layer is its index)
  std::int64_t num_tokens = 0;
  std::span<int const> home_rank;           ///< [num_tokens] the rank each token starts on
  std::span<std::int64_t const> token_ids;  ///< [num_tokens] vocabulary ids, or empty when the engine gave none
  matrix_view<float const> activations;     ///< [num_tokens, hidden] the layer's input in fp32
  expert_placement const& placement;        ///< who owns which expert
};

/// @brief What actually happened, given back to the predictor after the layer (step 8).
struct routing_observation {
  moe_config const& config;
  std::span<int const> home_rank;           ///< [num_tokens]
  std::span<int const> gate_rank;           ///< [num_tokens] where each token was when the gate ran
  std::span<std::int64_t const> token_ids;  ///< [num_tokens] or empty
  routing_view routing;                     ///< the real routing, in batch order
  expert_placement const& placement;
  prediction const* predicted = nullptr;    ///< this call's prediction (null when the predictor does not predict)
};

/// @brief RouterPredictor: guesses routing before the gate runs.
///
/// The layer calls, once per forward and in this order:
///  - `p.predict(request, out)` with `out` empty, if `P::predicts` is true; `out` must then be
///    sized for request.num_tokens (use `out.reset(n, width)`);
///  - `p.observe(observation)` after the output is written, always (so tables can learn even
///    when predictions are switched off).
/// A guess only moves tokens; it never changes the output.
template <class P>
concept router_predictor = std::move_constructible<P> &&
    requires(P& p, prediction_request const& request, prediction& out, routing_observation const& observed) {
      { P::predicts } -> std::convertible_to<bool>;
      p.predict(request, out);
      p.observe(observed);
    };

/// @brief The default: no speculation. The layer skips the predict step.
struct no_prediction {
  static constexpr bool predicts = false;
  void predict(prediction_request const&, prediction&) {}
  void observe(routing_observation const&) {}
};
static_assert(router_predictor<no_prediction>);

/// @brief Checks a predictor's answer (sizes and ranges); throws `errc::invalid_argument` naming the
/// token, so a buggy user predictor is reported, not silently followed.
inline void validate_prediction(prediction const& p, std::int64_t n, int num_experts, int num_ranks) {
  SPECMOE_EXPECTS(p.width >= 0, errc::invalid_argument, "prediction width is negative (", p.width, ")");
  SPECMOE_EXPECTS(p.experts.size() == static_cast<std::size_t>(n) * static_cast<std::size_t>(p.width),
                  errc::invalid_argument, "prediction holds ", p.experts.size(), " expert guesses, expected ", n,
                  " tokens x width ", p.width);
  SPECMOE_EXPECTS(p.rank.size() == static_cast<std::size_t>(n), errc::invalid_argument, "prediction holds ",
                  p.rank.size(), " rank guesses for ", n, " tokens");
  SPECMOE_EXPECTS(p.confidence.empty() || p.confidence.size() == static_cast<std::size_t>(n),
                  errc::invalid_argument, "prediction holds ", p.confidence.size(), " confidences for ", n,
                  " tokens");
  for (std::size_t i = 0; i < p.experts.size(); ++i) {
    SPECMOE_EXPECTS(p.experts[i] >= -1 && p.experts[i] < num_experts, errc::expert_out_of_range,
                    "predicted expert ", p.experts[i], " of token ", i / static_cast<std::size_t>(p.width),
                    " is out of range [0, ", num_experts, ")");
  }
  for (std::size_t t = 0; t < p.rank.size(); ++t) {
    SPECMOE_EXPECTS(p.rank[t] >= -1 && p.rank[t] < num_ranks, errc::invalid_argument, "predicted rank ", p.rank[t],
                    " of token ", t, " is out of range [0, ", num_ranks, ")");
  }
}

/// @brief Fills rank guesses missing from `p` with the rank owning most of the token's predicted
/// experts (its home rank when that is among the best, else the lowest such rank): a token
/// gated there finds the most of those experts local.
inline void derive_predicted_ranks(prediction& p, expert_placement const& placement, std::span<int const> home) {
  std::vector<int> votes(static_cast<std::size_t>(placement.num_ranks()));
  for (std::size_t t = 0; t < p.rank.size(); ++t) {
    if (p.rank[t] >= 0 || p.width == 0) continue;
    std::fill(votes.begin(), votes.end(), 0);
    bool any = false;
    for (int j = 0; j < p.width; ++j) {
      auto const e = p.expert(static_cast<std::int64_t>(t), j);
      if (e < 0) continue;
      any = true;
      for (int o : placement.owners(e)) ++votes[static_cast<std::size_t>(o)];
    }
    if (!any) continue;
    int best = home[t];
    for (int d = 0; d < placement.num_ranks(); ++d) {
      if (votes[static_cast<std::size_t>(d)] > votes[static_cast<std::size_t>(best)]) best = d;
    }
    p.rank[t] = best;
  }
}

}  // namespace specmoe
