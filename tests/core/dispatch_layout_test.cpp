#include "support/testbed.hpp"

#include <specmoe/core/dispatch_layout.hpp>
#include <specmoe/grouping/concepts.hpp>

using namespace specmoe;

TEST_CASE("dispatch layout equals a plain count, with de-duplication per rank", "[core][layout]") {
  std::mt19937_64 rng(11);
  for (int D : {1, 2, 3, 8}) {
    for (int E : {4, 16, 64}) {
      int const k = std::min(E, 6);
      moe_config cfg{.hidden_size = 4, .ffn_size = 4, .num_experts = E, .top_k = k, .num_ranks = D};
      auto const placement = contiguous_blocks{}.place(cfg, 0);
      std::int64_t const n = std::uniform_int_distribution<int>(0, 40)(rng);
      routing r(n, k);
      for (std::int64_t t = 0; t < n; ++t) {
        std::vector<int> ids(static_cast<std::size_t>(E));
        std::iota(ids.begin(), ids.end(), 0);
        std::shuffle(ids.begin(), ids.end(), rng);
        for (int j = 0; j < k; ++j) r.topk_ids[static_cast<std::size_t>(t * k + j)] = (j == k - 1 && t % 5 == 0) ? -1 : ids[static_cast<std::size_t>(j)];
      }
      int const self = static_cast<int>(rng() % static_cast<std::uint64_t>(D));
      auto const l = make_dispatch_layout(r, placement, self);
      std::vector<std::int64_t> per_rank(static_cast<std::size_t>(D)), per_expert(static_cast<std::size_t>(E)),
          activations(static_cast<std::size_t>(D));
      for (std::int64_t t = 0; t < n; ++t) {
        std::vector<bool> seen(static_cast<std::size_t>(D));
        for (int j = 0; j < k; ++j) {
          auto const e = r.id(t, j);
          if (e < 0) continue;
          auto const d = placement.owners(e)[0];
          ++per_expert[static_cast<std::size_t>(e)];
          ++activations[static_cast<std::size_t>(d)];
          if (!seen[static_cast<std::size_t>(d)]) ++per_rank[static_cast<std::size_t>(d)];
          seen[static_cast<std::size_t>(d)] = true;
          REQUIRE(l.send_row[static_cast<std::size_t>(t * D + d)] >= 0);
          REQUIRE(l.send_token[static_cast<std::size_t>(l.send_row[static_cast<std::size_t>(t * D + d)])] == t);
        }
      }
      REQUIRE(l.num_tokens_per_rank == per_rank);
      REQUIRE(l.num_tokens_per_expert == per_expert);
      REQUIRE(l.num_activations_per_rank == activations);
      REQUIRE(l.rank_prefix.back() == static_cast<std::int64_t>(l.send_token.size()));
      // Rows are grouped by destination and in token order within each group.
      for (int d = 0; d < D; ++d) {
        for (auto row = l.rank_prefix[static_cast<std::size_t>(d)] + 1; row < l.rank_prefix[static_cast<std::size_t>(d) + 1]; ++row) {
          REQUIRE(l.send_token[static_cast<std::size_t>(row - 1)] < l.send_token[static_cast<std::size_t>(row)]);
        }
      }
      REQUIRE(l.remote_rows(self) <= l.remote_activations(self));
    }
  }
}
