// specmoe-sim: replays a routing trace through the host layer over D simulated expert-parallel
// ranks, once plainly (contiguous experts, tokens stay) and once with Speculative MoE (a plan's
// expert placement, a predictor, the balanced token shuffle), checks that every output is bit for
// bit the plain one, and prints one JSON object with what changed.
//
//   specmoe-sim --trace DIR --ranks D [--plan PLAN.json] [--predictor none|token|layer|combined|oracle]
//               [--unbalanced] [--tokens N] [--hidden H] [--seed S]
// Defaults: no plan = contiguous placement; predictor `combined` when a plan is given, else `none`
// (oracle needs no plan); tokens: the whole trace; hidden 64 (bytes scale with it linearly).
// cross_rank_bytes = dispatch + combine between ranks; shuffle_bytes (the token moves there and
// back) apart: free when the shuffle is the reduce-scatter of tensor-parallel attention, paid with
// data-parallel attention.
//
// With --offload it replays SP-MoE expert offloading instead (offload_mode.hpp).
#include <specmoe/detail/cli.hpp>
#include "offload_mode.hpp"
#include <specmoe/grouping/speculative_plan.hpp>
#include <specmoe/placement/balanced_shuffle.hpp>
#include <specmoe/router/affinity_predictors.hpp>
#include <specmoe/specmoe.hpp>
#include <specmoe/synthetic/random_layer.hpp>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <vector>

namespace {

using namespace specmoe;

struct sim_setup {
  trace::routing_trace tr;
  std::int64_t tokens = 0;
  int ranks = 0, hidden = 64;
  std::uint64_t seed = 1;
  std::vector<std::int64_t> ids, per_rank;
};

struct sim_totals {
  layer_counters plain, spec;
  double max_load_over_mean = 0.0;
  bool lossless = true;
};

/// One layer's inputs: weights, activations and the trace's routing for the first `tokens` positions.
struct layer_inputs {
  moe_config cfg;
  synthetic::random_layer<float> weights;
  std::vector<float> x;
  std::vector<std::int32_t> ids;
  std::vector<float> w;
  layer_inputs(sim_setup const& s, int l)
      : cfg{.hidden_size = s.hidden, .ffn_size = std::max(8, s.hidden / 2), .num_experts = s.tr.meta.experts, .top_k = s.tr.meta.top_k,
            .num_ranks = s.ranks},
        weights((cfg.layer = l, cfg), s.seed + static_cast<std::uint64_t>(l)),
        x(synthetic::random_activations<float>(s.tokens, s.hidden, s.seed * 31 + static_cast<std::uint64_t>(l))) {
    std::vector<float> scratch;
    auto const r = s.tr.layer_routing(l, scratch);
    ids.assign(r.topk_ids.begin(), r.topk_ids.begin() + s.tokens * cfg.top_k);
    w.assign(r.topk_weights.begin(), r.topk_weights.begin() + s.tokens * cfg.top_k);
  }
  [[nodiscard]] routing_view routing(std::int64_t n) const { return {ids, w, n, cfg.top_k}; }
};

template <class Layer>
std::vector<float> run(Layer& layer, sim_setup const& s, layer_inputs const& in) {
  std::vector<float> out(in.x.size());
  layer.forward(host_batch<float>{matrix_view<float const>(in.x.data(), s.tokens, s.hidden), s.per_rank, s.ids, in.routing(s.tokens)},
                matrix_view<float>(out.data(), s.tokens, s.hidden));
  return out;
}

/// Plain and speculative runs of every layer; `make_layer(cfg, weights, layer_inputs)` builds the speculative layer.
template <class MakeLayer>
sim_totals simulate(sim_setup const& s, MakeLayer&& make_layer) {
  sim_totals t;
  for (int l = 0; l < s.tr.meta.layers; ++l) {
    layer_inputs const in(s, l);
    moe_layer<host_space> plain(in.cfg, in.weights.weights());
    auto const want = run(plain, s, in);
    auto spec = make_layer(in.cfg, in.weights.weights(), in);
    auto const got = run(spec, s, in);
    t.lossless = t.lossless && std::equal(want.begin(), want.end(), got.begin(), [](float a, float b) {
                   return std::memcmp(&a, &b, sizeof a) == 0;
                 });
    t.plain.accumulate(plain.last_counters());
    auto const& c = spec.last_counters();
    t.spec.accumulate(c);
    if (!c.activations_per_rank.empty() && c.activations > 0) {
      double const mean = static_cast<double>(c.activations) / s.ranks;
      t.max_load_over_mean = std::max(t.max_load_over_mean, static_cast<double>(*std::max_element(c.activations_per_rank.begin(),
                                                                                                   c.activations_per_rank.end())) / mean);
    }
  }
  return t;
}

/// The oracle: the trace's own routing of the layer being run (an upper bound for any predictor).
struct trace_oracle_prediction {
  static constexpr bool predicts = true;
  trace::routing_trace const* tr = nullptr;
  void predict(prediction_request const& req, prediction& out) {
    int const k = tr->meta.top_k;
    out.reset(req.num_tokens, k);
    for (std::int64_t t = 0; t < req.num_tokens; ++t) {
      for (int j = 0; j < k; ++j) out.experts[static_cast<std::size_t>(t * k + j)] = tr->id(req.config.layer, t, j);
    }
  }
  void observe(routing_observation const&) {}
};

/// Dispatch and combine bytes between ranks (after de-duplication). The shuffle is reported apart:
/// with tensor-parallel attention it rides on the reduce-scatter the layer pays anyway.
std::int64_t cross_rank_bytes(layer_counters const& c) { return c.dispatch.total() + c.combine.total(); }

}  // namespace

