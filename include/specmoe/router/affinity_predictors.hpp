// specmoe/router/affinity_predictors.hpp: Speculative MoE's predictors, driven by a plan
// (grouping/speculative_plan.hpp). They guess each token's rank before the gate runs:
//
//   token_affinity_prediction     T: the rank the plan clustered the token's vocabulary id on,
//                                 with confidence T_p (needs token ids in the batch);
//   layer_affinity_prediction     A: the next rank after the ranks that served the token at the two
//                                 previous layers (a 2-gram), with confidence A_p;
//   combined_affinity_prediction  both, the guess with the higher confidence (the paper's rule).
//
// The layer predictors learn the previous layers' ranks through a `rank_history` that the layers
// of one model share (std::shared_ptr) and that each layer's observe step writes: the layers must
// run in order on the same batch. A guess only moves tokens; the output never changes.
#pragma once

#include <specmoe/core/error.hpp>
#include <specmoe/grouping/speculative_plan.hpp>
#include <specmoe/router/concepts.hpp>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

namespace specmoe {

/// The rank that served most of each batch position's experts, per layer, from the last forward.
class rank_history {
 public:
  void record(int layer, std::vector<int> ranks) {
    SPECMOE_EXPECTS(layer >= 0, errc::invalid_argument, "rank_history: negative layer ", layer);
    if (static_cast<std::size_t>(layer) >= by_layer_.size()) by_layer_.resize(static_cast<std::size_t>(layer) + 1);
    by_layer_[static_cast<std::size_t>(layer)] = std::move(ranks);
  }
  /// The ranks recorded for `layer` if they cover `num_tokens` positions, else null.
  [[nodiscard]] std::vector<int> const* at(int layer, std::int64_t num_tokens) const {
    if (layer < 0 || static_cast<std::size_t>(layer) >= by_layer_.size()) return nullptr;
    auto const& r = by_layer_[static_cast<std::size_t>(layer)];
    return static_cast<std::int64_t>(r.size()) == num_tokens ? &r : nullptr;
  }

 private:
  std::vector<std::vector<int>> by_layer_;
};

namespace affinity_detail {

inline grouping::plan_layer const& plan_layer_for(grouping::speculative_plan const& plan, moe_config const& c) {
  SPECMOE_EXPECTS(c.layer >= 0 && c.layer < plan.layers, errc::invalid_argument, "the plan covers layers [0, ", plan.layers,
                  "), the layer is ", c.layer);
  SPECMOE_EXPECTS(plan.experts == c.num_experts && plan.ranks == c.num_ranks, errc::shape_mismatch, "the plan is for ", plan.experts,
                  " experts on ", plan.ranks, " ranks, the layer has ", c.num_experts, " on ", c.num_ranks);
  return plan.per_layer[static_cast<std::size_t>(c.layer)];
}

/// Fills out.rank / out.confidence from the token table where it knows the id.
inline void guess_from_tokens(grouping::plan_layer const& L, prediction_request const& req, prediction& out) {
  for (std::size_t t = 0; t < req.token_ids.size(); ++t) {
    auto const id = req.token_ids[t];
    if (id < 0 || id > INT32_MAX) continue;
    auto const [rank, conf] = L.token(static_cast<std::int32_t>(id));
    if (rank >= 0 && conf > out.confidence[t]) {
      out.rank[t] = rank;
      out.confidence[t] = conf;
    }
  }
}

/// Fills out.rank / out.confidence from the 2-gram table where both previous ranks are known.
inline void guess_from_layers(grouping::plan_layer const& L, rank_history const& h, prediction_request const& req, prediction& out) {
  int const l = req.config.layer;
  auto const* r2 = h.at(l - 2, req.num_tokens);
  auto const* r1 = h.at(l - 1, req.num_tokens);
  if (!r2 || !r1) return;
  for (std::size_t t = 0; t < r1->size(); ++t) {
    auto const [rank, conf] = L.next_rank((*r2)[t], (*r1)[t], req.config.num_ranks);
    if (rank >= 0 && conf > out.confidence[t]) {
      out.rank[t] = rank;
      out.confidence[t] = conf;
    }
  }
}

/// The rank serving most of each token's real activations (ties: the lower rank).
inline std::vector<int> served_ranks(routing_observation const& o) {
  auto const n = o.routing.num_tokens;
  std::vector<int> ranks(static_cast<std::size_t>(n), 0), votes(static_cast<std::size_t>(o.placement.num_ranks()));
  for (std::int64_t t = 0; t < n; ++t) {
    std::fill(votes.begin(), votes.end(), 0);
    for (int j = 0; j < o.routing.top_k; ++j) {
      auto const e = o.routing.id(t, j);
      if (e < 0) continue;
      for (int const r : o.placement.owners(e)) ++votes[static_cast<std::size_t>(r)];
    }
    ranks[static_cast<std::size_t>(t)] = static_cast<int>(std::max_element(votes.begin(), votes.end()) - votes.begin());
  }
  return ranks;
}

}  // namespace affinity_detail

/// T: the plan's rank for each token's vocabulary id (no guess for unknown ids or batches without ids).
class token_affinity_prediction {
 public:
  static constexpr bool predicts = true;
  explicit token_affinity_prediction(std::shared_ptr<grouping::speculative_plan const> plan) : plan_(std::move(plan)) {
    SPECMOE_EXPECTS(plan_ != nullptr, errc::invalid_argument, "token_affinity_prediction needs a plan");
  }
  void predict(prediction_request const& req, prediction& out) {
    auto const& L = affinity_detail::plan_layer_for(*plan_, req.config);
    out.reset(req.num_tokens, 0);
    out.confidence.assign(static_cast<std::size_t>(req.num_tokens), 0.0f);
    affinity_detail::guess_from_tokens(L, req, out);
  }
  void observe(routing_observation const&) {}

 private:
  std::shared_ptr<grouping::speculative_plan const> plan_;
};

/// A (and, with `UseTokens`, T too: the more confident guess per token). Holds the plan and the
/// rank history the model's layers share; observe records this layer's served ranks.
template <bool UseTokens>
class history_affinity_prediction {
 public:
  static constexpr bool predicts = true;
  history_affinity_prediction(std::shared_ptr<grouping::speculative_plan const> plan, std::shared_ptr<rank_history> history)
      : plan_(std::move(plan)), history_(std::move(history)) {
    SPECMOE_EXPECTS(plan_ && history_, errc::invalid_argument, "affinity predictors over layers need a plan and a shared rank_history");
  }
  void predict(prediction_request const& req, prediction& out) {
    auto const& L = affinity_detail::plan_layer_for(*plan_, req.config);
    out.reset(req.num_tokens, 0);
    out.confidence.assign(static_cast<std::size_t>(req.num_tokens), 0.0f);
    if constexpr (UseTokens) affinity_detail::guess_from_tokens(L, req, out);
    affinity_detail::guess_from_layers(L, *history_, req, out);
  }
  void observe(routing_observation const& o) { history_->record(o.config.layer, affinity_detail::served_ranks(o)); }

 private:
  std::shared_ptr<grouping::speculative_plan const> plan_;
  std::shared_ptr<rank_history> history_;
};

/// A: the plan's next rank after the ranks that served each token at the two previous layers.
using layer_affinity_prediction = history_affinity_prediction<false>;
/// T and A together: per token, the guess with the higher confidence.
using combined_affinity_prediction = history_affinity_prediction<true>;

static_assert(router_predictor<token_affinity_prediction>);
static_assert(router_predictor<layer_affinity_prediction>);
static_assert(router_predictor<combined_affinity_prediction>);

}  // namespace specmoe
