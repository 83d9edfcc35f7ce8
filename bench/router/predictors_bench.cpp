// Built-in RouterPredictors timed alone on generated routing (args: tokens per rank, ranks).
#include <specmoe/bench/policy_bench.hpp>
#include <specmoe/router/predictors.hpp>

namespace {

using namespace specmoe;

void random_ranks(benchmark::State& s) { bench::time_predictor(s, random_prediction(1, 0), models::qwen3_30b_a3b()); }
void random_experts(benchmark::State& s) { bench::time_predictor(s, random_prediction(1, 8), models::qwen3_30b_a3b()); }

// Replays the batch's true routing: the accuracy ceiling, and the cost of the layer's bookkeeping.
struct replay_all {
  static constexpr bool predicts = true;
  std::vector<routing> known;
  std::size_t next = 0;
  void predict(prediction_request const& r, prediction& out) {
    out.reset(r.num_tokens, r.config.top_k);
    out.experts = known[next++ % known.size()].topk_ids;
  }
  void observe(routing_observation const&) {}
};

void replay(benchmark::State& s) {
  replay_all p;
  for (auto const& w : bench::workloads(s, models::qwen3_30b_a3b())) p.known.push_back(w.actual);
  bench::time_predictor(s, std::move(p), models::qwen3_30b_a3b());
}

}  // namespace

BENCHMARK(random_ranks)->Args({128, 4})->Args({1024, 8});
BENCHMARK(random_experts)->Args({128, 4})->Args({1024, 8});
BENCHMARK(replay)->Args({128, 4})->Args({1024, 8});
