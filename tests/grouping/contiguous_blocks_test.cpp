#include "support/testbed.hpp"

#include <specmoe/grouping/concepts.hpp>

using namespace specmoe;

TEST_CASE("contiguous blocks give every expert one owner, in balanced blocks", "[grouping]") {
  for (int D : {1, 2, 3, 4, 8}) {
    for (int E : {1, 5, 8, 60, 256}) {
      moe_config cfg{.hidden_size = 1, .ffn_size = 1, .num_experts = E, .top_k = 1, .num_ranks = D};
      auto const p = contiguous_blocks{}.place(cfg, 0);
      REQUIRE(p.num_experts() == E);
      REQUIRE_FALSE(p.replicated());
      std::size_t most = 0, least = static_cast<std::size_t>(E);
      int prev = 0;
      for (int e = 0; e < E; ++e) {
        REQUIRE(p.owners(e)[0] >= prev);  // blocks in rank order
        prev = p.owners(e)[0];
      }
      for (int r = 0; r < D; ++r) {
        most = std::max(most, p.local_experts(r).size());
        least = std::min(least, p.local_experts(r).size());
      }
      REQUIRE(most - least <= 1);
    }
  }
  moe_config v3 = models::deepseek_v3(8);
  auto const p = contiguous_blocks{}.place(v3, 3);
  REQUIRE(p.local_experts(3).front() == 96);
  REQUIRE(p.local_experts(3).back() == 127);
}

TEST_CASE("explicit placement serves per-layer tables", "[grouping]") {
  moe_config cfg{.hidden_size = 1, .ffn_size = 1, .num_experts = 4, .top_k = 1, .num_ranks = 2};
  explicit_placement g(std::vector<expert_placement>{expert_placement::from_owners(2, std::vector<int>{0, 0, 1, 1}),
                                                     expert_placement::from_owners(2, std::vector<int>{1, 0, 1, 0})});
  cfg.layer = 1;
  REQUIRE(g.place(cfg, 0).owners(0)[0] == 1);
  cfg.layer = 2;
  specmoe::test::require_error([&] { (void)g.place(cfg, 0); }, errc::invalid_argument,
                               "no placement for layer 2 (it holds 2)");
}
