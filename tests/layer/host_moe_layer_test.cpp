// The host layer equals the dense per-token reference bit for bit, whatever the ranks, policies
// and storage type; de-duplication saves bytes without touching the output.
#include "support/testbed.hpp"

#include <specmoe/specmoe.hpp>

using namespace specmoe;
using specmoe::test::reference_run;

namespace {

// A placement that moves tokens for no good reason: every odd token to the next rank.
struct rotate_odd_tokens {
  static constexpr bool moves_tokens = true;
  void plan(placement_request const& r, token_plan& plan) const {
    plan.rank.assign(r.home_rank.begin(), r.home_rank.end());
    for (std::size_t t = 1; t < plan.rank.size(); t += 2) plan.rank[t] = (plan.rank[t] + 1) % r.config.num_ranks;
  }
};

// Every expert on every rank (full replication) or a random owner set of 1..D ranks.
struct random_replicas {
  std::uint64_t seed = 1;
  [[nodiscard]] expert_placement place(moe_config const& c, int /*rank*/) const {
    std::mt19937_64 rng(seed + static_cast<std::uint64_t>(c.layer));
    std::vector<std::vector<int>> owners(static_cast<std::size_t>(c.num_experts));
    for (auto& o : owners) {
      for (int r = 0; r < c.num_ranks; ++r) {
        if (std::uniform_int_distribution<int>(0, 2)(rng) == 0) o.push_back(r);
      }
      if (o.empty()) o.push_back(std::uniform_int_distribution<int>(0, c.num_ranks - 1)(rng));
    }
    return {c.num_ranks, owners};
  }
};

template <class T>
void check_all_policies(specmoe::test::problem const& p) {
  reference_run<T> ref(p);
  auto const w = ref.layer.weights();
  INFO(p.cfg);
  {
    moe_layer<host_space> layer(p.cfg, w);
    auto const out = ref.run(layer);
    REQUIRE(specmoe::test::bit_equal(out, ref.expected));
    auto const& c = layer.last_counters();
    REQUIRE(c.tokens == p.num_tokens());
    REQUIRE(c.tokens_moved == 0);
    REQUIRE(c.shuffle.total() == 0);
  }
  {
    moe_layer<host_space, random_prediction, follow_prediction, random_replicas> layer(
        p.cfg, w, {.predictor = random_prediction(p.seed, 3), .grouping = random_replicas{p.seed}});
    REQUIRE(specmoe::test::bit_equal(ref.run(layer), ref.expected));
  }
  {
    moe_layer<host_space, always_wrong_prediction<T>, follow_prediction> layer(
        p.cfg, w, {.predictor = always_wrong_prediction<T>(w.router)});
    REQUIRE(specmoe::test::bit_equal(ref.run(layer), ref.expected));
    // Moving every token to its worst rank never raises the local activation rate.
    moe_layer<host_space> plain(p.cfg, w);
    ref.run(plain);
    REQUIRE(layer.last_counters().local_activations <= plain.last_counters().local_activations);
  }
  {
    moe_layer<host_space, oracle_prediction<T>, follow_prediction> layer(
        p.cfg, w, {.predictor = oracle_prediction<T>(w.router)});
    REQUIRE(specmoe::test::bit_equal(ref.run(layer), ref.expected));
    auto const& c = layer.last_counters();
    if (p.num_tokens() > 0) {
      REQUIRE(c.expert_hit_rate() == 1.0);
      REQUIRE(c.rank_hit_rate() == 1.0);
    }
  }
  {
    moe_layer<host_space, no_prediction, rotate_odd_tokens> layer(p.cfg, w);
    REQUIRE(specmoe::test::bit_equal(ref.run(layer), ref.expected));
    if (p.cfg.num_ranks > 1) REQUIRE(layer.last_counters().tokens_moved == p.num_tokens() / 2);
  }
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("host layer equals the dense reference bit for bit (fp32)", "[layer][lossless]",
                        specmoe::test::spaces) {
  std::mt19937_64 rng(20261123);
  for (int D : {1, 2, 3, 4, 8}) {
    for (int i = 0; i < 16; ++i) check_all_policies<float>(specmoe::test::random_problem(rng, D));
  }
}

TEMPLATE_LIST_TEST_CASE("host layer equals the dense reference bit for bit (bf16 storage)", "[layer][lossless]",
                        specmoe::test::spaces) {
  std::mt19937_64 rng(7);
  for (int D : {1, 2, 4, 8}) {
    for (int i = 0; i < 8; ++i) check_all_policies<bf16>(specmoe::test::random_problem(rng, D));
  }
}

TEST_CASE("full-size expert counts: 256 experts top-8 grouped gate over 8 ranks", "[layer][lossless]") {
  auto cfg = models::deepseek_v3(8);
  cfg.hidden_size = 32;
  cfg.ffn_size = 16;
  cfg.shared_ffn_size = 16;
  specmoe::test::problem p{cfg, {40, 0, 3, 17, 64, 1, 0, 25}, 42};
  reference_run<float> ref(p);
  moe_layer<host_space> layer(cfg, ref.layer.weights());
  REQUIRE(specmoe::test::bit_equal(ref.run(layer), ref.expected));
  auto const& c = layer.last_counters();
  REQUIRE(c.activations == p.num_tokens() * 8);
  std::int64_t sum = 0;
  for (auto n : c.tokens_per_expert) sum += n;
  REQUIRE(sum == c.activations);
}

TEST_CASE("de-duplication lowers dispatch bytes and leaves the output unchanged", "[layer][dedup]") {
  // 16 experts in 2 blocks of 8, top-4: most tokens have several experts on one rank.
  moe_config cfg{.hidden_size = 16, .ffn_size = 8, .num_experts = 16, .top_k = 4, .num_ranks = 2};
  specmoe::test::problem p{cfg, {30, 34}, 9};
  reference_run<float> ref(p);
  moe_layer<host_space> layer(cfg, ref.layer.weights());
  REQUIRE(specmoe::test::bit_equal(ref.run(layer), ref.expected));
  auto const& c = layer.last_counters();
  // Count, by a plain loop over the routing, the rows with and without de-duplication.
  std::int64_t remote_activations = 0, remote_rows = 0;
  for (std::int64_t t = 0; t < p.num_tokens(); ++t) {
    int const home = t < 30 ? 0 : 1;
    bool other = false;
    for (int j = 0; j < 4; ++j) {
      int const owner = ref.routed.id(t, j) / 8;
      if (owner != home) {
        ++remote_activations;
        other = true;
      }
    }
    remote_rows += other;
  }
  REQUIRE(c.dispatch_rows_without_dedup == remote_activations);
  REQUIRE(c.dispatch_rows == remote_rows);
  REQUIRE(c.dispatch_rows < c.dispatch_rows_without_dedup);
  REQUIRE(c.dispatch.total() == remote_rows * 16 * static_cast<std::int64_t>(sizeof(float)));
  REQUIRE(c.dedup_saving() > 0.0);
  REQUIRE(c.local_activations + remote_activations == c.activations);
}

TEST_CASE("reduce-at-expert-rank combine sends one row per token and rank, within rounding", "[layer][combine]") {
  std::mt19937_64 rng(3);
  for (int i = 0; i < 6; ++i) {
    auto p = specmoe::test::random_problem(rng, 4);
    p.cfg.top_k = std::min(p.cfg.num_experts, 4);
    if (p.cfg.gate.kind == gate_kind::sigmoid_grouped_topk) p.cfg.gate.topk_groups = p.cfg.gate.num_groups;
    reference_run<float> ref(p);
    moe_layer<host_space> exact(p.cfg, ref.layer.weights());
    moe_layer<host_space> reduced(p.cfg, ref.layer.weights(), {}, {.combine = combine_mode::reduce_at_expert_rank});
    auto const a = ref.run(exact);
    auto const b = ref.run(reduced);
    for (std::size_t j = 0; j < a.size(); ++j) {
      REQUIRE(std::abs(a[j] - b[j]) <= 1e-5f * (1.0f + std::abs(a[j])));
    }
    REQUIRE(reduced.last_counters().combine.total() <= exact.last_counters().combine.total());
    REQUIRE(reduced.last_counters().combine.total() == reduced.last_counters().dispatch.total());
  }
}

TEST_CASE("engine-supplied routing replaces the gate", "[layer][routing]") {
  moe_config cfg{.hidden_size = 8, .ffn_size = 4, .num_experts = 8, .top_k = 2, .num_ranks = 2};
  specmoe::test::problem p{cfg, {5, 6}, 4};
  reference_run<float> ref(p);
  // A routing unlike the gate's: experts (t, t+3) mod 8, one slot empty (-1) on token 0.
  routing r(11, 2);
  for (int t = 0; t < 11; ++t) {
    r.topk_ids[static_cast<std::size_t>(2 * t)] = t == 0 ? -1 : t % 8;
    r.topk_ids[static_cast<std::size_t>(2 * t + 1)] = (t + 3) % 8;
    r.topk_weights[static_cast<std::size_t>(2 * t)] = 0.25f + 0.01f * static_cast<float>(t);
    r.topk_weights[static_cast<std::size_t>(2 * t + 1)] = 0.5f;
  }
  std::vector<float> expected(ref.x.size());
  dense_reference<float>(cfg, ref.layer.weights(), ref.view(), matrix_view<float>(expected.data(), 11, 8), r.view());
  REQUIRE_FALSE(specmoe::test::bit_equal(expected, ref.expected));
  moe_layer<host_space> layer(cfg, ref.layer.weights());
  std::vector<float> out(ref.x.size(), specmoe::test::poison<float>());
  auto b = ref.batch();
  b.routing = r.view();
  layer.forward(b, matrix_view<float>(out.data(), 11, 8));
  REQUIRE(specmoe::test::bit_equal(out, expected));
  REQUIRE(layer.last_counters().activations == 21);
}

TEST_CASE("counters accumulate over calls and reset", "[layer][counters]") {
  moe_config cfg{.hidden_size = 8, .ffn_size = 4, .num_experts = 4, .top_k = 2, .num_ranks = 2};
  specmoe::test::problem p{cfg, {3, 4}, 5};
  reference_run<float> ref(p);
  moe_layer<host_space> layer(cfg, ref.layer.weights());
  ref.run(layer);
  ref.run(layer);
  REQUIRE(layer.counters().forward_calls == 2);
  REQUIRE(layer.counters().tokens == 14);
  REQUIRE(layer.counters().dispatch.total() == 2 * layer.last_counters().dispatch.total());
  layer.reset_counters();
  REQUIRE(layer.counters().tokens == 0);
}
