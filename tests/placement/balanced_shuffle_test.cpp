// balanced_shuffle: equal shards whatever the guesses, guesses followed where there is room (most
// confident first), and the layer's output unchanged.
#include "support/testbed.hpp"

#include <specmoe/placement/balanced_shuffle.hpp>

#include <random>
#include <vector>

using namespace specmoe;

TEST_CASE("balanced shuffle: equal shards, confident guesses first, the rest home or to the emptiest rank", "[placement][shuffle]") {
  moe_config cfg{.hidden_size = 8, .ffn_size = 8, .num_experts = 8, .top_k = 2, .num_ranks = 4};
  expert_placement const placement(4, {{0}, {0}, {1}, {1}, {2}, {2}, {3}, {3}});
  std::vector<int> const home{0, 0, 1, 1, 2, 2, 3, 3};
  std::vector<std::int64_t> const per_rank{2, 2, 2, 2};
  prediction p;
  p.reset(8, 0);
  // everyone wants rank 3; tokens 5 and 2 are the most confident
  p.rank.assign(8, 3);
  p.confidence = {0.1f, 0.2f, 0.9f, 0.3f, 0.4f, 0.95f, 0.5f, 0.6f};
  p.rank[0] = -1;  // no guess: stays home
  token_plan plan;
  balanced_shuffle{}.plan(placement_request{cfg, 8, home, per_rank, p, placement}, plan);
  REQUIRE(plan.rank.size() == 8);
  std::vector<int> count(4, 0);
  for (int r : plan.rank) ++count[static_cast<std::size_t>(r)];
  CHECK(count == std::vector<int>{2, 2, 2, 2});
  CHECK(plan.rank[5] == 3);
  CHECK(plan.rank[2] == 3);
  CHECK(plan.rank[0] == 0);
  // overflow: token 1 home (room on 0), token 3 home (room on 1), 4 home, 6 -> home 3 is full -> emptiest (1)
  CHECK(plan.rank[1] == 0);
  CHECK(plan.rank[3] == 1);
  CHECK(plan.rank[4] == 2);
  CHECK(plan.rank[6] == 1);
  CHECK(plan.rank[7] == 2);
}

TEST_CASE("balanced shuffle: the layer's output does not change", "[placement][shuffle][lossless]") {
  std::mt19937_64 rng(17);
  for (int i = 0; i < 20; ++i) {
    auto const pr = specmoe::test::random_problem(rng, 1 + i % 5);
    INFO(pr.cfg);
    specmoe::test::reference_run<float> ref(pr);
    moe_layer<host_space, random_prediction, balanced_shuffle> layer(pr.cfg, ref.layer.weights(),
                                                                     {.predictor = random_prediction(pr.seed, 2)});
    REQUIRE(specmoe::test::bit_equal(ref.run(layer), ref.expected));
    CHECK(layer.last_counters().tokens == pr.num_tokens());
  }
}
