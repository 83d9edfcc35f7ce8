// Speculative MoE plans: made from a trace under the solver's constraints, written and read back
// unchanged, turned into layer placements, and malformed plan files rejected.
#include "support/testbed.hpp"

#include <specmoe/grouping/speculative_plan.hpp>
#include <specmoe/synthetic/trace_generator.hpp>

#include <filesystem>
#include <fstream>
#include <random>
#include <string>

using namespace specmoe;
namespace fs = std::filesystem;

namespace {

trace::routing_trace small_synthetic() {
  return synthetic::generate_trace({.layers = 4, .experts = 32, .top_k = 4, .tokens = 3000, .vocab = 1500, .affinity = 0.9});
}

fs::path temp_file(std::string const& name) {
  return fs::temp_directory_path() / ("specmoe_" + name + "_" + std::to_string(std::random_device{}()) + ".json");
}

}  // namespace

TEST_CASE("plan: every layer solved, written and read back unchanged", "[grouping][plan]") {
  auto const tr = small_synthetic();
  grouping::co_cluster_options o;
  o.ranks = 4;
  auto const plan = grouping::make_plan(tr, o);
  auto const base = grouping::make_plan(tr, o, grouping::plan_solver::contiguous);
  REQUIRE(plan.per_layer.size() == 4);
  for (int l = 0; l < 4; ++l) {
    auto const& L = plan.per_layer[static_cast<std::size_t>(l)];
    INFO("layer " << l);
    CHECK(L.remote_share <= base.per_layer[static_cast<std::size_t>(l)].remote_share);
    CHECK(L.ngram_rank.empty() == (l < 2));
    // T looks up what the solver assigned
    auto const [rank, conf] = L.token(L.token_ids[3]);
    CHECK(rank == L.token_rank[3]);
    CHECK(conf == L.token_confidence[3]);
    CHECK(L.token(-5).first == -1);
  }
  CHECK(plan.per_layer[3].lookback_confidence > 0.0);
  auto const path = temp_file("plan");
  grouping::write_plan(path, plan);
  auto const back = grouping::read_plan(path);
  fs::remove(path);
  CHECK(back.layers == plan.layers);
  CHECK(back.ranks == 4);
  CHECK(back.solver == "alternating");
  for (std::size_t l = 0; l < 4; ++l) {
    auto const& a = plan.per_layer[l];
    auto const& b = back.per_layer[l];
    CHECK(a.expert_rank == b.expert_rank);
    CHECK(a.token_ids == b.token_ids);
    CHECK(a.token_rank == b.token_rank);
    CHECK(a.token_confidence == b.token_confidence);
    CHECK(a.ngram_rank == b.ngram_rank);
    CHECK(a.ngram_confidence == b.ngram_confidence);
    CHECK(a.remote_share == b.remote_share);
  }
  // the placements the layers take
  auto const placement = grouping::plan_placements(plan);
  moe_config cfg{.hidden_size = 8, .ffn_size = 8, .num_experts = 32, .top_k = 4, .num_ranks = 4};
  cfg.layer = 2;
  auto const p2 = placement.place(cfg, 0);
  for (int e = 0; e < 32; ++e) CHECK(p2.owners(e)[0] == plan.per_layer[2].expert_rank[static_cast<std::size_t>(e)]);
}

