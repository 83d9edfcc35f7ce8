// specmoe/core/dispatch_layout.hpp: where one rank's tokens go, counted per peer and per expert.
#pragma once

#include <specmoe/core/expert_placement.hpp>
#include <specmoe/core/routing.hpp>

#include <cstdint>
#include <vector>

namespace specmoe {

/// @brief The dispatch layout of one source rank (DeepEP's vocabulary).
///
/// NOTES: a token bound for several experts on one rank is sent to that rank once
/// (de-duplication); the receiving rank applies all of them. Rows for the source rank itself are
/// laid out like any other peer's but never cross a link. Send rows are grouped by destination
/// rank in rank order and, within a destination, in token order: the layout is deterministic.
struct dispatch_layout {
  int num_ranks = 0;
  int num_experts = 0;
  int top_k = 0;
  std::int64_t num_tokens = 0;

  std::vector<std::int32_t> slot_rank;             ///< [num_tokens, top_k] rank serving each slot (-1: empty)
  std::vector<std::uint8_t> is_token_in_rank;      ///< [num_tokens, num_ranks]
  std::vector<std::int64_t> num_tokens_per_rank;   ///< [num_ranks] distinct tokens sent to each rank
  std::vector<std::int64_t> num_tokens_per_expert; ///< [num_experts] activations of each expert
  std::vector<std::int64_t> num_activations_per_rank;  ///< [num_ranks] activations each rank serves
  std::vector<std::int64_t> rank_prefix;           ///< [num_ranks + 1] exclusive prefix sum: send offsets
  std::vector<std::int64_t> send_token;            ///< [rank_prefix.back()] token of each send row
  std::vector<std::int64_t> send_row;              ///< [num_tokens, num_ranks] row of token t for rank d, or -1

  /// Rows that cross to other ranks, after de-duplication.
  [[nodiscard]] std::int64_t remote_rows(int self) const noexcept {
    return rank_prefix.back() - num_tokens_per_rank[static_cast<std::size_t>(self)];
  }
  /// Activations served by other ranks: the rows that would cross without de-duplication.
  [[nodiscard]] std::int64_t remote_activations(int self) const noexcept {
    std::int64_t n = 0;
    for (int d = 0; d < num_ranks; ++d) n += d == self ? 0 : num_activations_per_rank[static_cast<std::size_t>(d)];
    return n;
  }
};

/// @brief Builds the dispatch layout of rank `self` for `r` (its tokens' routing, indices local
/// to the rank) under `placement`. Runs in O(num_tokens x (top_k + num_ranks)).
inline dispatch_layout make_dispatch_layout(routing_view r, expert_placement const& placement, int self) {
  dispatch_layout l;
  l.num_ranks = placement.num_ranks();
  l.num_experts = placement.num_experts();
  l.top_k = r.top_k;
  l.num_tokens = r.num_tokens;
  auto const D = static_cast<std::size_t>(l.num_ranks);
  auto const n = static_cast<std::size_t>(r.num_tokens);
  l.slot_rank.assign(n * static_cast<std::size_t>(r.top_k), -1);
  l.is_token_in_rank.assign(n * D, 0);
  l.num_tokens_per_rank.assign(D, 0);
  l.num_tokens_per_expert.assign(static_cast<std::size_t>(l.num_experts), 0);
  l.num_activations_per_rank.assign(D, 0);
  for (std::size_t t = 0; t < n; ++t) {
    for (int j = 0; j < r.top_k; ++j) {
      auto const e = r.id(static_cast<std::int64_t>(t), j);
      if (e < 0) continue;
      auto const d = placement.serving_rank(e, self, static_cast<std::int64_t>(t));
      l.slot_rank[t * static_cast<std::size_t>(r.top_k) + static_cast<std::size_t>(j)] = d;
      ++l.num_tokens_per_expert[static_cast<std::size_t>(e)];
      ++l.num_activations_per_rank[static_cast<std::size_t>(d)];
      auto& in_rank = l.is_token_in_rank[t * D + static_cast<std::size_t>(d)];
      if (!in_rank) {
        in_rank = 1;
        ++l.num_tokens_per_rank[static_cast<std::size_t>(d)];
      }
    }
  }
  l.rank_prefix.assign(D + 1, 0);
  for (std::size_t d = 0; d < D; ++d) l.rank_prefix[d + 1] = l.rank_prefix[d] + l.num_tokens_per_rank[d];
  l.send_token.assign(static_cast<std::size_t>(l.rank_prefix.back()), -1);
  l.send_row.assign(n * D, -1);
  std::vector<std::int64_t> cursor(l.rank_prefix.begin(), l.rank_prefix.end() - 1);
  for (std::size_t d = 0; d < D; ++d) {
    for (std::size_t t = 0; t < n; ++t) {
      if (!l.is_token_in_rank[t * D + d]) continue;
      auto const row = cursor[d]++;
      l.send_token[static_cast<std::size_t>(row)] = static_cast<std::int64_t>(t);
      l.send_row[t * D + d] = row;
    }
  }
  return l;
}

}  // namespace specmoe
