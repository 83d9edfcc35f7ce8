// ExpertGroupings timed alone: placement plus the serving-rank lookup of a batch (args: tokens per rank, ranks).
#include <specmoe/bench/policy_bench.hpp>

#include <random>

namespace {

using namespace specmoe;

void contiguous(benchmark::State& s) { bench::time_grouping(s, contiguous_blocks{}, models::deepseek_v3()); }

// Every expert replicated on two ranks: the lookup's replica path.
void two_replicas(benchmark::State& s) {
  auto cfg = models::deepseek_v3(static_cast<int>(s.range(1)));
  std::vector<std::vector<int>> owners(static_cast<std::size_t>(cfg.num_experts));
  for (int e = 0; e < cfg.num_experts; ++e) {
    int const r = e * cfg.num_ranks / cfg.num_experts;
    owners[static_cast<std::size_t>(e)] = {r, (r + 1) % cfg.num_ranks};
  }
  bench::time_grouping(s, explicit_placement(expert_placement(cfg.num_ranks, owners)), cfg);
}

}  // namespace

BENCHMARK(contiguous)->Args({128, 8})->Args({2048, 8});
BENCHMARK(two_replicas)->Args({128, 8})->Args({2048, 8});
