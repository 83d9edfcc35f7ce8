#include "support/testbed.hpp"

#include <specmoe/router/gate.hpp>

#include <cmath>
#include <limits>

using namespace specmoe;

TEST_CASE("softmax top-k picks the largest logits, ties to the lower id, weights renormalised", "[router][gate]") {
  moe_config cfg{.hidden_size = 1, .ffn_size = 1, .num_experts = 6, .top_k = 3};
  float const logits[6] = {0.5f, 2.0f, -1.0f, 2.0f, 1.0f, 0.0f};
  std::int32_t ids[3] = {};
  float w[3];
  route_token(logits, {}, cfg, ids, w);
  REQUIRE(ids[0] == 1);
  REQUIRE(ids[1] == 3);
  REQUIRE(ids[2] == 4);
  double z = 0;
  for (float l : logits) z += std::exp(double(l));
  double const p1 = std::exp(2.0) / z, p4 = std::exp(1.0) / z;
  REQUIRE(w[0] == Catch::Approx(p1 / (2 * p1 + p4)).epsilon(1e-6));
  REQUIRE(w[0] + w[1] + w[2] == Catch::Approx(1.0f));
  cfg.gate.renormalize = false;
  route_token(logits, {}, cfg, ids, w);
  REQUIRE(w[2] == Catch::Approx(p4).epsilon(1e-6));
}

TEST_CASE("sigmoid grouped top-k keeps the best groups, chooses with the bias, weighs without it", "[router][gate]") {
  // 8 experts in 4 groups of 2; keep 2 groups; top-2.
  moe_config cfg{.hidden_size = 1, .ffn_size = 1, .num_experts = 8, .top_k = 2,
                 .gate = {.kind = gate_kind::sigmoid_grouped_topk, .renormalize = true, .num_groups = 4,
                          .topk_groups = 2, .routed_scaling_factor = 2.5f, .has_score_bias = true}};
  //   group:      0            1            2            3
  float const logits[8] = {3.0f, -4.0f, 1.0f, 1.0f, 2.5f, -4.0f, -1.0f, -1.0f};
  // Bias lifts group 3 (sigmoid(-1) = .269, +.6/.7) above all others, expert 7 above 6.
  float const bias[8] = {0, 0, 0, 0, 0, 0, 0.6f, 0.7f};
  std::int32_t ids[2] = {};
  float w[2];
  route_token(logits, bias, cfg, ids, w);
  // Group scores: g0 = .953+.018, g1 = .731*2, g2 = .924+.018, g3 = .869+.969 -> keep g3, g1.
  REQUIRE(ids[0] == 7);
  REQUIRE(ids[1] == 6);
  REQUIRE(w[0] == Catch::Approx(1.25f));  // equal unbiased scores (.269), renormalised, times 2.5
  float const nobias[8] = {};
  route_token(logits, nobias, cfg, ids, w);
  // Groups g1 (1.462) and g0 (0.971) are kept (g2 0.942, g3 0.538): experts 0, then 2 (tie with 3).
  REQUIRE(ids[0] == 0);
  REQUIRE(ids[1] == 2);
  float const s0 = 1 / (1 + std::exp(-3.0f)), s2 = 1 / (1 + std::exp(-1.0f));
  REQUIRE(w[0] == Catch::Approx(2.5f * s0 / (s0 + s2)));
}

TEST_CASE("route rejects non-finite logits naming token and rank", "[router][gate]") {
  moe_config cfg{.hidden_size = 2, .ffn_size = 1, .num_experts = 2, .top_k = 1};
  std::vector<float> wts{1.0f, 0.0f, 0.0f, 1.0f};
  gate_weights<float> g{matrix_view<float const>(wts.data(), 2, 2), {}};
  std::vector<float> x{0.5f, 0.25f, std::numeric_limits<float>::infinity(), 0.0f};
  routing r;
  specmoe::test::require_error([&] { route(x.data(), 2, g, cfg, r, 40, 3); }, errc::non_finite,
                               "router logit of token 41 (rank 3) for expert 0 is not finite");
  route(x.data(), 1, g, cfg, r);
  REQUIRE(r.id(0, 0) == 0);
}
