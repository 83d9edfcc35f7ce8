// specmoe/placement/tp_shuffle.hpp: the token shuffle of a shuffled reduce-scatter, as a host
// function (the reference the GPU kernel in kernels/token_shuffle.cuh matches slot for slot) and as
// a TokenPlacement policy.
//
// With attention in tensor parallelism every rank holds a partial of every token; the reduce-
// scatter gives each rank an equal shard: S = ceil(T / D) rows, rank d holding
// clamp(T - d*S, 0, S) of them (so the plain, unshuffled split is contiguous). The shuffle fills
// those same shards with the tokens predicted to need each rank's experts:
//  1. confidences are cut to 256 levels (floor(c * 256), clamped; NaN counts as 0);
//  2. a token with a guess p gets rank p when it is among p's `capacity` most confident askers
//     (equal levels: earlier tokens first);
//  3. the rest fill the ranks' free slots in token order, ranks ascending;
//  4. inside a shard, tokens keep their batch order.
// The rule is parallel on the GPU (per-rank histograms and ordered counts, no sort) and gives the
// contiguous split when no token has a guess.
#pragma once

#include <specmoe/core/error.hpp>
#include <specmoe/placement/concepts.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

namespace specmoe {

/// Levels a confidence is cut to by the shuffle (so host and device agree exactly).
inline constexpr int tp_shuffle_levels = 256;

/// Rows of each shard of a T-token reduce-scatter over D ranks.
[[nodiscard]] constexpr std::int64_t tp_shard_rows(std::int64_t tokens, int ranks) noexcept {
  return ranks > 0 ? (tokens + ranks - 1) / ranks : 0;
}
/// Tokens rank `d` holds after the reduce-scatter (its shard's filled rows).
[[nodiscard]] constexpr std::int64_t tp_shard_count(std::int64_t tokens, int ranks, int d) noexcept {
  auto const S = tp_shard_rows(tokens, ranks);
  return std::clamp<std::int64_t>(tokens - d * S, 0, S);
}
/// A confidence's level (-1 for no guess).
[[nodiscard]] inline int tp_shuffle_level(int predicted_rank, float confidence, int ranks) noexcept {
  if (predicted_rank < 0 || predicted_rank >= ranks) return -1;
  if (!(confidence > 0.0f)) return 0;  // (NaN too)
  if (confidence >= 1.0f) return tp_shuffle_levels - 1;
  return std::min(tp_shuffle_levels - 1, static_cast<int>(confidence * static_cast<float>(tp_shuffle_levels)));
}

/// @brief Where each token of a shuffled reduce-scatter goes.
struct tp_shuffle_result {
  std::int64_t shard_rows = 0;      ///< S
  std::vector<int> rank;            ///< [T] the token's rank
  std::vector<std::int32_t> order;  ///< [D * S] token at slot d*S + i (-1: past d's count)
};

/// @brief The shuffle rule above. `predicted` [T] (-1 or out of range: no guess); `confidence`
/// [T] or empty (every guess fully confident).
[[nodiscard]] inline tp_shuffle_result plan_tp_shuffle(std::span<int const> predicted, std::span<float const> confidence,
                                                       std::int64_t tokens, int ranks) {
  SPECMOE_EXPECTS(ranks > 0 && tokens >= 0, errc::invalid_argument, "plan_tp_shuffle: ", tokens, " tokens over ", ranks,
                  " ranks");
  SPECMOE_EXPECTS((predicted.empty() || static_cast<std::int64_t>(predicted.size()) == tokens) &&
                      (confidence.empty() || confidence.size() == predicted.size()),
                  errc::shape_mismatch, "plan_tp_shuffle: ", predicted.size(), " guesses and ", confidence.size(),
                  " confidences for ", tokens, " tokens");
  auto const T = static_cast<std::size_t>(tokens);
  auto const D = static_cast<std::size_t>(ranks);
  tp_shuffle_result out;
  out.shard_rows = tp_shard_rows(tokens, ranks);
  auto const S = static_cast<std::size_t>(out.shard_rows);
  std::vector<int> level(T, -1);
  std::vector<std::array<std::int64_t, tp_shuffle_levels>> hist(D);
  for (auto& h : hist) h.fill(0);
  for (std::size_t t = 0; t < predicted.size(); ++t) {
    level[t] = tp_shuffle_level(predicted[t], confidence.empty() ? 1.0f : confidence[t], ranks);
    if (level[t] >= 0) ++hist[static_cast<std::size_t>(predicted[t])][static_cast<std::size_t>(level[t])];
  }
  // Per rank: the level at which its shard fills, and how many askers of that level still fit.
  std::vector<int> threshold(D, -1);
  std::vector<std::int64_t> take(D, 0), room(D);
  for (std::size_t d = 0; d < D; ++d) {
    auto const cap = tp_shard_count(tokens, ranks, static_cast<int>(d));
    std::int64_t above = 0;
    for (int q = tp_shuffle_levels - 1; q >= 0; --q) {
      auto const h = hist[d][static_cast<std::size_t>(q)];
      if (above + h >= cap) {
        threshold[d] = q;
        take[d] = cap - above;
        above = cap;
        break;
      }
      above += h;
    }
    room[d] = cap - above;
  }
  out.rank.assign(T, -1);
  std::vector<std::int64_t> tie_seen(D, 0);
  std::vector<std::size_t> leftovers;
  for (std::size_t t = 0; t < T; ++t) {
    bool accepted = false;
    if (level[t] >= 0) {
      auto const p = static_cast<std::size_t>(predicted[t]);
      accepted = level[t] > threshold[p] || (level[t] == threshold[p] && tie_seen[p]++ < take[p]);
      if (accepted) out.rank[t] = static_cast<int>(p);
    }
    if (!accepted) leftovers.push_back(t);
  }
  std::size_t d = 0;
  for (auto const t : leftovers) {
    while (room[d] == 0) ++d;
    out.rank[t] = static_cast<int>(d);
    --room[d];
  }
  out.order.assign(D * S, -1);
  std::vector<std::size_t> filled(D, 0);
  for (std::size_t t = 0; t < T; ++t) {
    auto const r = static_cast<std::size_t>(out.rank[t]);
    out.order[r * S + filled[r]++] = static_cast<std::int32_t>(t);
  }
  return out;
}

/// @brief TokenPlacement: the shuffled reduce-scatter's rule (above) as a policy. On the GPU
/// (`moe_layer<cuda_space, ...>::forward_tp_async`) the same rule runs on the device; on the host
/// layer it places the batch's tokens as one reduce-scatter would (home ranks are not used: with
/// tensor-parallel attention every rank holds every token).
struct tp_balanced_shuffle {
  static constexpr bool moves_tokens = true;
  void plan(placement_request const& r, token_plan& plan) const {
    auto const& p = r.predicted;
    bool const guessed = static_cast<std::int64_t>(p.rank.size()) == r.num_tokens;
    auto const result = plan_tp_shuffle(guessed ? std::span<int const>(p.rank) : std::span<int const>{},
                                        guessed && p.confidence.size() == p.rank.size() ? std::span<float const>(p.confidence)
                                                                                         : std::span<float const>{},
                                        r.num_tokens, r.config.num_ranks);
    plan.rank = result.rank;
  }
};
static_assert(token_placement<tp_balanced_shuffle>);

}  // namespace specmoe
