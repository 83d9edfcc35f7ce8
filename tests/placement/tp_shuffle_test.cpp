// plan_tp_shuffle / tp_balanced_shuffle: the shards of a shuffled reduce-scatter — equal counts
// whatever the guesses, the contiguous split without guesses, confident guesses first (equal
// levels in token order), the rest in free slots by rank — and the host layer's output unchanged.
#include "support/testbed.hpp"

#include <specmoe/placement/tp_shuffle.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

using namespace specmoe;

namespace {

// Every token exactly once, each shard filled to its count, in token order inside a shard.
void require_valid(tp_shuffle_result const& r, std::int64_t T, int D) {
  auto const S = tp_shard_rows(T, D);
  REQUIRE(r.shard_rows == S);
  REQUIRE(r.rank.size() == static_cast<std::size_t>(T));
  REQUIRE(r.order.size() == static_cast<std::size_t>(D * S));
  std::vector<int> seen(static_cast<std::size_t>(T), 0);
  for (int d = 0; d < D; ++d) {
    auto const count = tp_shard_count(T, D, d);
    std::int32_t last = -1;
    for (std::int64_t i = 0; i < S; ++i) {
      auto const t = r.order[static_cast<std::size_t>(d * S + i)];
      if (i >= count) {
        REQUIRE(t == -1);
        continue;
      }
      REQUIRE(t > last);
      REQUIRE(r.rank[static_cast<std::size_t>(t)] == d);
      ++seen[static_cast<std::size_t>(t)];
      last = t;
    }
  }
  REQUIRE(std::all_of(seen.begin(), seen.end(), [](int s) { return s == 1; }));
}

}  // namespace

TEST_CASE("tp shuffle: shard sizes and the contiguous split without guesses", "[placement][shuffle][tp]") {
  CHECK(tp_shard_rows(10, 4) == 3);
  CHECK(tp_shard_count(10, 4, 0) == 3);
  CHECK(tp_shard_count(10, 4, 3) == 1);
  CHECK(tp_shard_count(2, 4, 2) == 0);
  CHECK(tp_shard_rows(0, 4) == 0);
  for (std::int64_t T : {0, 1, 3, 10, 64, 257}) {
    for (int D : {1, 2, 4, 8}) {
      auto const r = plan_tp_shuffle({}, {}, T, D);
      require_valid(r, T, D);
      for (std::int64_t t = 0; t < T; ++t) CHECK(r.rank[static_cast<std::size_t>(t)] == t / r.shard_rows);
    }
  }
}

TEST_CASE("tp shuffle: confident guesses first, equal levels in token order, the rest by rank", "[placement][shuffle][tp]") {
  // 8 tokens, 4 ranks, shards of 2: everyone but token 0 wants rank 3
  std::vector<int> const want{-1, 3, 3, 3, 3, 3, 3, 3};
  std::vector<float> const conf{0.0f, 0.2f, 0.9f, 0.3f, 0.4f, 0.95f, 0.9f, 0.6f};
  auto const r = plan_tp_shuffle(want, conf, 8, 4);
  require_valid(r, 8, 4);
  CHECK(r.rank[5] == 3);  // 0.95
  CHECK(r.rank[2] == 3);  // 0.9, before token 6 (same level, later)
  CHECK(r.rank[0] == 0);  // the leftovers 0, 1, 3, 4, 6, 7 fill ranks 0, 0, 1, 1, 2, 2
  CHECK(r.rank[1] == 0);
  CHECK(r.rank[3] == 1);
  CHECK(r.rank[4] == 1);
  CHECK(r.rank[6] == 2);
  CHECK(r.rank[7] == 2);
  CHECK(r.order == std::vector<std::int32_t>{0, 1, 3, 4, 6, 7, 2, 5});
  // levels: 0.5 and 0.501 share level 128, so token order decides; NaN and negative count as level 0
  std::vector<int> const two{1, 1, 1};
  auto const tie = plan_tp_shuffle(two, std::vector<float>{0.501f, 0.5f, std::numeric_limits<float>::quiet_NaN()}, 3, 3);
  CHECK(tie.rank == std::vector<int>{1, 0, 2});
  CHECK(tp_shuffle_level(1, std::numeric_limits<float>::quiet_NaN(), 2) == 0);
  CHECK(tp_shuffle_level(1, 2.0f, 2) == 255);
  CHECK(tp_shuffle_level(2, 1.0f, 2) == -1);  // out of range: no guess
}

