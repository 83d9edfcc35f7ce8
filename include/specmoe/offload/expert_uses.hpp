// specmoe/offload/expert_uses.hpp: how often each expert was chosen in a stretch of a routing
// trace, the counts an expert cache starts from (expert_cache::seed_uses,
// offloaded_moe_stack::warm_start; issue 7).
#pragma once

#include <specmoe/core/error.hpp>
#include <specmoe/trace/routing_trace.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace specmoe::offload {

/// @brief Activations per expert over tokens [begin, end) of `tr`: [layers * experts], layer-major.
/// Negative ids (a slot left empty) are skipped.
/// @throw specmoe::error invalid_argument when the range lies outside the trace; expert_out_of_range
///        for an id at or past the trace's expert count.
inline std::vector<std::uint64_t> uses_from_trace(trace::routing_trace const& tr, std::int64_t begin, std::int64_t end) {
  auto const& m = tr.meta;
  SPECMOE_EXPECTS(0 <= begin && begin <= end && end <= m.tokens, errc::invalid_argument, "uses_from_trace: tokens [", begin, ", ",
                  end, ") outside the trace's [0, ", m.tokens, ")");
  std::vector<std::uint64_t> uses(static_cast<std::size_t>(m.layers) * static_cast<std::size_t>(m.experts), 0);
  for (int l = 0; l < m.layers; ++l) {
    for (std::int64_t t = begin; t < end; ++t) {
      for (int j = 0; j < m.top_k; ++j) {
        auto const e = tr.id(l, t, j);
        if (e < 0) continue;
        SPECMOE_EXPECTS(e < m.experts, errc::expert_out_of_range, "uses_from_trace: layer ", l, " token ", t, " names expert ", e,
                        " of ", m.experts);
        ++uses[static_cast<std::size_t>(l) * static_cast<std::size_t>(m.experts) + static_cast<std::size_t>(e)];
      }
    }
  }
  return uses;
}

/// @brief Indices (layer * experts + expert) of the at most `n` most used experts with a use,
/// most used first (ties in index order): the set a warm start makes resident.
inline std::vector<std::size_t> most_used(std::span<std::uint64_t const> uses, std::size_t n) {
  std::vector<std::size_t> order(uses.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return uses[a] > uses[b]; });
  std::size_t keep = 0;
  while (keep < order.size() && keep < n && uses[order[keep]] > 0) ++keep;
  order.resize(keep);
  return order;
}

}  // namespace specmoe::offload
