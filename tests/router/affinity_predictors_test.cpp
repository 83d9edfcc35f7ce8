// Speculative MoE's predictors in a stack of host layers replaying a synthetic trace: the output
// equals the dense reference bit for bit with every predictor, and a plan from the trace raises
// the local activation rate over the contiguous, unshuffled baseline.
#include "support/testbed.hpp"

#include <specmoe/grouping/speculative_plan.hpp>
#include <specmoe/placement/balanced_shuffle.hpp>
#include <specmoe/router/affinity_predictors.hpp>
#include <specmoe/synthetic/trace_generator.hpp>

#include <memory>
#include <vector>

using namespace specmoe;

namespace {

constexpr int D = 4;

trace::routing_trace stack_trace() {
  return synthetic::generate_trace(
      {.layers = 4, .experts = 32, .top_k = 4, .tokens = 2048, .vocab = 600, .affinity = 0.9, .layer_correlation = 0.9});
}

moe_config layer_config(int layer) {
  moe_config c{.hidden_size = 16, .ffn_size = 8, .num_experts = 32, .top_k = 4, .num_ranks = D};
  c.layer = layer;
  return c;
}

/// Runs the trace's tokens through one layer per trace layer (engine routing from the trace) and
/// returns the summed counters; every layer's output is checked against the dense reference.
template <class MakeLayer>
layer_counters run_stack(trace::routing_trace const& tr, MakeLayer&& make_layer) {
  auto const n = tr.meta.tokens;
  std::vector<std::int64_t> ids(tr.token_ids.begin(), tr.token_ids.end());
  std::vector<std::int64_t> per_rank(D, n / D);
  layer_counters total;
  for (int l = 0; l < tr.meta.layers; ++l) {
    auto const cfg = layer_config(l);
    synthetic::random_layer<float> weights(cfg, 40 + static_cast<std::uint64_t>(l));
    auto const x = synthetic::random_activations<float>(n, cfg.hidden_size, 50 + static_cast<std::uint64_t>(l));
    std::vector<float> scratch;
    auto const routing = tr.layer_routing(l, scratch);
    std::vector<float> want(x.size()), got(x.size(), specmoe::test::poison<float>());
    dense_reference<float>(cfg, weights.weights(), matrix_view<float const>(x.data(), n, cfg.hidden_size),
                           matrix_view<float>(want.data(), n, cfg.hidden_size), routing);
    auto layer = make_layer(cfg, weights.weights());
    layer.forward(host_batch<float>{matrix_view<float const>(x.data(), n, cfg.hidden_size), per_rank, ids, routing},
                  matrix_view<float>(got.data(), n, cfg.hidden_size));
    INFO("layer " << l);
    REQUIRE(specmoe::test::bit_equal(got, want));
    total.accumulate(layer.last_counters());
  }
  return total;
}

}  // namespace

TEST_CASE("affinity predictors: lossless, and the plan raises the local activation rate", "[router][affinity]") {
  auto const tr = stack_trace();
  grouping::co_cluster_options o;
  o.ranks = D;
  auto const plan = std::make_shared<grouping::speculative_plan const>(grouping::make_plan(tr, o));
  auto const placements = grouping::plan_placements(*plan);

  auto const plain = run_stack(tr, [](moe_config const& c, moe_weights<float> const& w) { return moe_layer<host_space>(c, w); });
  auto const token = run_stack(tr, [&](moe_config const& c, moe_weights<float> const& w) {
    return moe_layer<host_space, token_affinity_prediction, follow_prediction, explicit_placement>(
        c, w, {.predictor = token_affinity_prediction(plan), .grouping = placements});
  });
  auto history = std::make_shared<rank_history>();
  auto const layer = run_stack(tr, [&](moe_config const& c, moe_weights<float> const& w) {
    return moe_layer<host_space, layer_affinity_prediction, follow_prediction, explicit_placement>(
        c, w, {.predictor = layer_affinity_prediction(plan, history), .grouping = placements});
  });
  auto history2 = std::make_shared<rank_history>();
  auto const combined = run_stack(tr, [&](moe_config const& c, moe_weights<float> const& w) {
    return moe_layer<host_space, combined_affinity_prediction, follow_prediction, explicit_placement>(
        c, w, {.predictor = combined_affinity_prediction(plan, history2), .grouping = placements});
  });
  auto history3 = std::make_shared<rank_history>();
  auto const balanced = run_stack(tr, [&](moe_config const& c, moe_weights<float> const& w) {
    return moe_layer<host_space, combined_affinity_prediction, balanced_shuffle, explicit_placement>(
        c, w, {.predictor = combined_affinity_prediction(plan, history3), .grouping = placements});
  });
  // with hot-expert replicas the placements have several owners per expert: still lossless
  o.replicas_per_rank = 2;
  auto const plan_r = std::make_shared<grouping::speculative_plan const>(grouping::make_plan(tr, o));
  auto history4 = std::make_shared<rank_history>();
  auto const replicated = run_stack(tr, [&](moe_config const& c, moe_weights<float> const& w) {
    return moe_layer<host_space, combined_affinity_prediction, balanced_shuffle, explicit_placement>(
        c, w, {.predictor = combined_affinity_prediction(plan_r, history4), .grouping = grouping::plan_placements(*plan_r)});
  });
  CHECK(replicated.lar() >= balanced.lar() - 0.02);
  INFO("LAR balanced shuffle " << balanced.lar() << ", with replicas " << replicated.lar());
  CHECK(balanced.lar() > 1.5 * plain.lar());
  INFO("LAR plain " << plain.lar() << ", token " << token.lar() << ", layer " << layer.lar() << ", combined " << combined.lar());
  INFO("rank hit rate token " << token.rank_hit_rate() << ", layer " << layer.rank_hit_rate() << ", combined " << combined.rank_hit_rate());
  CHECK(token.lar() > 1.5 * plain.lar());
  CHECK(combined.lar() >= token.lar() - 0.05);  // A overrides T only where it is more confident
  CHECK(layer.predicted_tokens > 0);            // layers 2 and 3 had two previous layers to go on
  CHECK(layer.predicted_tokens < layer.tokens);  // layers 0 and 1 had none
  CHECK(token.rank_hit_rate() > 0.5);
}

TEST_CASE("affinity predictors: a plan for another model is refused", "[router][affinity][errors]") {
  auto const tr = stack_trace();
  grouping::co_cluster_options o;
  o.ranks = 2;  // the layers run 4 ranks
  auto const plan = std::make_shared<grouping::speculative_plan const>(grouping::make_plan(tr, o));
  auto const cfg = layer_config(0);
  synthetic::random_layer<float> weights(cfg, 1);
  moe_layer<host_space, token_affinity_prediction, follow_prediction> layer(cfg, weights.weights(),
                                                                            {.predictor = token_affinity_prediction(plan)});
  auto const x = synthetic::random_activations<float>(8, cfg.hidden_size, 2);
  std::vector<float> out(x.size());
  std::vector<std::int64_t> per_rank(D, 2);
  specmoe::test::require_error(
      [&] { layer.forward(host_batch<float>{matrix_view<float const>(x.data(), 8, cfg.hidden_size), per_rank}, matrix_view<float>(out.data(), 8, cfg.hidden_size)); },
      errc::shape_mismatch, "the plan is for 32 experts on 2 ranks");
  specmoe::test::require_error([] { token_affinity_prediction(nullptr); }, errc::invalid_argument, "needs a plan");
}
