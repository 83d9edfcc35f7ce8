// specmoe/prefetch/depth_policies.hpp: the PrefetchDepth policies for offloaded experts (SP-MoE).
//
//   on_demand      nothing is prefetched; every miss is a demand load (the LRU baseline)
//   fixed_depth    up to d layers ahead of the layer computing (during drafting: layers 0 .. d-1)
//   cutoff_layer   SP-MoE: predictions for target layers below the cutoff L are prefetched, from
//                  drafting on; layers >= L wait for their demand loads. L comes from the latency
//                  model (prefetch/latency_model.hpp: choose_cutoff) or is given.
//
// `depth(layer)` follows the concept: how many layers past `layer` may be fetched now; the draft
// phase, before verification's layer 0, asks with layer = -1.
#pragma once

#include <specmoe/core/error.hpp>
#include <specmoe/prefetch/concepts.hpp>

namespace specmoe::prefetch {

/// @brief No prefetch: experts are offloaded and loaded when a layer needs them.
struct on_demand {
  static constexpr bool offloads = true;
  [[nodiscard]] int depth(int /*layer*/) const noexcept { return 0; }
};

/// @brief A fixed look-ahead of `layers_ahead` layers.
struct fixed_depth {
  static constexpr bool offloads = true;
  int layers_ahead = 1;
  explicit fixed_depth(int d = 1) : layers_ahead(d) {
    SPECMOE_EXPECTS(d >= 0, errc::invalid_argument, "fixed_depth: layers_ahead must be >= 0, got ", d);
  }
  [[nodiscard]] int depth(int /*layer*/) const noexcept { return layers_ahead; }
};

/// @brief SP-MoE's cutoff: target layers 0 .. cutoff-1 may be prefetched from the draft phase on.
struct cutoff_layer {
  static constexpr bool offloads = true;
  int cutoff = 0;
  explicit cutoff_layer(int L = 0) : cutoff(L) {
    SPECMOE_EXPECTS(L >= 0, errc::invalid_argument, "cutoff_layer: cutoff must be >= 0, got ", L);
  }
  [[nodiscard]] int depth(int layer) const noexcept { return cutoff - 1 - layer > 0 ? cutoff - 1 - layer : 0; }
};

static_assert(prefetch_depth<on_demand> && prefetch_depth<fixed_depth> && prefetch_depth<cutoff_layer>);

/// @brief May `target` be prefetched while `current` computes (current = -1: the draft phase)?
template <prefetch_depth P>
[[nodiscard]] bool may_prefetch(P const& p, int current, int target) noexcept {
  return P::offloads && target > current && target - current <= p.depth(current);
}

}  // namespace specmoe::prefetch
