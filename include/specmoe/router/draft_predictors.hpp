// specmoe/router/draft_predictors.hpp: SP-MoE's predictors of which target experts a verification
// will need (issue 7), and the counters that score them.
//
//   gate_on_hidden_prediction  a target gate applied to another hidden state. Two uses:
//     - the draft-model router (SP-MoE): the draft's layer-l attention output through the
//       target's layer-l gate (alias draft_router_prediction); draft and target share hidden size
//       and layer count (Mistral-7B for Mixtral-8x7B, a quantised copy for DeepSeek-V2-Lite);
//     - the look-ahead gate of earlier offloaders: the target's layer l+d gate on layer l's hidden
//       state (alias lookahead_gate_prediction).
//     `width` > top_k widens the guess: the gate's own top-k first, then the next experts by score.
//   trace_draft_prediction     the draft routing recorded in a trace (draft_topk_ids), for replay.
//   oracle_prediction          (router/predictors.hpp) the real gate, the upper bound.
// Each scores itself against what the gate then chose (expert_prediction_counters).
#pragma once

#include <specmoe/core/error.hpp>
#include <specmoe/core/expert_weights.hpp>
#include <specmoe/core/matrix_view.hpp>
#include <specmoe/core/moe_config.hpp>
#include <specmoe/core/routing.hpp>
#include <specmoe/router/concepts.hpp>
#include <specmoe/router/gate.hpp>
#include <specmoe/trace/routing_trace.hpp>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

namespace specmoe {

/// @brief How well expert guesses matched the gate, over a run.
struct expert_prediction_counters {
  std::int64_t needed = 0;      ///< distinct experts the gate chose, per layer and batch, summed
  std::int64_t hits = 0;        ///< ... that the guess named
  std::int64_t guessed = 0;     ///< distinct experts guessed, summed (copies a prefetcher would issue)
  std::int64_t tokens = 0;      ///< tokens scored one by one
  std::int64_t top1_hits = 0;   ///< ... whose guessed first expert is the gate's first
  [[nodiscard]] double recall() const noexcept { return needed ? static_cast<double>(hits) / static_cast<double>(needed) : 0.0; }
  [[nodiscard]] double precision() const noexcept { return guessed ? static_cast<double>(hits) / static_cast<double>(guessed) : 0.0; }
  [[nodiscard]] double top1_accuracy() const noexcept {
    return tokens ? static_cast<double>(top1_hits) / static_cast<double>(tokens) : 0.0;
  }