TEST_CASE("tp shuffle: guesses that fit are all followed; random guesses keep shards equal", "[placement][shuffle][tp]") {
  std::mt19937_64 rng(5);
  for (int trial = 0; trial < 200; ++trial) {
    int const D = 1 + static_cast<int>(rng() % 8);
    auto const T = static_cast<std::int64_t>(rng() % 300);
    std::vector<int> want(static_cast<std::size_t>(T));
    std::vector<float> conf(static_cast<std::size_t>(T));
    for (auto& w : want) w = static_cast<int>(rng() % static_cast<unsigned>(D + 2)) - 1;  // -1 .. D (D: out of range)
    for (auto& c : conf) c = std::uniform_real_distribution<float>(-0.1f, 1.1f)(rng);
    auto const r = plan_tp_shuffle(want, conf, T, D);
    INFO("trial " << trial << " T " << T << " D " << D);
    require_valid(r, T, D);
    // a guess is refused only when its rank is full of guesses at least as confident
    for (std::int64_t t = 0; t < T; ++t) {
      auto const p = want[static_cast<std::size_t>(t)];
      if (p < 0 || p >= D || r.rank[static_cast<std::size_t>(t)] == p) continue;
      auto const q = tp_shuffle_level(p, conf[static_cast<std::size_t>(t)], D);
      std::int64_t stronger = 0;
      for (std::int64_t u = 0; u < T; ++u)
        if (r.rank[static_cast<std::size_t>(u)] == p && want[static_cast<std::size_t>(u)] == p &&
            tp_shuffle_level(p, conf[static_cast<std::size_t>(u)], D) >= q)
          ++stronger;
      CHECK(stronger == tp_shard_count(T, D, p));
    }
  }
  // a perfectly balanced guess is followed for every token
  std::vector<int> balanced(64);
  for (int t = 0; t < 64; ++t) balanced[static_cast<std::size_t>(t)] = (t * 7) % 4;
  auto const r = plan_tp_shuffle(balanced, {}, 64, 4);
  CHECK(r.rank == balanced);
}

TEST_CASE("tp shuffle: bad shapes are rejected", "[placement][shuffle][tp][errors]") {
  std::vector<int> const want{0, 1};
  CHECK_THROWS_AS(plan_tp_shuffle(want, {}, 3, 2), specmoe::error);
  CHECK_THROWS_AS(plan_tp_shuffle(want, std::vector<float>{0.5f}, 2, 2), specmoe::error);
  CHECK_THROWS_AS(plan_tp_shuffle({}, {}, 4, 0), specmoe::error);
}

TEST_CASE("tp_balanced_shuffle: the host layer's output does not change", "[placement][shuffle][tp][lossless]") {
  std::mt19937_64 rng(23);
  for (int i = 0; i < 20; ++i) {
    auto const pr = specmoe::test::random_problem(rng, 1 + i % 5);
    INFO(pr.cfg);
    specmoe::test::reference_run<float> ref(pr);
    moe_layer<host_space, random_prediction, tp_balanced_shuffle> layer(pr.cfg, ref.layer.weights(),
                                                                        {.predictor = random_prediction(pr.seed, 2)});
    REQUIRE(specmoe::test::bit_equal(ref.run(layer), ref.expected));
    CHECK(layer.last_counters().tokens == pr.num_tokens());
  }
}
