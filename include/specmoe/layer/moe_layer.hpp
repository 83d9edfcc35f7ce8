// specmoe/layer/moe_layer.hpp: the generic MoE layer that the five policies plug into.
#pragma once

#include <specmoe/comm/concepts.hpp>
#include <specmoe/core/bfloat16.hpp>
#include <specmoe/core/matrix_view.hpp>
#include <specmoe/core/routing.hpp>
#include <specmoe/core/spaces.hpp>
#include <specmoe/grouping/concepts.hpp>
#include <specmoe/placement/concepts.hpp>
#include <specmoe/prefetch/concepts.hpp>
#include <specmoe/router/concepts.hpp>

#include <cstdint>
#include <optional>
#include <span>

namespace specmoe {

/// @brief The policy objects a layer is built with; members default-construct when omitted:
/// `layer_policies<...>{.predictor = my_predictor{table}}`.
template <class Predictor, class Placement, class Grouping, class Prefetch, class Comm>
struct layer_policies {
  Predictor predictor{};
  Placement placement{};
  Grouping grouping{};
  Prefetch prefetch{};
  Comm comm{};
};

/// @brief How results return to the token's rank.
enum class combine_mode {
  /// One row per (token, expert) comes back and the token's rank sums them in gate order: the
  /// output is bit-identical to the dense reference whatever the placement (the default).
  per_activation,
  /// Each expert rank sums its share of a token's contributions and returns one row per token
  /// (fewer bytes, what GPU backends do); the sum's order then depends on the placement, so the
  /// output matches the reference within rounding.
  reduce_at_expert_rank,
};

/// @brief Options of the host reference layer.
struct host_layer_options {
  combine_mode combine = combine_mode::per_activation;
  bool check_weight_values = true;  ///< scan all weights for NaN/Inf once, at construction
};

/// @brief One forward's input on host_space. Views only.
template <storage_type T>
struct host_batch {
  matrix_view<T const> x;                         ///< [num_tokens, hidden], ranks' tokens back to back
  std::span<std::int64_t const> tokens_per_rank;  ///< [num_ranks]; may be empty when num_ranks is 1
  std::span<std::int64_t const> token_ids{};      ///< [num_tokens] vocabulary ids for predictors (optional)
  std::optional<routing_view> routing{};          ///< routing the engine computed (skips the gate), batch order
};

/// @brief An MoE layer running in `Space`, with one policy per question (see DESIGN.md):
///
/// @tparam Space      host_space (the reference, D simulated ranks) or cuda_space
/// @tparam Predictor  RouterPredictor: which experts will each token choose? (`no_prediction`)
/// @tparam Placement  TokenPlacement: where does each token sit when the gate runs? (`stay`)
/// @tparam Grouping   ExpertGrouping: which rank(s) hold each expert? (`contiguous_blocks`)
/// @tparam Prefetch   PrefetchDepth: how far ahead are offloaded experts fetched? (`all_resident`)
/// @tparam Comm       CommBackend: how do rows move between ranks? (`in_process`)
///
/// Each forward runs: predict, place, gate, layout, dispatch, experts, combine, observe; the
/// output never depends on the predictor, placement or grouping. The primary template is
/// declared only: each space provides a specialization (layer/host_moe_layer.hpp, ...).
template <execution_space Space, router_predictor Predictor = no_prediction, token_placement Placement = stay,
          expert_grouping Grouping = contiguous_blocks, prefetch_depth Prefetch = all_resident,
          comm_backend Comm = in_process>
class moe_layer {
  static_assert(detail::always_false<Space>,
                "specmoe::moe_layer has no implementation for this Space: include <specmoe/layer/host_moe_layer.hpp> "
                "for host_space (or <specmoe/specmoe.hpp>)");
};

}  // namespace specmoe
