// specmoe/synthetic/random_layer.hpp: random weights and inputs for a layer shape, owned in one
// place (tests, the demo, benchmarks and users' own policy experiments).
#pragma once

#include <specmoe/core/bfloat16.hpp>
#include <specmoe/core/expert_weights.hpp>
#include <specmoe/core/moe_config.hpp>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

namespace specmoe::synthetic {

/// @brief Fills `n` values uniform in [-scale, scale), rounded to T (seeded: runs repeat).
template <storage_type T>
std::vector<T> uniform(std::size_t n, float scale, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(-scale, scale);
  std::vector<T> v(n);
  for (auto& x : v) x = from_float<T>(dist(rng));
  return v;
}

/// @brief Random weights for `cfg`, scaled like a trained layer's (outputs of order 1 for inputs of
/// order 1), held by this object; `weights()` gives the views a layer takes.
///
/// `router_scale` widens the logits: larger values give peakier (more confident) routing.
template <storage_type W>
class random_layer {
 public:
  explicit random_layer(moe_config const& cfg, std::uint64_t seed = 1, float router_scale = 4.0f) : cfg_(cfg) {
    cfg.validate();
    auto const E = static_cast<std::size_t>(cfg.num_experts), H = static_cast<std::size_t>(cfg.hidden_size),
               F = static_cast<std::size_t>(cfg.ffn_size);
    auto const S = static_cast<std::size_t>(cfg.num_shared_experts), SF = static_cast<std::size_t>(cfg.shared_ffn_size);
    auto const in_h = 1.0f / std::sqrt(static_cast<float>(H));
    router_ = uniform<W>(E * H, router_scale * in_h, seed * 7 + 1);
    if (cfg.gate.has_score_bias) {
      auto const b = uniform<float>(E, 0.05f, seed * 7 + 2);
      bias_.assign(b.begin(), b.end());
    }
    gate_ = uniform<W>(E * F * H, 2.0f * in_h, seed * 7 + 3);
    up_ = uniform<W>(E * F * H, 2.0f * in_h, seed * 7 + 4);
    down_ = uniform<W>(E * H * F, 2.0f / std::sqrt(static_cast<float>(F)), seed * 7 + 5);
    if (S > 0) {
      shared_gate_ = uniform<W>(S * SF * H, 2.0f * in_h, seed * 7 + 6);
      shared_up_ = uniform<W>(S * SF * H, 2.0f * in_h, seed * 7 + 7);
      shared_down_ = uniform<W>(S * H * SF, 2.0f / std::sqrt(static_cast<float>(SF)), seed * 7 + 8);
    }
  }

  [[nodiscard]] moe_weights<W> weights() const {
    auto const E = cfg_.num_experts, H = cfg_.hidden_size, F = cfg_.ffn_size;
    moe_weights<W> w;
    w.router = {matrix_view<W const>(router_.data(), E, H), bias_};
    w.experts = ffn_weights<W>::dense(gate_.data(), up_.data(), down_.data(), E, H, F);
    w.shared = ffn_weights<W>::dense(shared_gate_.data(), shared_up_.data(), shared_down_.data(),
                                     cfg_.num_shared_experts, H, cfg_.num_shared_experts ? cfg_.shared_ffn_size : 0);
    return w;
  }
  [[nodiscard]] moe_config const& config() const noexcept { return cfg_; }

  /// Mutable storage, for tests that plant a bad value.
  std::vector<W>& router_storage() noexcept { return router_; }
  std::vector<W>& expert_gate_storage() noexcept { return gate_; }

 private:
  moe_config cfg_;
  std::vector<W> router_, gate_, up_, down_, shared_gate_, shared_up_, shared_down_;
  std::vector<float> bias_;
};

/// @brief Random activations [n, hidden] uniform in [-1, 1), rounded to T.
template <storage_type T>
std::vector<T> random_activations(std::int64_t n, int hidden, std::uint64_t seed) {
  return uniform<T>(static_cast<std::size_t>(n) * static_cast<std::size_t>(hidden), 1.0f, seed);
}

}  // namespace specmoe::synthetic