  /// Scores one batch: `guess` [n, width] against the gate's `actual` routing [n, top_k].
  void score(prediction const& guess, routing_view actual, int num_experts) {
    SPECMOE_EXPECTS(static_cast<std::int64_t>(guess.experts.size()) == actual.num_tokens * guess.width, errc::shape_mismatch,
                    "expert_prediction_counters: the guess covers ", guess.width ? guess.experts.size() / static_cast<std::size_t>(guess.width) : 0,
                    " tokens, the routing ", actual.num_tokens);
    std::vector<char> named(static_cast<std::size_t>(num_experts), 0), used(static_cast<std::size_t>(num_experts), 0);
    for (std::int64_t t = 0; t < actual.num_tokens; ++t) {
      for (int j = 0; j < guess.width; ++j) {
        auto const e = guess.expert(t, j);
        if (e >= 0 && e < num_experts && !named[static_cast<std::size_t>(e)]) named[static_cast<std::size_t>(e)] = 1, ++guessed;
      }
      if (guess.width > 0 && actual.top_k > 0) {
        ++tokens;
        top1_hits += guess.expert(t, 0) == actual.id(t, 0);
      }
    }
    for (std::int64_t t = 0; t < actual.num_tokens; ++t) {
      for (int j = 0; j < actual.top_k; ++j) {
        auto const e = actual.id(t, j);
        if (e < 0 || used[static_cast<std::size_t>(e)]) continue;
        used[static_cast<std::size_t>(e)] = 1;
        ++needed;
        hits += named[static_cast<std::size_t>(e)];
      }
    }
  }
};

/// @brief The distinct experts of a guess, ascending (what a prefetcher copies for one layer).
[[nodiscard]] inline std::vector<int> distinct_experts(prediction const& p) {
  std::vector<int> out;
  for (auto e : p.experts) {
    if (e >= 0) out.push_back(e);
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

/// @brief A target gate applied to another hidden state (see the file comment).
template <storage_type W>
class gate_on_hidden_prediction {
 public:
  static constexpr bool predicts = true;

  /// @param target the target layer whose gate is borrowed (its top_k, gate kind and bias).
  /// @param width experts guessed per token: 0 = top_k; more widens the guess.
  /// @throw specmoe::error invalid_argument when width exceeds num_experts or the gate's shape
  ///        disagrees with the config.
  gate_on_hidden_prediction(moe_config const& target, gate_weights<W> gate, int width = 0)
      : cfg_(target), gate_(gate), width_(width == 0 ? target.top_k : width) {
    target.validate();
    SPECMOE_EXPECTS(width_ >= target.top_k && width_ <= target.num_experts, errc::invalid_argument, "prediction width ", width,
                    " must lie in [top_k = ", target.top_k, ", num_experts = ", target.num_experts, "] (0 = top_k)");
    SPECMOE_EXPECTS(gate.weight.rows == target.num_experts && gate.weight.cols == target.hidden_size, errc::shape_mismatch,
                    "gate weight is [", gate.weight.rows, ", ", gate.weight.cols, "], the target layer needs [", target.num_experts,
                    ", ", target.hidden_size, "]");
  }

  [[nodiscard]] int width() const noexcept { return width_; }
  [[nodiscard]] expert_prediction_counters const& counters() const noexcept { return counters_; }

  /// @brief Guesses for `hidden` [n, hidden_size] fp32 rows (the draft's attention output, or an
  /// earlier layer's hidden state): per token the gate's top_k, then further experts by score.
  /// @throw specmoe::error shape_mismatch / non_finite naming the row.
  [[nodiscard]] prediction guess(matrix_view<float const> hidden) const {
    SPECMOE_EXPECTS(hidden.cols == cfg_.hidden_size, errc::shape_mismatch, "hidden rows have ", hidden.cols,
                    " columns; the target gate reads ", cfg_.hidden_size, " (draft and target must share the hidden size)");
    auto const n = hidden.rows;
    int const E = cfg_.num_experts, k = cfg_.top_k;
    std::vector<float> x(static_cast<std::size_t>(n * cfg_.hidden_size));
    for (std::int64_t t = 0; t < n; ++t) std::copy_n(hidden.row_ptr(t), cfg_.hidden_size, x.data() + t * cfg_.hidden_size);
    routing r;
    route(x.data(), n, gate_, cfg_, r);
    prediction out;
    out.reset(n, width_);
    std::vector<float> logits;
    if (width_ > k) logits = router_logits(x.data(), n, gate_);
    std::vector<int> order(static_cast<std::size_t>(E));
    for (std::int64_t t = 0; t < n; ++t) {
      for (int j = 0; j < k; ++j) out.experts[static_cast<std::size_t>(t * width_ + j)] = r.id(t, j);
      if (width_ == k) continue;
      // further candidates by score (logit + bias: the order the gate itself would rank them in)
      float const* l = logits.data() + t * E;
      auto score = [&](int e) { return l[e] + (gate_.score_bias.empty() ? 0.0f : gate_.score_bias[static_cast<std::size_t>(e)]); };
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return score(a) > score(b); });
      int j = k;
      for (int e : order) {
        if (j == width_) break;
        bool const chosen = std::find(r.topk_ids.begin() + t * k, r.topk_ids.begin() + (t + 1) * k, e) != r.topk_ids.begin() + (t + 1) * k;
        if (!chosen) out.experts[static_cast<std::size_t>(t * width_ + j++)] = e;
      }
    }
    return out;
  }

  /// RouterPredictor: guesses from the request's activations (the engine passes the hidden state
  /// the predictor reads, e.g. the draft's attention output).
  void predict(prediction_request const& req, prediction& out) { out = guess(req.activations); }
  /// Scores the last guess against the gate's routing.
  void observe(routing_observation const& o) {
    if (o.predicted) counters_.score(*o.predicted, o.routing, cfg_.num_experts);
  }
  /// Scores a guess made outside the layer (the offload path) against the gate's routing.
  void score(prediction const& guess, routing_view actual) { counters_.score(guess, actual, cfg_.num_experts); }

 private:
  moe_config cfg_;
  gate_weights<W> gate_;
  int width_;
  expert_prediction_counters counters_;
};

/// SP-MoE's draft-model router: the draft's layer-l attention output through target layer l's gate.
template <storage_type W>
using draft_router_prediction = gate_on_hidden_prediction<W>;
/// The look-ahead gate: target layer l+d's gate on layer l's hidden state.
template <storage_type W>
using lookahead_gate_prediction = gate_on_hidden_prediction<W>;

static_assert(router_predictor<gate_on_hidden_prediction<float>>);

/// @brief The draft routing a trace recorded (draft_topk_ids), for replaying SP-MoE.
class trace_draft_prediction {
 public:
  /// @throw specmoe::error invalid_argument when the trace has no draft routing.
  explicit trace_draft_prediction(trace::routing_trace const* tr) : tr_(tr) {
    SPECMOE_EXPECTS(tr && tr->meta.draft.has_value(), errc::invalid_argument,
                    "trace_draft_prediction needs a trace with draft routing (draft_topk_ids.npy)");
  }
  /// The draft layer that predicts target layer `layer`, or -1 (draft layer d predicts target
  /// layer d * layers / draft.layers).
  [[nodiscard]] int draft_layer_of(int layer) const noexcept {
    auto const& d = *tr_->meta.draft;
    for (int dl = 0; dl < d.layers; ++dl) {
      if (static_cast<std::int64_t>(dl) * tr_->meta.layers / d.layers == layer) return dl;
    }
    return -1;
  }
  /// Guesses for target layer `layer` at trace positions [first, first + n): [n, draft top_k].
  /// @throw specmoe::error invalid_argument when the positions or the layer are outside the trace.
  [[nodiscard]] prediction guess(int layer, std::int64_t first, std::int64_t n) const {
    auto const& m = tr_->meta;
    auto const& d = *m.draft;
    SPECMOE_EXPECTS(layer >= 0 && layer < m.layers && first >= 0 && n >= 0 && first + n <= m.tokens, errc::invalid_argument,
                    "trace_draft_prediction: layer ", layer, " positions [", first, ", ", first + n, ") outside the trace's ",
                    m.layers, " layers and ", m.tokens, " tokens");
    prediction out;
    out.reset(n, d.top_k);
    int const dl = draft_layer_of(layer);
    if (dl < 0) return out;  // no draft layer maps here: no guess
    auto const* src = tr_->draft_topk_ids.data() + (static_cast<std::int64_t>(dl) * m.tokens + first) * d.top_k;
    std::copy_n(src, n * d.top_k, out.experts.begin());
    return out;
  }

 private:
  trace::routing_trace const* tr_;
};

}  // namespace specmoe
