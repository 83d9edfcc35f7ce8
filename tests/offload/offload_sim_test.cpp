// SP-MoE replayed on the host timeline (offload/offload_sim.hpp).
#include "support/testbed.hpp"

#include <specmoe/offload/expert_uses.hpp>
#include <specmoe/offload/offload_sim.hpp>
#include <specmoe/synthetic/trace_generator.hpp>

#include <algorithm>
#include <random>

using namespace specmoe;
using specmoe::test::require_error;

namespace {

trace::routing_trace dsv2_like(std::uint64_t seed, double agreement, int layers = 8) {
  synthetic::trace_params tp;
  tp.layers = layers;
  tp.experts = 64;
  tp.top_k = 6;
  tp.tokens = 6000;
  tp.draft_layers = layers;
  tp.draft_agreement = agreement;
  tp.seed = seed;
  return synthetic::generate_trace(tp);
}

prefetch::offload_profile profile_for(trace::routing_trace const& tr, int gamma) {
  return prefetch::default_profile(tr.meta.layers, tr.meta.experts, tr.meta.top_k, 17.3e6, 17.3e6, 2.0e9, gamma);
}

}  // namespace

TEST_CASE("offload sim: every mode is lossless and the oracle beats on-demand LRU", "[offload][sim]") {
  auto const seed = std::random_device{}();
  auto const tr = dsv2_like(seed, 0.9);
  for (int gamma : {1, 2, 4}) {
    auto const prof = profile_for(tr, gamma);
    offload::offload_sim_options o;
    o.cache_experts = tr.meta.layers * 16;
    o.max_steps = 300;
    o.seed = seed;
    o.predictor = offload::sim_predictor::none;
    o.replacement = offload::sim_replacement::lru;
    auto const base = offload::simulate_offload(tr, prof, o);
    CHECK(base.lossless);
    CHECK(base.speculative_copies == 0);
    CHECK(base.prediction_recall == 0);
    o.predictor = offload::sim_predictor::oracle;
    o.replacement = offload::sim_replacement::protect_lfu;
    // at the model's cutoff: at every layer even exact guesses can lose, displacing residents on a
    // saturated link (docs/benchmarks.md, "A protection that ends with its layer")
    o.cutoff = -1;
    auto const oracle = offload::simulate_offload(tr, prof, o);
    CHECK(oracle.speculative_copies > 0);
    INFO("gamma " << gamma << " base " << base.tpot_us << " oracle " << oracle.tpot_us);
    CHECK(oracle.lossless);
    CHECK(oracle.prediction_recall == Approx(1.0));
    CHECK(oracle.tokens == base.tokens);  // the same drafts accepted in both
    CHECK(oracle.tpot_us < base.tpot_us);
    CHECK(oracle.prefetch_hit_rate > base.prefetch_hit_rate);
    o.predictor = offload::sim_predictor::draft;
    o.cutoff = -1;
    auto const draft = offload::simulate_offload(tr, prof, o);
    CHECK(draft.lossless);
    CHECK(draft.prediction_recall > 0.3);
    CHECK(draft.prediction_recall < oracle.prediction_recall);
    o.predictor = offload::sim_predictor::lookahead;
    auto const look = offload::simulate_offload(tr, prof, o);
    CHECK(look.lossless);
    CHECK(look.speculative_copies > 0);
  }
}

TEST_CASE("offload sim: a cache that can hold everything loads each expert once", "[offload][sim]") {
  auto const tr = dsv2_like(std::random_device{}(), 0.8, 4);
  auto const prof = profile_for(tr, 1);
  offload::offload_sim_options o;
  o.cache_experts = 4 * 64;
  o.max_steps = 400;
  o.predictor = offload::sim_predictor::none;
  auto const r = offload::simulate_offload(tr, prof, o);
  CHECK(r.demand_copies <= 4 * 64);
  CHECK(r.cache_hit_rate > 0.8);
  CHECK(r.lossless);
}

