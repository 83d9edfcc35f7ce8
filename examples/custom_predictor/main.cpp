// specmoe-custom_predictor: a user-written RouterPredictor, plugged into the layer and
// benchmarked beside the built-in ones with specmoe's policy harness.
//
//   specmoe-custom_predictor [--benchmark_format=json --benchmark_out=predictors.json]
//
// SPECMOE_NEEDS_BENCHMARK (tells examples/CMakeLists.txt to link Google Benchmark)
#include <specmoe/bench/policy_bench.hpp>
#include <specmoe/specmoe.hpp>
#include <specmoe/synthetic/random_layer.hpp>

#include <cstdio>
#include <unordered_map>

// --- The user's policy: remember the experts each token id chose last time. -------------------
// Everything the layer needs: `predicts`, `predict` and `observe` (concept specmoe::router_predictor).
class last_choice_predictor {
 public:
  static constexpr bool predicts = true;

  void predict(specmoe::prediction_request const& req, specmoe::prediction& out) {
    out.reset(req.num_tokens, req.config.top_k);
    if (req.token_ids.empty()) return;  // no ids: no guess (-1), the layer keeps the token home
    for (std::int64_t t = 0; t < req.num_tokens; ++t) {
      auto const it = table_.find(req.token_ids[static_cast<std::size_t>(t)]);
      if (it == table_.end()) continue;
      std::copy(it->second.begin(), it->second.end(), out.experts.begin() + t * req.config.top_k);
    }
  }
  void observe(specmoe::routing_observation const& seen) {
    if (seen.token_ids.empty()) return;
    for (std::int64_t t = 0; t < seen.routing.num_tokens; ++t) {
      auto& entry = table_[seen.token_ids[static_cast<std::size_t>(t)]];
      entry.assign(seen.routing.topk_ids.begin() + t * seen.routing.top_k,
                   seen.routing.topk_ids.begin() + (t + 1) * seen.routing.top_k);
    }
  }

 private:
  std::unordered_map<std::int64_t, std::vector<std::int32_t>> table_;
};
static_assert(specmoe::router_predictor<last_choice_predictor>);

namespace {

using namespace specmoe;

// The policy in a layer: output unchanged, counters say how well it guessed.
void show_in_layer() {
  auto cfg = models::qwen3_30b_a3b(4);
  cfg.hidden_size = 64;
  cfg.ffn_size = 32;
  synthetic::random_layer<float> w(cfg, 1);
  moe_layer<host_space, last_choice_predictor, follow_prediction> layer(cfg, w.weights());
  std::int64_t const n = 4 * 64;
  std::vector<std::int64_t> tpr(4, 64), ids(static_cast<std::size_t>(n));
  for (std::size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<std::int64_t>(i % 16);  // 16 recurring token ids
  for (int step = 0; step < 3; ++step) {
    // The same 16 ids with fresh activations: the router sees similar, not equal, inputs.
    auto x = synthetic::random_activations<float>(n, cfg.hidden_size, 100 + static_cast<std::uint64_t>(step));
    for (std::int64_t t = 0; t < n; ++t) {
      for (int h = 0; h < 8; ++h) x[static_cast<std::size_t>(t * cfg.hidden_size + h)] = static_cast<float>(ids[static_cast<std::size_t>(t)] % 4) - 1.5f;
    }
    std::vector<float> out(x.size());
    layer.forward({matrix_view<float const>(x.data(), n, cfg.hidden_size), tpr, ids},
                  matrix_view<float>(out.data(), n, cfg.hidden_size));
    auto const& c = layer.last_counters();
    std::printf("step %d: expert recall %.2f, rank hits %.2f, LAR %.2f\n", step, c.expert_hit_rate(),
                c.rank_hit_rate(), c.lar());
  }
}

void user_predictor(benchmark::State& s) { bench::time_predictor(s, last_choice_predictor{}, models::qwen3_30b_a3b()); }
void builtin_random(benchmark::State& s) { bench::time_predictor(s, random_prediction(1, 8), models::qwen3_30b_a3b()); }

}  // namespace

BENCHMARK(user_predictor)->Args({128, 4})->Args({1024, 8});
BENCHMARK(builtin_random)->Args({128, 4})->Args({1024, 8});

int main(int argc, char** argv) {
  show_in_layer();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
