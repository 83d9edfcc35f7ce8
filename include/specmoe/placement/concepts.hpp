// specmoe/placement/concepts.hpp: the TokenPlacement policy — where should each token be when the gate runs?
#pragma once

#include <specmoe/core/expert_placement.hpp>
#include <specmoe/core/moe_config.hpp>
#include <specmoe/core/token_plan.hpp>
#include <specmoe/router/concepts.hpp>

#include <concepts>
#include <cstdint>
#include <span>

namespace specmoe {

/// @brief What the layer gives a placement policy (step 2, after predict, before the gate).
struct placement_request {
  moe_config const& config;
  std::int64_t num_tokens = 0;
  std::span<int const> home_rank;                 ///< [num_tokens]
  std::span<std::int64_t const> tokens_per_rank;  ///< [num_ranks] tokens each rank starts with
  prediction const& predicted;                    ///< rank[t] filled where the predictor guessed (-1 otherwise)
  expert_placement const& placement;
};

/// @brief TokenPlacement: picks the rank each token sits on when the gate runs.
///
/// The layer calls `p.plan(request, plan)` once per forward, only if `P::moves_tokens` is true
/// (otherwise every token stays home and no rows move). `plan.rank` must be sized num_tokens
/// with ranks in [0, num_ranks). The layer moves the rows there and back; outputs return to
/// their home rows, so the plan changes traffic, never the result.
template <class P>
concept token_placement = std::move_constructible<P> &&
    requires(P& p, placement_request const& request, token_plan& plan) {
      { P::moves_tokens } -> std::convertible_to<bool>;
      p.plan(request, plan);
    };

/// @brief The default: tokens stay where they are (plain expert parallelism).
struct stay {
  static constexpr bool moves_tokens = false;
  void plan(placement_request const& r, token_plan& plan) const {
    plan.rank.assign(r.home_rank.begin(), r.home_rank.end());
  }
};
static_assert(token_placement<stay>);

/// @brief Moves each token to its predicted rank (home when there is no guess), with no load
/// balancing: the simplest speculative placement, and an upper bound on what shuffling saves.
struct follow_prediction {
  static constexpr bool moves_tokens = true;
  void plan(placement_request const& r, token_plan& plan) const {
    plan.rank.assign(r.home_rank.begin(), r.home_rank.end());
    for (std::size_t t = 0; t < plan.rank.size(); ++t) {
      if (r.predicted.rank.size() == plan.rank.size() && r.predicted.rank[t] >= 0) plan.rank[t] = r.predicted.rank[t];
    }
  }
};
static_assert(token_placement<follow_prediction>);

}  // namespace specmoe