TEST_CASE("offload sim: bad configurations are refused clearly", "[offload][sim]") {
  auto const tr = dsv2_like(std::random_device{}(), 0.8, 4);
  auto prof = profile_for(tr, 1);
  offload::offload_sim_options o;
  o.cache_experts = 11;  // a verification of 2 tokens x top-6 can need 12
  require_error([&] { (void)offload::simulate_offload(tr, prof, o); }, errc::invalid_argument, "cannot hold one layer's 12 experts");
  o.cache_experts = 64;
  auto wrong = prefetch::default_profile(5, 64, 6, 17.3e6, 17.3e6, 2.0e9, 1);
  require_error([&] { (void)offload::simulate_offload(tr, wrong, o); }, errc::invalid_argument, "does not match the trace");
  auto no_draft = tr;
  no_draft.meta.draft.reset();
  no_draft.draft_topk_ids.clear();
  require_error([&] { (void)offload::simulate_offload(no_draft, prof, o); }, errc::invalid_argument, "needs a trace with draft routing");
  o.cutoff = 9;
  require_error([&] { (void)offload::simulate_offload(tr, prof, o); }, errc::invalid_argument, "cutoff 9");
}

TEST_CASE("offload sim: frequency replacement beats LRU on demand; uses_from_trace counts every activation", "[offload][sim]") {
  std::random_device rd;
  auto const seed = (static_cast<std::uint64_t>(rd()) << 32) | rd();
  INFO("seed " << seed);
  auto const tr = dsv2_like(seed, 0.8);
  auto const prof = profile_for(tr, 1);
  offload::offload_sim_options o;
  o.cache_experts = tr.meta.layers * tr.meta.experts / 4;
  o.max_steps = 300;
  o.predictor = offload::sim_predictor::none;
  o.replacement = offload::sim_replacement::lru;
  auto const lru = offload::simulate_offload(tr, prof, o);
  o.replacement = offload::sim_replacement::frequency;
  auto const freq = offload::simulate_offload(tr, prof, o);
  CHECK(lru.lossless);
  CHECK(freq.lossless);
  CHECK(freq.cache_hit_rate > lru.cache_hit_rate + 0.05);  // a loop over the layers is LRU's worst case
  CHECK(freq.tpot_us < lru.tpot_us);

  std::int64_t const begin = 100, end = 400;
  auto const uses = offload::uses_from_trace(tr, begin, end);
  REQUIRE(uses.size() == static_cast<std::size_t>(tr.meta.layers * tr.meta.experts));
  std::uint64_t total = 0;
  for (auto u : uses) total += u;
  CHECK(total == static_cast<std::uint64_t>(tr.meta.layers * (end - begin) * tr.meta.top_k));
  int const l = static_cast<int>(seed % static_cast<std::uint64_t>(tr.meta.layers));
  int const e = tr.id(l, begin, 0);
  std::uint64_t by_hand = 0;
  for (std::int64_t t = begin; t < end; ++t)
    for (int j = 0; j < tr.meta.top_k; ++j) by_hand += tr.id(l, t, j) == e;
  CHECK(uses[static_cast<std::size_t>(l * tr.meta.experts + e)] == by_hand);
  require_error([&] { (void)offload::uses_from_trace(tr, 10, tr.meta.tokens + 1); }, errc::invalid_argument, "outside");
  // most_used: the n largest counts with a use, most used first
  std::vector<std::uint64_t> counts{5, 0, 9, 5, 1, 0};
  CHECK(offload::most_used(counts, 3) == std::vector<std::size_t>{2, 0, 3});
  CHECK(offload::most_used(counts, 10) == std::vector<std::size_t>{2, 0, 3, 4});  // never an expert without a use
  auto const hot = offload::most_used(uses, 7);
  REQUIRE(hot.size() == 7u);
  for (std::size_t i = 0; i < uses.size(); ++i)
    if (std::find(hot.begin(), hot.end(), i) == hot.end()) CHECK(uses[i] <= uses[hot.back()]);
}