int main(int argc, char** argv) {
  detail::cli::args a(argc, argv, "specmoe-sim",
                      "specmoe-sim --trace DIR --ranks D [--plan PLAN.json] [--predictor none|token|layer|combined|oracle] "
                      "[--unbalanced] [--tokens N] [--hidden H] [--seed S]\n"
                      "   or: specmoe-sim --trace DIR --offload --cache-experts N [--profile P.json] [--gamma G] "
                      "[--predictor draft|lookahead|oracle|none] [--cutoff L|auto] [--replacement lru|lfu|protect|protect_lfu|frequency|protect_frequency] "
                      "[--lookahead-accuracy A] [--steps S] [--sweep] [--expert-mib M] [--draft-mib D] [--stretch-profile] [--seed S]",
                      {"--unbalanced", "--offload", "--sweep", "--stretch-profile"});
  try {
    if (a.has("--offload")) return specmoe_sim::run_offload(a);
    sim_setup s;
    auto const dir = a.required("--trace");
    if (!a.has("--ranks")) a.fail("--ranks is required");
    s.ranks = static_cast<int>(a.integer("--ranks", 0, 1, 4096));
    auto const plan_path = a.text("--plan", "");
    auto const predictor = a.choice("--predictor", plan_path.empty() ? "none" : "combined", {"none", "token", "layer", "combined", "oracle"});
    bool const unbalanced = a.has("--unbalanced");
    auto const max_tokens = a.integer("--tokens", 0, 0, 1ll << 40);
    s.hidden = static_cast<int>(a.integer("--hidden", 64, 8, 1 << 16));
    if (s.hidden % 8 != 0) a.fail("--hidden must be a multiple of 8");
    s.seed = static_cast<std::uint64_t>(a.integer("--seed", 1, 0, 1ll << 62));
    a.finish();

    s.tr = trace::read_trace(dir);
    auto const& m = s.tr.meta;
    SPECMOE_EXPECTS(m.experts % s.ranks == 0 || plan_path.empty(), errc::invalid_argument, "experts (", m.experts,
                    ") must divide among the ranks (", s.ranks, ")");
    s.tokens = max_tokens > 0 ? std::min<std::int64_t>(max_tokens, m.tokens) : m.tokens;
    for (int r = 0; r < s.ranks; ++r) s.per_rank.push_back(s.tokens / s.ranks + (r < s.tokens % s.ranks ? 1 : 0));
    if (s.tr.has_token_ids()) s.ids.assign(s.tr.token_ids.begin(), s.tr.token_ids.begin() + s.tokens);
    std::shared_ptr<grouping::speculative_plan const> plan;
    if (!plan_path.empty()) {
      plan = std::make_shared<grouping::speculative_plan const>(grouping::read_plan(plan_path));
      SPECMOE_EXPECTS(plan->layers == m.layers && plan->experts == m.experts && plan->ranks == s.ranks, errc::shape_mismatch,
                      plan_path, ": the plan is for ", plan->layers, " layers of ", plan->experts, " experts on ", plan->ranks,
                      " ranks; the trace has ", m.layers, " layers of ", m.experts, " experts, the run ", s.ranks, " ranks");
    }
    if ((predictor == "token" || predictor == "layer" || predictor == "combined") && !plan) a.fail("--predictor " + predictor + " needs --plan");
    if (predictor == "token" && !s.tr.has_token_ids()) a.fail("--predictor token needs token_ids.npy in the trace");

    auto const grouping_policy = plan ? grouping::plan_placements(*plan) : explicit_placement();
    auto history = std::make_shared<rank_history>();
    auto spec_layer = [&](auto predictor_obj, auto placement_obj) {
      return [&, predictor_obj, placement_obj](moe_config const& cfg, moe_weights<float> const& w, layer_inputs const&) {
        using P = decltype(predictor_obj);
        using Q = decltype(placement_obj);
        if (plan) {
          return moe_layer<host_space, P, Q, explicit_placement>(cfg, w, {.predictor = predictor_obj, .placement = placement_obj,
                                                                          .grouping = grouping_policy});
        }
        return moe_layer<host_space, P, Q, explicit_placement>(
            cfg, w, {.predictor = predictor_obj, .placement = placement_obj, .grouping = explicit_placement(contiguous_blocks{}.place(cfg, 0))});
      };
    };
    sim_totals totals;
    auto pick = [&](auto predictor_obj) {
      totals = unbalanced ? simulate(s, spec_layer(predictor_obj, follow_prediction{}))
                          : simulate(s, spec_layer(predictor_obj, balanced_shuffle{}));
    };
    if (predictor == "token") {
      pick(token_affinity_prediction(plan));
    } else if (predictor == "layer") {
      pick(layer_affinity_prediction(plan, history));
    } else if (predictor == "combined") {
      pick(combined_affinity_prediction(plan, history));
    } else if (predictor == "oracle") {
      // the trace's own routing, replayed per layer
      pick(trace_oracle_prediction{&s.tr});
    } else {
      totals = simulate(s, spec_layer(no_prediction{}, stay{}));
    }
    auto const& c = totals.spec;
    std::printf(
        "{\"ranks\": %d, \"layers\": %d, \"tokens\": %lld, \"hidden\": %d, \"plan\": %s, \"solver\": \"%s\", \"replicas_per_rank\": %d, "
        "\"predictor\": \"%s\", \"shuffle\": \"%s\", "
        "\"lar\": %.4f, \"baseline_lar\": %.4f, \"cross_rank_bytes\": %lld, \"baseline_cross_rank_bytes\": %lld, "
        "\"bytes_saved\": %.4f, \"shuffle_bytes\": %lld, \"prediction_accuracy\": %.4f, \"max_rank_load_over_mean\": %.4f, \"lossless\": %s}\n",
        s.ranks, m.layers, static_cast<long long>(s.tokens), s.hidden, plan ? ("\"" + plan_path + "\"").c_str() : "null",
        plan ? plan->solver.c_str() : "contiguous", plan ? plan->replicas_per_rank : 0, predictor.c_str(), predictor == "none" ? "none" : unbalanced ? "unbalanced" : "balanced", c.lar(), totals.plain.lar(),
        static_cast<long long>(cross_rank_bytes(c)), static_cast<long long>(cross_rank_bytes(totals.plain)),
        1.0 - static_cast<double>(cross_rank_bytes(c)) / static_cast<double>(std::max<std::int64_t>(1, cross_rank_bytes(totals.plain))),
        static_cast<long long>(c.shuffle.total()), c.rank_hit_rate(), totals.max_load_over_mean, totals.lossless ? "true" : "false");
    return totals.lossless ? 0 : 3;
  } catch (std::exception const& e) {
    std::fprintf(stderr, "specmoe-sim: %s\n", e.what());
    return 1;
  }
}
