// specmoe/core/token_plan.hpp: which rank holds each token when the gate runs.
#pragma once

#include <specmoe/core/error.hpp>

#include <cstdint>
#include <span>
#include <vector>

namespace specmoe {

/// @brief The TokenPlacement policy's answer: `rank[t]` is where token t sits at gate time.
///
/// Tokens are numbered in batch order (rank 0's tokens first, then rank 1's, ...). A token whose
/// planned rank differs from its home rank is moved there before the gate and its output moved
/// back after the combine, so the caller sees every row in its original place.
struct token_plan {
  std::vector<int> rank;  ///< [num_tokens]

  /// @throw specmoe::error `shape_mismatch` if the plan does not cover `num_tokens` tokens,
  ///        `invalid_argument` if a rank is outside [0, num_ranks).
  void validate(std::int64_t num_tokens, int num_ranks) const {
    SPECMOE_EXPECTS(static_cast<std::int64_t>(rank.size()) == num_tokens, errc::shape_mismatch,
                    "token plan covers ", rank.size(), " tokens, the batch has ", num_tokens);
    for (std::size_t t = 0; t < rank.size(); ++t) {
      SPECMOE_EXPECTS(rank[t] >= 0 && rank[t] < num_ranks, errc::invalid_argument, "token plan puts token ", t,
                      " on rank ", rank[t], ", outside [0, ", num_ranks, ")");
    }
  }
};

/// @brief Home rank of every token of a batch split into contiguous per-rank runs.
inline std::vector<int> home_ranks(std::span<std::int64_t const> tokens_per_rank) {
  std::vector<int> home;
  for (std::size_t r = 0; r < tokens_per_rank.size(); ++r) home.insert(home.end(), static_cast<std::size_t>(tokens_per_rank[r]), static_cast<int>(r));
  return home;
}

}  // namespace specmoe
