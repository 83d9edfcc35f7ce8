// Bad input gets a specmoe::error naming the problem, and the caller's output stays untouched.
#include "support/testbed.hpp"

#include <specmoe/specmoe.hpp>

#include <limits>

using namespace specmoe;
using specmoe::test::reference_run;
using specmoe::test::require_error;

namespace {

moe_config small_config(int ranks = 2) {
  return {.hidden_size = 8, .ffn_size = 4, .num_experts = 8, .top_k = 2, .num_ranks = ranks};
}

// Runs forward with `batch` into a poisoned output; requires the error and an untouched output.
template <class Layer>
void require_rejected(Layer& layer, host_batch<float> const& batch, std::int64_t rows, errc code,
                      std::string const& needle) {
  std::vector<float> out(static_cast<std::size_t>(rows * layer.config().hidden_size), specmoe::test::poison<float>());
  require_error([&] { layer.forward(batch, matrix_view<float>(out.data(), rows, layer.config().hidden_size)); }, code,
                needle);
  REQUIRE(specmoe::test::all_poison(out));
}

}  // namespace

TEST_CASE("NaN and Inf activations are rejected, naming the token", "[layer][errors]") {
  auto const cfg = small_config();
  reference_run<float> ref({cfg, {3, 4}, 1});
  moe_layer<host_space> layer(cfg, ref.layer.weights());
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    auto x = ref.x;
    x[5 * 8 + 3] = bad;  // token 5 = rank 1's token 2
    host_batch<float> b{matrix_view<float const>(x.data(), 7, 8), ref.prob.tokens_per_rank};
    require_rejected(layer, b, 7, errc::non_finite, "x[5][3] (rank 1, token 2)");
  }
}

TEST_CASE("NaN or Inf router logits are rejected, naming the token and rank", "[layer][errors]") {
  auto const cfg = small_config();
  reference_run<float> ref({cfg, {3, 4}, 2});
  // A huge router weight overflows one expert's logit to Inf for every token (weights finite).
  auto layer_weights = ref.layer;
  layer_weights.router_storage()[3 * 8 + 0] = 3e38f;
  layer_weights.router_storage()[3 * 8 + 1] = 3e38f;
  moe_layer<host_space> layer(cfg, layer_weights.weights());
  auto x = ref.x;
  for (std::size_t i = 0; i < 14; i += 8) x[i] = x[i + 1] = 1.0f;  // tokens 0 and 1: logit = 6e38 -> Inf
  for (std::int64_t t = 0; t < 7; ++t) x[static_cast<std::size_t>(t * 8)] = x[static_cast<std::size_t>(t * 8 + 1)] = 1.0f;
  host_batch<float> b{matrix_view<float const>(x.data(), 7, 8), ref.prob.tokens_per_rank};
  require_rejected(layer, b, 7, errc::non_finite, "router logit of token 0 (rank 0) for expert 3");
}

TEST_CASE("engine routing with an expert id out of range or repeated is rejected", "[layer][errors]") {
  auto const cfg = small_config();
  reference_run<float> ref({cfg, {3, 4}, 3});
  moe_layer<host_space> layer(cfg, ref.layer.weights());
  auto r = ref.routed;
  auto b = ref.batch();
  r.topk_ids[9] = 8;  // token 4, slot 1
  b.routing = r.view();
  require_rejected(layer, b, 7, errc::expert_out_of_range, "expert id 8 of token 4 slot 1 is out of range [0, 8)");
  r = ref.routed;
  r.topk_ids[9] = r.topk_ids[8];
  b.routing = r.view();
  require_rejected(layer, b, 7, errc::expert_out_of_range, "appears twice in token 4");
  r = ref.routed;
  r.topk_weights[2] = std::numeric_limits<float>::quiet_NaN();
  b.routing = r.view();
  require_rejected(layer, b, 7, errc::non_finite, "routing weight of token 1 slot 0");
}

TEST_CASE("shapes that disagree are rejected", "[layer][errors]") {
  auto const cfg = small_config();
  reference_run<float> ref({cfg, {3, 4}, 4});
  moe_layer<host_space> layer(cfg, ref.layer.weights());
  std::vector<std::int64_t> wrong_split{3, 3};
  require_rejected(layer, {ref.view(), wrong_split}, 7, errc::shape_mismatch, "tokens_per_rank sums to 6");
  std::vector<std::int64_t> three_ranks{3, 4, 0};
  require_rejected(layer, {ref.view(), three_ranks}, 7, errc::shape_mismatch, "3 entries for 2 ranks");
  require_rejected(layer, {matrix_view<float const>(ref.x.data(), 14, 4), ref.prob.tokens_per_rank}, 14,
                   errc::shape_mismatch, "x has 4 columns, hidden_size is 8");
  std::vector<float> out(6 * 8, specmoe::test::poison<float>());
  require_error([&] { layer.forward(ref.batch(), matrix_view<float>(out.data(), 6, 8)); }, errc::shape_mismatch,
                "out is [6, 8], x is [7, 8]");
  REQUIRE(specmoe::test::all_poison(out));
  std::vector<std::int64_t> ids(3);
  auto b = ref.batch();
  b.token_ids = ids;
  require_rejected(layer, b, 7, errc::shape_mismatch, "token_ids has 3 entries for 7 tokens");
}

