// tests/offload/offload_gpu.hpp: the GPU side of the offload runtime tests behind a plain C++
// interface, so the Catch2 cases (offload_gpu_test.cpp) are compiled by the host compiler; the
// CUDA code lives in offload_gpu.cu, which includes no Catch2 (see tests/CMakeLists.txt for why).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace offload_test {

/// What a scenario found: every failed check as a sentence (empty: all passed), plus counts the
/// test asserts on.
struct report {
  std::vector<std::string> failures;
  long long speculative_copies = 0;
  long long demand_copies = 0;
  long long copy_operations = 0;
  long long copy_calls = 0;
  long long stolen_jobs = 0;
  long long evictions = 0;
  long long forwards = 0;   ///< layer forwards compared
  long long hits = 0;       ///< acquired experts found with their copy issued
  long long acquired = 0;
};

bool has_gpu();

enum class copy_pattern {
  single,     ///< one expert
  coalesced,  ///< experts adjacent in the store into adjacent slots: fewer copies than experts
  batched,    ///< non-adjacent experts in one worker batch
  evicting,   ///< more experts than slots: evicted experts' table entries must be null
};

/// Prefetches a pattern into a fresh prefetcher, drains, then compares every resident slot with
/// its host block byte for byte and the residency table with the cache book. `registered`: the
/// store pins caller memory (cudaHostRegister) loaded from strided (fused w13) views.
report prefetch_copies(copy_pattern pattern, bool registered, std::uint64_t seed);

enum class model_kind { mixtral_like, deepseek_like };
enum class prediction { right, wrong, none };
enum class policy_kind { lru, lfu, protect_predicted, frequency_warm };  ///< frequency_warm: warm_start from random use counts first

struct stack_case {
  model_kind model = model_kind::mixtral_like;
  double cache_fraction = 0.5;  ///< of all routed experts of all layers (raised to one forward's need)
  prediction predict = prediction::none;
  int tokens = 2;               ///< gamma + 1
  int steps = 3;
  policy_kind policy = policy_kind::lru;
  std::uint64_t seed = 1;
};

/// Decode steps through the offloaded stack against the all-resident layers on the same inputs:
/// outputs must be bit-identical; after each step the cache book and the residency table agree,
/// nothing stays pinned, and occupancy never exceeds the capacity.
report stack_matches_resident(stack_case const& c);

/// The same with the smallest cache and a second thread prefetching random experts of every layer
/// as fast as it can while the main thread verifies (speculative copies racing demand loads).
report stress_racing_prefetches(std::uint64_t seed, int steps);

/// Acquired experts are read by a slow kernel while prefetches evict and refill their slots after
/// release: the kernel must still see the original bytes, and while pinned the experts keep their
/// slots.
report pinned_slots_are_not_overwritten(std::uint64_t seed);

/// Builds an offloaded stack (mixtral-like, 4 layers, 8 experts top-2) with `slots` GPU slots and
/// `tokens` tokens per forward (throws specmoe::error when the budget is too small).
void build_stack(int slots, int tokens);

/// What an acquire beyond the budget left behind.
struct budget_outcome {
  bool threw = false;            ///< the second acquire threw specmoe::error
  bool invalid_argument = false; ///< ... with errc::invalid_argument
  std::string message;
  std::vector<int> first_pins;   ///< pins of the first acquire's experts after the throw (each 1)
  int occupied = 0;              ///< slots occupied after the throw
};

/// A prefetcher of `slots` slots acquires `first` distinct experts, then (without releasing)
/// acquires `second` other experts.
budget_outcome acquire_beyond_budget(int slots, int first, int second);

/// Creates a prefetcher, queues `prefetches` random prefetches (many more than slots) and destroys
/// it at once, `rounds` times. Returns the failures (a CUDA error left behind, a count that does
/// not add up).
report shutdown_with_copies_in_flight(int rounds, int prefetches);

}  // namespace offload_test
