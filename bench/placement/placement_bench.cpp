// TokenPlacements timed alone, given a predictor's guesses (args: tokens per rank, ranks).
#include <specmoe/bench/policy_bench.hpp>
#include <specmoe/router/predictors.hpp>

namespace {

using namespace specmoe;

void stay_home(benchmark::State& s) { bench::time_placement(s, stay{}, no_prediction{}, models::deepseek_v3()); }
void follow_random(benchmark::State& s) {
  bench::time_placement(s, follow_prediction{}, random_prediction(3, 0), models::deepseek_v3());
}

}  // namespace

BENCHMARK(stay_home)->Args({128, 8})->Args({2048, 8});
BENCHMARK(follow_random)->Args({128, 8})->Args({2048, 8});
