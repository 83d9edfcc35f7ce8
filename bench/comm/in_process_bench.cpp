// The in-process exchange carrying one de-duplicated dispatch (args: tokens per rank, ranks).
#include <specmoe/bench/policy_bench.hpp>

namespace {

void in_process_dispatch(benchmark::State& s) {
  specmoe::bench::time_host_comm(s, specmoe::in_process{}, specmoe::models::deepseek_v3());
}

}  // namespace

BENCHMARK(in_process_dispatch)->Args({128, 4})->Args({1024, 8});