TEST_CASE("invalid configs are rejected at construction, naming the field", "[layer][errors]") {
  reference_run<float> ref({small_config(), {3, 4}, 5});
  auto cfg = small_config();
  cfg.top_k = 9;
  require_error([&] { moe_layer<host_space> l(cfg, ref.layer.weights()); }, errc::invalid_argument,
                "top_k 9 is larger than num_experts 8");
  cfg = small_config();
  cfg.gate = {.kind = gate_kind::sigmoid_grouped_topk, .num_groups = 3, .topk_groups = 1};
  require_error([&] { moe_layer<host_space> l(cfg, ref.layer.weights()); }, errc::invalid_argument,
                "num_groups 3 must divide num_experts 8");
  cfg = small_config();
  cfg.hidden_size = 16;
  require_error([&] { moe_layer<host_space> l(cfg, ref.layer.weights()); }, errc::shape_mismatch,
                "router weight is [8, 8], the config needs [8, 16]");
}

TEST_CASE("NaN weights are rejected at construction", "[layer][errors]") {
  reference_run<float> ref({small_config(), {3, 4}, 6});
  auto bad = ref.layer;
  bad.expert_gate_storage()[1 * 4 * 8 + 2 * 8 + 5] = std::numeric_limits<float>::quiet_NaN();
  require_error([&] { moe_layer<host_space> l(small_config(), bad.weights()); }, errc::non_finite,
                "experts.gate[1][2][5] is not finite");
}

TEST_CASE("ranks whose configurations disagree are rejected, naming rank and field", "[layer][errors]") {
  reference_run<float> ref({small_config(3), {1, 1, 1}, 7});
  std::vector<moe_config> per_rank(3, small_config(3));
  per_rank[2].top_k = 3;
  require_error([&] { moe_layer<host_space> l(std::span<moe_config const>(per_rank), ref.layer.weights()); },
                errc::rank_mismatch, "rank 2 disagrees with rank 0 on the config: top_k 2 vs 3");
  per_rank = std::vector<moe_config>(2, small_config(3));
  require_error([&] { moe_layer<host_space> l(std::span<moe_config const>(per_rank), ref.layer.weights()); },
                errc::rank_mismatch, "2 rank configs given, rank 0 says num_ranks is 3");
}

namespace {
// A grouping with a bug: each rank sees itself as owner of expert 0.
struct self_centred_grouping {
  [[nodiscard]] expert_placement place(moe_config const& c, int rank) const {
    auto p = contiguous_blocks{}.place(c, rank);
    std::vector<int> owner(static_cast<std::size_t>(c.num_experts));
    for (int e = 0; e < c.num_experts; ++e) owner[static_cast<std::size_t>(e)] = p.owners(e)[0];
    owner[0] = rank;
    return expert_placement::from_owners(c.num_ranks, owner);
  }
};
}  // namespace

TEST_CASE("expert placements that disagree across ranks or leave an expert unowned are rejected", "[layer][errors]") {
  reference_run<float> ref({small_config(), {3, 4}, 8});
  require_error(
      [&] { moe_layer<host_space, no_prediction, stay, self_centred_grouping> l(small_config(), ref.layer.weights()); },
      errc::rank_mismatch, "rank 1 got a different expert placement than rank 0: expert 0 is held by ranks {0} vs {1}");
  require_error([&] { expert_placement p(2, {{0}, {}, {1}}); }, errc::unowned_expert, "expert 1 has no owner rank");
  auto wrong_size = explicit_placement(expert_placement::from_owners(2, std::vector<int>{0, 1, 0, 1}));
  require_error(
      [&] {
        moe_layer<host_space, no_prediction, stay, explicit_placement> l(small_config(), ref.layer.weights(),
                                                                         {.grouping = wrong_size});
      },
      errc::shape_mismatch, "covers 4 experts on 2 ranks, the layer has 8 on 2");
}

namespace {
struct lying_predictor {
  static constexpr bool predicts = true;
  void predict(prediction_request const& r, prediction& out) {
    out.reset(r.num_tokens, 1);
    out.experts[0] = r.config.num_experts;  // out of range
  }
  void observe(routing_observation const&) {}
};
struct off_the_map_placement {
  static constexpr bool moves_tokens = true;
  void plan(placement_request const& r, token_plan& plan) const { plan.rank.assign(static_cast<std::size_t>(r.num_tokens), r.config.num_ranks); }
};
}  // namespace

TEST_CASE("a policy that breaks its contract is reported, and the output stays untouched", "[layer][errors]") {
  reference_run<float> ref({small_config(), {3, 4}, 9});
  moe_layer<host_space, lying_predictor> l1(small_config(), ref.layer.weights());
  require_rejected(l1, ref.batch(), 7, errc::expert_out_of_range, "predicted expert 8 of token 0");
  moe_layer<host_space, no_prediction, off_the_map_placement> l2(small_config(), ref.layer.weights());
  require_rejected(l2, ref.batch(), 7, errc::invalid_argument, "token plan puts token 0 on rank 2, outside [0, 2)");
}
