// SP-MoE's predictors (router/draft_predictors.hpp): the target gate on a draft's hidden state,
// widened guesses, the trace's draft routing, and their counters.
#include "support/testbed.hpp"

#include <specmoe/router/draft_predictors.hpp>
#include <specmoe/synthetic/random_layer.hpp>
#include <specmoe/synthetic/trace_generator.hpp>

#include <cmath>
#include <random>

using namespace specmoe;
using specmoe::test::require_error;

namespace {

/// Rows near `x`: x + noise of relative size `eps` (a draft whose attention output resembles the target's).
std::vector<float> perturbed(std::vector<float> const& x, float eps, std::mt19937_64& rng) {
  std::normal_distribution<float> n(0.0f, 1.0f);
  std::vector<float> y(x);
  for (auto& v : y) v += eps * n(rng);
  return y;
}

/// Scores `g` token by token (a verification batch of one), so recall is per token.
template <class P>
void score_per_token(P& p, prediction const& g, routing const& truth) {
  for (std::int64_t t = 0; t < truth.num_tokens; ++t) {
    prediction one;
    one.reset(1, g.width);
    std::copy_n(g.experts.begin() + t * g.width, g.width, one.experts.begin());
    auto const k = truth.top_k;
    p.score(one, routing_view{std::span(truth.topk_ids).subspan(static_cast<std::size_t>(t * k), static_cast<std::size_t>(k)),
                              std::span(truth.topk_weights).subspan(static_cast<std::size_t>(t * k), static_cast<std::size_t>(k)), 1, k});
  }
}

}  // namespace

TEST_CASE("draft router: the target gate on the target's own hidden state is the gate itself", "[router][draft]") {
  std::mt19937_64 rng(std::random_device{}());
  for (auto cfg : {models::mixtral_8x7b(), models::deepseek_v2_lite(), models::deepseek_v3()}) {
    cfg.hidden_size = 64;
    cfg.ffn_size = 32;
    cfg.shared_ffn_size = 32;
    synthetic::random_layer<float> layer(cfg, rng());
    auto const w = layer.weights();
    auto const x = synthetic::random_activations<float>(40, cfg.hidden_size, rng());
    draft_router_prediction<float> draft(cfg, w.router);
    auto const guess = draft.guess(matrix_view<float const>(x.data(), 40, cfg.hidden_size));
    routing truth;
    route(x.data(), 40, w.router, cfg, truth);
    CHECK(guess.experts == truth.topk_ids);
    draft.score(guess, routing_view{truth.topk_ids, truth.topk_weights, 40, cfg.top_k});
    CHECK(draft.counters().recall() == 1.0);
    CHECK(draft.counters().top1_accuracy() == 1.0);
  }
}

TEST_CASE("draft router: accuracy falls with the draft's distance, a wider guess recovers recall", "[router][draft]") {
  std::mt19937_64 rng(std::random_device{}());
  auto cfg = models::deepseek_v2_lite();
  cfg.hidden_size = 128;
  cfg.ffn_size = 32;
  cfg.shared_ffn_size = 32;
  synthetic::random_layer<float> layer(cfg, rng());
  auto const w = layer.weights();
  int const n = 400;
  auto const x = synthetic::random_activations<float>(n, cfg.hidden_size, rng());
  routing truth;
  route(x.data(), n, w.router, cfg, truth);
  double last = 1.1;
  for (float eps : {0.05f, 0.3f, 3.0f}) {
    auto const near = perturbed(x, eps, rng);
    draft_router_prediction<float> draft(cfg, w.router);
    score_per_token(draft, draft.guess(matrix_view<float const>(near.data(), n, cfg.hidden_size)), truth);
    CHECK(draft.counters().recall() < last);
    last = draft.counters().recall();
    draft_router_prediction<float> wide(cfg, w.router, 2 * cfg.top_k);
    auto const g = wide.guess(matrix_view<float const>(near.data(), n, cfg.hidden_size));
    CHECK(g.width == 12);
    score_per_token(wide, g, truth);
    CHECK(wide.counters().recall() > draft.counters().recall());
    CHECK(wide.counters().guessed > draft.counters().guessed);
    for (int t = 0; t < n; ++t) {  // distinct experts per token
      std::vector<int> row(g.experts.begin() + t * 12, g.experts.begin() + (t + 1) * 12);
      std::sort(row.begin(), row.end());
      CHECK(std::adjacent_find(row.begin(), row.end()) == row.end());
    }
  }
  CHECK(last < 0.6);  // a far draft guesses poorly
}

TEST_CASE("draft router: bad shapes and widths are refused", "[router][draft]") {
  auto cfg = models::mixtral_8x7b();
  cfg.hidden_size = 16;
  cfg.ffn_size = 16;
  synthetic::random_layer<float> layer(cfg, 3);
  require_error([&] { draft_router_prediction<float> p(cfg, layer.weights().router, 9); }, errc::invalid_argument, "width 9");
  draft_router_prediction<float> p(cfg, layer.weights().router);
  std::vector<float> x(3 * 8, 1.0f);
  require_error([&] { (void)p.guess(matrix_view<float const>(x.data(), 3, 8)); }, errc::shape_mismatch, "share the hidden size");
  std::vector<float> nan_rows(2 * 16, std::nanf(""));
  require_error([&] { (void)p.guess(matrix_view<float const>(nan_rows.data(), 2, 16)); }, errc::non_finite, "not finite");
}

TEST_CASE("trace draft prediction replays the trace's draft routing", "[router][draft]") {
  synthetic::trace_params tp;
  tp.layers = 6;
  tp.experts = 16;
  tp.top_k = 2;
  tp.tokens = 500;
  tp.draft_layers = 3;
  tp.seed = std::random_device{}();
  auto const tr = synthetic::generate_trace(tp);
  trace_draft_prediction const p(&tr);
  CHECK(p.draft_layer_of(0) == 0);
  CHECK(p.draft_layer_of(2) == 1);
  CHECK(p.draft_layer_of(1) == -1);
  auto const g = p.guess(4, 100, 7);
  for (int t = 0; t < 7; ++t) {
    for (int j = 0; j < 2; ++j) CHECK(g.expert(t, j) == tr.draft_topk_ids[static_cast<std::size_t>((2 * 500 + 100 + t) * 2 + j)]);
  }
  auto const none = p.guess(1, 0, 3);
  CHECK(std::all_of(none.experts.begin(), none.experts.end(), [](int e) { return e == -1; }));
  require_error([&] { (void)p.guess(0, 495, 10); }, errc::invalid_argument, "outside the trace");
  auto plain = tr;
  plain.meta.draft.reset();
  plain.draft_topk_ids.clear();
  require_error([&] { trace_draft_prediction q(&plain); }, errc::invalid_argument, "needs a trace with draft routing");
  CHECK(distinct_experts(g).size() <= 14u);
}
