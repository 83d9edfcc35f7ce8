// The co-clustering solver: its constraints always hold, it finds planted structure, and it beats
// the contiguous baseline on affine synthetic traces.
#include "support/testbed.hpp"

#include <specmoe/grouping/co_cluster.hpp>
#include <specmoe/synthetic/trace_generator.hpp>

#include <random>
#include <vector>

using namespace specmoe;

namespace {

void require_valid(grouping::layer_grouping const& g, trace::layer_profile const& p, int D) {
  REQUIRE(static_cast<int>(g.expert_rank.size()) == p.experts);
  std::vector<int> per(static_cast<std::size_t>(D), 0);
  for (int r : g.expert_rank) {
    REQUIRE(r >= 0);
    REQUIRE(r < D);
    ++per[static_cast<std::size_t>(r)];
  }
  for (int c : per) CHECK(c == p.experts / D);  // E/D experts on every rank
  REQUIRE(g.token_rank.size() == p.token_ids.size());  // every token id assigned
  for (int r : g.token_rank) {
    CHECK(r >= 0);
    CHECK(r < D);
  }
  for (float c : g.token_confidence) {
    CHECK(c >= 0.0f);
    CHECK(c <= 1.0f + 1e-6f);
  }
  CHECK(g.remote_share >= 0.0);
  CHECK(g.remote_share <= 1.0);
}

/// D groups of token ids, group g using only experts {g, g + D, g + 2D, ...} (interleaved, so the
/// contiguous placement splits every group across all ranks).
trace::routing_trace planted(int D, int E, int k, std::int64_t tokens) {
  std::mt19937_64 rng(9);
  trace::routing_trace tr;
  tr.meta = {.model = "planted", .layers = 1, .experts = E, .top_k = k, .tokens = tokens, .sequences = {{0, tokens}}, .source = "test",
             .draft = std::nullopt};
  int const per = E / D;
  std::vector<int> pool(static_cast<std::size_t>(per));
  for (std::int64_t t = 0; t < tokens; ++t) {
    int const id = static_cast<int>(rng() % 400);
    int const g = id % D;
    for (int i = 0; i < per; ++i) pool[static_cast<std::size_t>(i)] = g + i * D;
    std::shuffle(pool.begin(), pool.end(), rng);
    tr.token_ids.push_back(id);
    tr.topk_ids.insert(tr.topk_ids.end(), pool.begin(), pool.begin() + k);
  }
  trace::validate_trace(tr, "planted");
  return tr;
}

}  // namespace

TEST_CASE("co-cluster: constraints hold for every solver", "[grouping][co_cluster]") {
  auto const tr = synthetic::generate_trace({.layers = 1, .tokens = 5000, .vocab = 3000});
  auto const prof = trace::profile_layer(tr, 0);
  for (int D : {2, 8, 16}) {
    grouping::co_cluster_options o;
    o.ranks = D;
    o.cem_iterations = 5;
    INFO("D=" << D);
    require_valid(grouping::contiguous_layer(prof, o), prof, D);
    require_valid(grouping::co_cluster_layer(prof, o), prof, D);
    require_valid(grouping::cem_layer(prof, o), prof, D);
  }
}

TEST_CASE("co-cluster: planted groups are found, contiguous placement misses them", "[grouping][co_cluster]") {
  int const D = 4, E = 32;
  auto const tr = planted(D, E, 4, 8000);
  auto const prof = trace::profile_layer(tr, 0);
  grouping::co_cluster_options o;
  o.ranks = D;
  o.theta = 0.2;
  auto const base = grouping::contiguous_layer(prof, o);
  auto const alt = grouping::co_cluster_layer(prof, o);
  auto const cem = grouping::cem_layer(prof, o);
  INFO("remote share: contiguous " << base.remote_share << ", alternating " << alt.remote_share << ", cem " << cem.remote_share);
  CHECK(base.remote_share > 0.5);
  CHECK(alt.remote_share < 0.05);
  CHECK(cem.remote_share < base.remote_share * 0.5);
  CHECK(alt.token_imbalance < 0.10);
  // the planted groups end up whole: experts g, g + D, ... share a rank
  for (int e = 0; e < E; ++e) CHECK(alt.expert_rank[static_cast<std::size_t>(e)] == alt.expert_rank[static_cast<std::size_t>(e % D)]);
}

TEST_CASE("co-cluster: fewer remote activations than contiguous on an affine synthetic trace", "[grouping][co_cluster]") {
  auto const prof = trace::profile_layer(
      synthetic::generate_trace({.layers = 1, .experts = 64, .tokens = 20000, .vocab = 4000, .affinity = 0.9}), 0);
  grouping::co_cluster_options o;
  o.ranks = 8;
  auto const base = grouping::contiguous_layer(prof, o);
  auto const alt = grouping::co_cluster_layer(prof, o);
  auto const cem = grouping::cem_layer(prof, o);
  INFO("remote share: contiguous " << base.remote_share << ", alternating " << alt.remote_share << ", cem " << cem.remote_share);
  CHECK(alt.objective < base.objective);
  CHECK(alt.remote_share < base.remote_share);
  CHECK(cem.objective <= base.objective);
  CHECK(alt.expert_load_imbalance < 0.25);
}

TEST_CASE("co-cluster: experts that do not divide among the ranks are refused", "[grouping][co_cluster][errors]") {
  auto const tr = planted(4, 32, 4, 100);
  auto const prof = trace::profile_layer(tr, 0);
  grouping::co_cluster_options o;
  o.ranks = 5;
  specmoe::test::require_error([&] { (void)grouping::co_cluster_layer(prof, o); }, errc::invalid_argument,
                               "experts (32) divisible by ranks (5)");
}
