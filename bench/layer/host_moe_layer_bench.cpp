// The whole host reference layer, plain and with an oracle moving tokens (args: tokens per rank, ranks).
// Shapes are scaled down (hidden 256) so the CPU reference runs in milliseconds; the counters
// (LAR, bytes per token) are what the policies change and do not depend on the hidden size.
#include <specmoe/specmoe.hpp>
#include <specmoe/synthetic/random_layer.hpp>

#include <benchmark/benchmark.h>

namespace {

using namespace specmoe;

moe_config scaled_deepseek(int ranks) {
  auto c = models::deepseek_v3(ranks);
  c.hidden_size = 256;
  c.ffn_size = 64;
  c.shared_ffn_size = 64;
  return c;
}

template <class Layer>
void run(benchmark::State& s, Layer& layer, synthetic::random_layer<bf16> const&, std::vector<bf16> const& x) {
  auto const& cfg = layer.config();
  std::vector<std::int64_t> tpr(static_cast<std::size_t>(cfg.num_ranks), s.range(0));
  auto const n = s.range(0) * cfg.num_ranks;
  std::vector<bf16> out(x.size());
  host_batch<bf16> b{matrix_view<bf16 const>(x.data(), n, cfg.hidden_size), tpr};
  for (auto _ : s) {
    layer.forward(b, matrix_view<bf16>(out.data(), n, cfg.hidden_size));
    benchmark::ClobberMemory();
  }
  auto const& c = layer.last_counters();
  s.counters["time_per_token"] = benchmark::Counter(static_cast<double>(n),
                                                  benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
  s.counters["lar"] = c.lar();
  s.counters["cross_bytes_per_token"] = static_cast<double>(c.total_bytes()) / static_cast<double>(n);
}

void plain(benchmark::State& s) {
  auto const cfg = scaled_deepseek(static_cast<int>(s.range(1)));
  synthetic::random_layer<bf16> w(cfg, 5);
  auto const x = synthetic::random_activations<bf16>(s.range(0) * cfg.num_ranks, cfg.hidden_size, 6);
  moe_layer<host_space> layer(cfg, w.weights());
  run(s, layer, w, x);
}

void oracle_follow(benchmark::State& s) {
  auto const cfg = scaled_deepseek(static_cast<int>(s.range(1)));
  synthetic::random_layer<bf16> w(cfg, 5);
  auto const x = synthetic::random_activations<bf16>(s.range(0) * cfg.num_ranks, cfg.hidden_size, 6);
  moe_layer<host_space, oracle_prediction<bf16>, follow_prediction> layer(
      cfg, w.weights(), {.predictor = oracle_prediction<bf16>(w.weights().router)});
  run(s, layer, w, x);
}

}  // namespace

BENCHMARK(plain)->Args({16, 4})->Args({128, 8})->Unit(benchmark::kMillisecond);
BENCHMARK(oracle_follow)->Args({16, 4})->Args({128, 8})->Unit(benchmark::kMillisecond);
