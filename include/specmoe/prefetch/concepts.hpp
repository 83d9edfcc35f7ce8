// specmoe/prefetch/concepts.hpp: the PrefetchDepth policy — how far ahead may experts be fetched?
#pragma once

#include <concepts>

namespace specmoe {

/// @brief PrefetchDepth: for offloaded experts, how many layers ahead of the one computing the
/// prefetcher may fetch.
///
/// `P::offloads` false means every expert is resident and the layer never asks. Otherwise the
/// layer's offload path calls `p.depth(layer)` before each layer's prefetch is issued: 0 = on
/// demand only; d = fetch experts predicted for layers layer+1 .. layer+d.
template <class P>
concept prefetch_depth = std::move_constructible<P> && requires(P const& p, int layer) {
  { P::offloads } -> std::convertible_to<bool>;
  { p.depth(layer) } -> std::convertible_to<int>;
};

/// @brief The default: all experts resident in device memory; nothing to prefetch.
struct all_resident {
  static constexpr bool offloads = false;
  [[nodiscard]] int depth(int /*layer*/) const noexcept { return 0; }
};
static_assert(prefetch_depth<all_resident>);

}  // namespace specmoe
