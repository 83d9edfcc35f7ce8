// tests/support/testbed.hpp: random problems, poisoned buffers and error checks shared by tests.
#pragma once

#include "catch.hpp"

#include <specmoe/specmoe.hpp>
#include <specmoe/synthetic/random_layer.hpp>

#include <cstdint>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <tuple>
#include <vector>

namespace specmoe::test {

/// Spaces every layer test body runs in (cuda_space joins when the GPU layer exists).
using spaces = std::tuple<host_space>;

/// A storage value no layer computes: outputs are filled with it before a forward, so a row the
/// layer forgot to write (or wrote on error) shows.
template <storage_type T>
T poison() {
  if constexpr (std::is_same_v<T, float>) {
    return std::bit_cast<float>(0x7fc0dead);
  } else {
    return bf16::from_bits(0x7fad);
  }
}

template <storage_type T>
bool all_poison(std::vector<T> const& v) {
  auto const p = poison<T>();
  return std::all_of(v.begin(), v.end(), [&](T x) { return std::memcmp(&x, &p, sizeof(T)) == 0; });
}

template <storage_type T>
bool bit_equal(std::vector<T> const& a, std::vector<T> const& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

/// A random layer shape within the ranges the foundation issue names.
struct problem {
  moe_config cfg;
  std::vector<std::int64_t> tokens_per_rank;
  std::uint64_t seed = 0;

  [[nodiscard]] std::int64_t num_tokens() const {
    std::int64_t n = 0;
    for (auto t : tokens_per_rank) n += t;
    return n;
  }
};

inline problem random_problem(std::mt19937_64& rng, int num_ranks) {
  auto pick = [&](std::initializer_list<int> xs) {
    return *(xs.begin() + std::uniform_int_distribution<int>(0, static_cast<int>(xs.size()) - 1)(rng));
  };
  problem p;
  p.seed = rng();
  auto& c = p.cfg;
  c.num_ranks = num_ranks;
  c.hidden_size = pick({8, 16, 24});
  c.ffn_size = pick({4, 8, 12});
  c.num_experts = pick({1, 2, 3, 8, 16, 60, 64, 128, 256});
  c.top_k = std::uniform_int_distribution<int>(1, std::min(8, c.num_experts))(rng);
  if (c.num_experts % 4 == 0 && std::uniform_int_distribution<int>(0, 1)(rng)) {
    c.gate.kind = gate_kind::sigmoid_grouped_topk;
    c.gate.num_groups = pick({1, 2, 4});
    auto const per = c.num_experts / c.gate.num_groups;
    c.gate.topk_groups = std::uniform_int_distribution<int>(1, c.gate.num_groups)(rng);
    while (c.gate.topk_groups * per < c.top_k) ++c.gate.topk_groups;
    c.gate.routed_scaling_factor = 2.5f;
    c.gate.has_score_bias = true;
    c.num_shared_experts = pick({0, 1, 2});
    c.shared_ffn_size = c.num_shared_experts ? pick({4, 8}) : 0;
  }
  c.gate.renormalize = std::uniform_int_distribution<int>(0, 1)(rng) == 1;
  c.layer = std::uniform_int_distribution<int>(0, 3)(rng);
  for (int r = 0; r < num_ranks; ++r) {
    // Uneven, some ranks empty.
    p.tokens_per_rank.push_back(std::uniform_int_distribution<int>(0, 3)(rng) == 0
                                    ? 0
                                    : std::uniform_int_distribution<int>(1, 24)(rng));
  }
  return p;
}

/// Inputs, weights and the dense reference output of a problem.
template <storage_type T, storage_type W = T>
struct reference_run {
  problem prob;
  synthetic::random_layer<W> layer;
  std::vector<T> x;
  std::vector<T> expected;
  routing routed;

  explicit reference_run(problem p)
      : prob(std::move(p)), layer(prob.cfg, prob.seed),
        x(synthetic::random_activations<T>(prob.num_tokens(), prob.cfg.hidden_size, prob.seed + 11)),
        expected(x.size(), poison<T>()) {
    dense_reference<T>(prob.cfg, layer.weights(), view(), matrix_view<T>(expected.data(), prob.num_tokens(), prob.cfg.hidden_size),
                       std::nullopt, &routed);
  }
  [[nodiscard]] matrix_view<T const> view() const { return {x.data(), prob.num_tokens(), prob.cfg.hidden_size}; }
  [[nodiscard]] host_batch<T> batch() const { return {view(), prob.tokens_per_rank}; }

  /// Runs `layer` on this problem into a poisoned buffer and returns the output.
  template <class Layer>
  std::vector<T> run(Layer& l) const {
    std::vector<T> out(x.size(), poison<T>());
    l.forward(batch(), matrix_view<T>(out.data(), prob.num_tokens(), prob.cfg.hidden_size));
    return out;
  }
};

/// Requires `fn` to throw specmoe::error with `code` and a message containing `needle`.
inline void require_error(std::function<void()> const& fn, errc code, std::string const& needle) {
  try {
    fn();
  } catch (specmoe::error const& e) {
    INFO("message: " << e.what());
    CHECK(e.code() == code);
    CHECK(std::string(e.what()).find(needle) != std::string::npos);
    return;
  }
  FAIL("expected specmoe::error " << to_string(code) << " containing \"" << needle << "\"");
}

}  // namespace specmoe::test