TEST_CASE("plan: hot-expert replicas stay within their slots, round trip and reach the placements", "[grouping][plan]") {
  auto const tr = small_synthetic();
  grouping::co_cluster_options o;
  o.ranks = 4;
  o.replicas_per_rank = 2;
  for (auto const solver : {grouping::plan_solver::alternating, grouping::plan_solver::load_balanced}) {
    auto const plan = grouping::make_plan(tr, o, solver);
    INFO("solver " << grouping::to_string(solver));
    for (auto const& L : plan.per_layer) {
      CHECK(!L.replicas.empty());
      CHECK(L.replicas.size() <= 8);  // 2 a rank
    }
    auto const path = temp_file("replicas");
    grouping::write_plan(path, plan);
    auto const back = grouping::read_plan(path);
    fs::remove(path);
    CHECK(back.replicas_per_rank == 2);
    for (std::size_t l = 0; l < 4; ++l) CHECK(back.per_layer[l].replicas == plan.per_layer[l].replicas);
    auto const placement = grouping::plan_placements(plan);
    moe_config cfg{.hidden_size = 8, .ffn_size = 8, .num_experts = 32, .top_k = 4, .num_ranks = 4};
    cfg.layer = 1;
    auto const p1 = placement.place(cfg, 0);
    auto const [e, r] = plan.per_layer[1].replicas.front();
    CHECK(p1.owns(r, e));
    CHECK(p1.owners(e).size() >= 2);
  }
  // a plan with more replicas on a rank than it allows, or a replica on its primary rank, is refused
  auto plan = grouping::make_plan(tr, o);
  auto bad = plan;
  bad.replicas_per_rank = 0;
  specmoe::test::require_error([&] { grouping::validate_plan(bad, "plan.json"); }, errc::io, "more than replicas_per_rank = 0");
  bad = plan;
  auto const e = bad.per_layer[0].replicas.front().first;
  bad.per_layer[0].replicas.front().second = bad.per_layer[0].expert_rank[static_cast<std::size_t>(e)];
  specmoe::test::require_error([&] { grouping::validate_plan(bad, "plan.json"); }, errc::io, "on its primary rank");
}

TEST_CASE("plan: malformed plan files are rejected naming the problem", "[grouping][plan][errors]") {
  auto const tr = small_synthetic();
  grouping::co_cluster_options o;
  o.ranks = 4;
  auto const plan = grouping::make_plan(tr, o);
  // validate_plan is what read_plan runs after parsing a file
  auto rejected = [&](std::string const& name, auto&& spoil, std::string const& needle) {
    auto p = plan;
    spoil(p);
    INFO("case " << name);
    specmoe::test::require_error([&] { grouping::validate_plan(p, "plan.json"); }, errc::io, needle);
  };
  rejected("per_rank", [](auto& p) {
    auto& r = p.per_layer[1].expert_rank;
    r[0] = (r[0] + 1) % 4;  // one rank now holds 9 experts, another 7
  }, "layer 1 puts");
  rejected("rank_range", [](auto& p) { p.per_layer[0].expert_rank[5] = 4; }, "layer 0 puts expert 5 on rank 4");
  rejected("unsorted", [](auto& p) { std::swap(p.per_layer[2].token_ids[0], p.per_layer[2].token_ids[1]); }, "strictly ascending");
  rejected("confidence", [](auto& p) { p.per_layer[2].token_confidence[0] = 1.5f; }, "out of range");
  rejected("ngram", [](auto& p) { p.per_layer[3].ngram_rank.pop_back(); }, "2-gram table");
  rejected("layers", [](auto& p) { p.per_layer.pop_back(); }, "holds 3 layers, says 4");
  // through the file reader: wrong format, missing file, bad JSON
  auto const path = temp_file("format");
  grouping::write_plan(path, plan);
  std::ifstream in(path);
  std::string text((std::istreambuf_iterator<char>(in)), {});
  in.close();
  auto const at = text.find("specmoe-plan/1");
  REQUIRE(at != std::string::npos);
  text.replace(at, 14, "specmoe-plan/2");
  std::ofstream(path, std::ios::trunc) << text;
  specmoe::test::require_error([&] { (void)grouping::read_plan(path); }, errc::io, "format \"specmoe-plan/2\"");
  std::ofstream(path, std::ios::trunc) << "{\"format\": \"specmoe-plan/1\", \"layers\": ";
  specmoe::test::require_error([&] { (void)grouping::read_plan(path); }, errc::invalid_argument, "invalid JSON");
  fs::remove(path);
  specmoe::test::require_error([&] { (void)grouping::read_plan(path); }, errc::io, "cannot open");
}
