// specmoe/router/predictors.hpp: reference RouterPredictors — the oracle (upper bound) and the
// adversaries (random, always wrong) that prove a guess never changes the output.
#pragma once

#include <specmoe/core/expert_weights.hpp>
#include <specmoe/router/concepts.hpp>
#include <specmoe/router/gate.hpp>

#include <cstdint>
#include <random>
#include <vector>

namespace specmoe {

/// @brief Runs the real gate ahead of time: every guess right (the upper bound of speculation).
///
/// Needs the layer's router weights; on host_space it recomputes exactly the routing the layer
/// will compute (not the engine's routing when the engine supplies its own).
template <storage_type W>
class oracle_prediction {
 public:
  static constexpr bool predicts = true;
  explicit oracle_prediction(gate_weights<W> router) : router_(router) {}

  void predict(prediction_request const& req, prediction& out) {
    routing r;
    route(req.activations.data, req.num_tokens, router_, req.config, r);
    out.reset(req.num_tokens, req.config.top_k);
    out.experts.assign(r.topk_ids.begin(), r.topk_ids.end());
  }
  void observe(routing_observation const&) {}

 private:
  gate_weights<W> router_;
};

/// @brief Guesses uniformly at random (seeded, so runs repeat): a rank per token and, when
/// `width` > 0, that many distinct experts.
class random_prediction {
 public:
  static constexpr bool predicts = true;
  explicit random_prediction(std::uint64_t seed = 0x5eed, int width = 0) : rng_(seed), width_(width) {}

  void predict(prediction_request const& req, prediction& out) {
    auto const E = req.config.num_experts;
    auto const w = width_ < E ? width_ : E;
    out.reset(req.num_tokens, w);
    std::uniform_int_distribution<int> rank(0, req.config.num_ranks - 1), expert(0, E - 1);
    for (std::int64_t t = 0; t < req.num_tokens; ++t) {
      out.rank[static_cast<std::size_t>(t)] = rank(rng_);
      for (int j = 0; j < w; ++j) {
        std::int32_t e;
        bool dup;
        do {
          e = expert(rng_);
          dup = false;
          for (int p = 0; p < j; ++p) dup = dup || out.expert(t, p) == e;
        } while (dup);
        out.experts[static_cast<std::size_t>(t * w + j)] = e;
      }
    }
  }
  void observe(routing_observation const&) {}

 private:
  std::mt19937_64 rng_;
  int width_;
};

/// @brief Always wrong on purpose: for each token, guesses experts it will not choose and a rank
/// that owns as few of its real experts as possible (none where one exists). The worst case a
/// speculative placement must survive with an unchanged output.
template <storage_type W>
class always_wrong_prediction {
 public:
  static constexpr bool predicts = true;
  explicit always_wrong_prediction(gate_weights<W> router) : router_(router) {}

  void predict(prediction_request const& req, prediction& out) {
    routing r;
    route(req.activations.data, req.num_tokens, router_, req.config, r);
    auto const E = req.config.num_experts, k = req.config.top_k, D = req.config.num_ranks;
    out.reset(req.num_tokens, k);
    std::vector<int> owned(static_cast<std::size_t>(D));
    for (std::int64_t t = 0; t < req.num_tokens; ++t) {
      auto chosen = [&](int e) {
        for (int j = 0; j < k; ++j) if (r.id(t, j) == e) return true;
        return false;
      };
      int j = 0;
      for (int e = 0; e < E && j < k; ++e) {
        if (!chosen(e)) out.experts[static_cast<std::size_t>(t * k + j++)] = e;
      }
      std::fill(owned.begin(), owned.end(), 0);
      for (int s = 0; s < k; ++s) {
        for (int o : req.placement.owners(r.id(t, s))) ++owned[static_cast<std::size_t>(o)];
      }
      auto const home = req.home_rank[static_cast<std::size_t>(t)];
      int worst = (home + 1) % D;
      for (int i = 1; i <= D; ++i) {
        auto const d = (home + i) % D;
        if (owned[static_cast<std::size_t>(d)] < owned[static_cast<std::size_t>(worst)]) worst = d;
      }
      out.rank[static_cast<std::size_t>(t)] = worst;
    }
  }
  void observe(routing_observation const&) {}

 private:
  gate_weights<W> router_;
};

/// @brief Predicts a routing known in advance (a recorded trace, a generated workload): right
/// every time on the batch it was built for. The trace-driven upper bound of replay simulations.
class replay_prediction {
 public:
  static constexpr bool predicts = true;
  explicit replay_prediction(routing known) : known_(std::move(known)) {}

  void predict(prediction_request const& req, prediction& out) {
    SPECMOE_EXPECTS(known_.num_tokens == req.num_tokens, errc::shape_mismatch, "replay_prediction holds ",
                    known_.num_tokens, " tokens, the batch has ", req.num_tokens);
    out.reset(req.num_tokens, known_.top_k);
    out.experts = known_.topk_ids;
  }
  void observe(routing_observation const&) {}

 private:
  routing known_;
};

static_assert(router_predictor<oracle_prediction<float>>);
static_assert(router_predictor<replay_prediction>);
static_assert(router_predictor<random_prediction>);
static_assert(router_predictor<always_wrong_prediction<bf16>>);

}  // namespace specmoe
