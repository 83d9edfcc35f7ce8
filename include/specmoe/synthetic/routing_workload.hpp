// specmoe/synthetic/routing_workload.hpp: generated routing for policy benchmarks and simulation.
#pragma once

#include <specmoe/core/expert_placement.hpp>
#include <specmoe/core/matrix_view.hpp>
#include <specmoe/core/moe_config.hpp>
#include <specmoe/core/routing.hpp>
#include <specmoe/core/token_plan.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

namespace specmoe::synthetic {

/// @brief Knobs of the routing generator (defaults: moderately skewed, moderately predictable).
struct workload_params {
  std::int64_t tokens_per_rank = 128;
  int vocabulary = 4096;          ///< distinct token ids
  double token_skew = 1.0;        ///< Zipf exponent of token-id frequencies
  double expert_skew = 0.8;       ///< Zipf exponent of expert popularity (load imbalance)
  double affinity = 0.75;         ///< chance that a slot takes one of the token id's favourite experts
  std::uint64_t model_seed = 7;   ///< the "model": expert popularity order and each token id's favourites
  std::uint64_t seed = 1;         ///< the batch: which tokens come and which slots follow their favourites
  bool with_activations = false;  ///< also draw random activations [N, hidden] (for predictors that read them)
};

/// @brief A batch of D ranks' tokens with token ids and routing: what a predictor, placement,
/// grouping or backend sees in one forward, without weights or a gate.
///
/// Each token id has k favourite experts (fixed per id); a slot takes the next favourite with
/// probability `affinity`, otherwise an expert drawn by popularity. So token-id tables can learn
/// it (as on real models), and it is reproducible from the seed.
struct routing_workload {
  moe_config config;
  std::vector<std::int64_t> tokens_per_rank;  ///< [D]
  std::vector<int> home_rank;                 ///< [N]
  std::vector<std::int64_t> token_ids;        ///< [N]
  routing actual;                             ///< [N, k] batch order
  std::vector<float> activations;             ///< [N, hidden] random, or empty unless asked for

  /// The activations as a view ([N, 0] when they were not generated).
  [[nodiscard]] matrix_view<float const> activation_view() const noexcept {
    return {activations.data(), actual.num_tokens, activations.empty() ? 0 : config.hidden_size};
  }

  [[nodiscard]] std::int64_t num_tokens() const noexcept { return actual.num_tokens; }
};

namespace detail {
inline std::vector<double> zipf_cdf(int n, double s) {
  std::vector<double> cdf(static_cast<std::size_t>(n));
  double sum = 0;
  for (int i = 0; i < n; ++i) cdf[static_cast<std::size_t>(i)] = sum += 1.0 / std::pow(i + 1.0, s);
  for (auto& c : cdf) c /= sum;
  return cdf;
}
inline int draw(std::vector<double> const& cdf, std::mt19937_64& rng) {
  double const u = std::uniform_real_distribution<double>(0.0, 1.0)(rng);
  auto const it = std::lower_bound(cdf.begin(), cdf.end(), u);
  return static_cast<int>(std::min<std::ptrdiff_t>(it - cdf.begin(), static_cast<std::ptrdiff_t>(cdf.size()) - 1));
}
}  // namespace detail

/// @brief Generates one batch of `p.tokens_per_rank` tokens on each of config.num_ranks ranks.
inline routing_workload make_workload(moe_config const& config, workload_params const& p) {
  config.validate();
  auto const D = config.num_ranks, E = config.num_experts, k = config.top_k;
  routing_workload w;
  w.config = config;
  w.tokens_per_rank.assign(static_cast<std::size_t>(D), p.tokens_per_rank);
  auto const N = p.tokens_per_rank * D;
  w.home_rank = home_ranks(w.tokens_per_rank);
  w.actual.resize(N, k);
  w.token_ids.resize(static_cast<std::size_t>(N));
  std::mt19937_64 rng(p.seed), model_rng(p.model_seed);
  auto const token_cdf = detail::zipf_cdf(p.vocabulary, p.token_skew);
  auto const expert_cdf = detail::zipf_cdf(E, p.expert_skew);
  // Popularity ranks map to a fixed random permutation of experts, so hot experts are spread out.
  std::vector<int> popular(static_cast<std::size_t>(E));
  for (int e = 0; e < E; ++e) popular[static_cast<std::size_t>(e)] = e;
  std::shuffle(popular.begin(), popular.end(), model_rng);
  // Each token id's k favourite experts, drawn once from the model seed.
  std::vector<int> favourites(static_cast<std::size_t>(p.vocabulary) * static_cast<std::size_t>(k));
  for (int id = 0; id < p.vocabulary; ++id) {
    auto* f = favourites.data() + static_cast<std::size_t>(id) * static_cast<std::size_t>(k);
    for (int n = 0; n < k;) {
      auto const e = popular[static_cast<std::size_t>(detail::draw(expert_cdf, model_rng))];
      if (std::find(f, f + n, e) == f + n) f[n++] = e;
    }
  }
  for (std::int64_t t = 0; t < N; ++t) {
    auto const id = detail::draw(token_cdf, rng);
    w.token_ids[static_cast<std::size_t>(t)] = id;
    auto const* favourite = favourites.data() + static_cast<std::size_t>(id) * static_cast<std::size_t>(k);
    std::bernoulli_distribution take_favourite(p.affinity);
    int next_favourite = 0;
    for (int j = 0; j < k; ++j) {
      std::int32_t e = -1;
      auto used = [&](std::int32_t x) {
        for (int i = 0; i < j; ++i)
          if (w.actual.topk_ids[static_cast<std::size_t>(t * k + i)] == x) return true;
        return false;
      };
      while (next_favourite < k && take_favourite(rng)) {
        auto const f = favourite[next_favourite++];
        if (!used(f)) {
          e = f;
          break;
        }
      }
      while (e < 0 || used(e)) e = popular[static_cast<std::size_t>(detail::draw(expert_cdf, rng))];
      w.actual.topk_ids[static_cast<std::size_t>(t * k + j)] = e;
      w.actual.topk_weights[static_cast<std::size_t>(t * k + j)] = 1.0f / static_cast<float>(k);
    }
  }
  if (!p.with_activations) return w;
  std::uniform_real_distribution<float> x(-1.0f, 1.0f);
  w.activations.resize(static_cast<std::size_t>(N) * static_cast<std::size_t>(config.hidden_size));
  for (auto& v : w.activations) v = x(rng);
  return w;
}

}  // namespace specmoe::synthetic
