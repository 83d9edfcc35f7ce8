// specmoe/placement/balanced_shuffle.hpp: Speculative MoE's token shuffle with equal shards — the
// placement a shuffled reduce-scatter implements: every rank gates the same number of tokens
// (ceil(n / D) at most), each token on its predicted rank while that rank has room, most confident
// guesses first; a token without a guess or whose rank is full stays home if home has room, else
// goes to the rank with the most room left (lowest id on ties).
#pragma once

#include <specmoe/placement/concepts.hpp>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

namespace specmoe {

struct balanced_shuffle {
  static constexpr bool moves_tokens = true;

  void plan(placement_request const& r, token_plan& plan) const {
    auto const n = static_cast<std::size_t>(r.num_tokens);
    auto const D = r.config.num_ranks;
    std::int64_t const cap = (r.num_tokens + D - 1) / D;
    std::vector<std::int64_t> room(static_cast<std::size_t>(D), cap);
    plan.rank.assign(n, -1);
    bool const guessed = r.predicted.rank.size() == n;
    std::vector<std::size_t> order(n);
    std::iota(order.begin(), order.end(), 0);
    auto conf = [&](std::size_t t) { return r.predicted.confidence.size() == n ? r.predicted.confidence[t] : 1.0f; };
    std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return conf(a) > conf(b); });
    if (guessed) {
      for (auto const t : order) {
        int const want = r.predicted.rank[t];
        if (want >= 0 && room[static_cast<std::size_t>(want)] > 0) {
          plan.rank[t] = want;
          --room[static_cast<std::size_t>(want)];
        }
      }
    }
    for (std::size_t t = 0; t < n; ++t) {  // the rest, in batch order
      if (plan.rank[t] >= 0) continue;
      int d = r.home_rank[t];
      if (room[static_cast<std::size_t>(d)] == 0) d = static_cast<int>(std::max_element(room.begin(), room.end()) - room.begin());
      plan.rank[t] = d;
      --room[static_cast<std::size_t>(d)];
    }
  }
};
static_assert(token_placement<balanced_shuffle>);

}  // namespace specmoe
