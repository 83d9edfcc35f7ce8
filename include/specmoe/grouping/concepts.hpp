// specmoe/grouping/concepts.hpp: the ExpertGrouping policy — which rank(s) hold each expert?
#pragma once

#include <specmoe/core/error.hpp>
#include <specmoe/core/expert_placement.hpp>
#include <specmoe/core/moe_config.hpp>

#include <concepts>
#include <vector>

namespace specmoe {

/// @brief ExpertGrouping: decides expert ownership for a layer.
///
/// The layer calls `g.place(config, rank)` once per rank at construction (on real multi-GPU
/// runs each rank calls it for itself) and checks that every rank got the same answer
/// (`errc::rank_mismatch` otherwise). config.layer selects the layer; config.num_ranks is D.
template <class G>
concept expert_grouping = std::move_constructible<G> && requires(G const& g, moe_config const& config, int rank) {
  { g.place(config, rank) } -> std::same_as<expert_placement>;
};

/// @brief The default: rank r holds experts [r*E/D, (r+1)*E/D) (plain expert parallelism).
struct contiguous_blocks {
  [[nodiscard]] expert_placement place(moe_config const& config, int /*rank*/) const {
    auto const E = config.num_experts, D = config.num_ranks;
    std::vector<int> owner(static_cast<std::size_t>(E));
    for (int r = 0; r < D; ++r) {
      auto const first = static_cast<long long>(r) * E / D, last = static_cast<long long>(r + 1) * E / D;
      for (auto e = first; e < last; ++e) owner[static_cast<std::size_t>(e)] = r;
    }
    return expert_placement::from_owners(D, owner);
  }
};
static_assert(expert_grouping<contiguous_blocks>);

/// @brief A placement given as data: one for every layer, or one per layer index (plans made
/// offline, replicated hot experts, tests).
struct explicit_placement {
  std::vector<expert_placement> per_layer;  ///< one entry: used for every layer

  explicit_placement() = default;
  explicit explicit_placement(expert_placement p) : per_layer{std::move(p)} {}
  explicit explicit_placement(std::vector<expert_placement> layers) : per_layer(std::move(layers)) {}

  [[nodiscard]] expert_placement place(moe_config const& config, int /*rank*/) const {
    SPECMOE_EXPECTS(!per_layer.empty(), errc::invalid_argument, "explicit_placement holds no placement");
    auto const i = per_layer.size() == 1 ? 0 : static_cast<std::size_t>(config.layer);
    SPECMOE_EXPECTS(i < per_layer.size(), errc::invalid_argument, "explicit_placement has no placement for layer ",
                    config.layer, " (it holds ", per_layer.size(), ")");
    auto const& p = per_layer[i];
    SPECMOE_EXPECTS(p.num_experts() == config.num_experts && p.num_ranks() == config.num_ranks,
                    errc::shape_mismatch, "explicit placement of layer ", config.layer, " covers ", p.num_experts(),
                    " experts on ", p.num_ranks(), " ranks, the layer has ", config.num_experts, " on ",
                    config.num_ranks);
    return p;
  }
};
static_assert(expert_grouping<explicit_placement>);

}  // namespace specmoe
