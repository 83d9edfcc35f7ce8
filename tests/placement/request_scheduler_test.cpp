// The data-parallel-attention request scheduler (placement/request_scheduler.hpp).
#include "support/testbed.hpp"

#include <specmoe/grouping/speculative_plan.hpp>
#include <specmoe/placement/request_scheduler.hpp>
#include <specmoe/synthetic/trace_generator.hpp>

#include <random>

using namespace specmoe;
using specmoe::test::require_error;

namespace {

/// For each request, the rank that would have served most of its activations (hindsight).
std::vector<int> hindsight_best(trace::routing_trace const& tr, grouping::speculative_plan const& plan) {
  std::vector<int> best;
  for (auto const& [b, e] : tr.meta.sequences) {
    std::vector<std::int64_t> per(static_cast<std::size_t>(plan.ranks), 0);
    for (int l = 0; l < tr.meta.layers; ++l) {
      for (auto t = b; t < e; ++t) {
        for (int j = 0; j < tr.meta.top_k; ++j) ++per[static_cast<std::size_t>(plan.per_layer[static_cast<std::size_t>(l)].expert_rank[static_cast<std::size_t>(tr.id(l, t, j))])];
      }
    }
    best.push_back(static_cast<int>(std::max_element(per.begin(), per.end()) - per.begin()));
  }
  return best;
}

/// LAR of the trace's requests when request i runs on rank_of[i]: activations whose expert the plan
/// puts on that rank.
double lar(trace::routing_trace const& tr, grouping::speculative_plan const& plan, std::vector<int> const& rank_of) {
  std::int64_t local = 0, all = 0;
  for (std::size_t q = 0; q < tr.meta.sequences.size(); ++q) {
    auto const [b, e] = tr.meta.sequences[q];
    for (int l = 0; l < tr.meta.layers; ++l) {
      for (auto t = b; t < e; ++t) {
        for (int j = 0; j < tr.meta.top_k; ++j) {
          ++all;
          local += plan.per_layer[static_cast<std::size_t>(l)].expert_rank[static_cast<std::size_t>(tr.id(l, t, j))] == rank_of[q];
        }
      }
    }
  }
  return static_cast<double>(local) / static_cast<double>(all);
}

}  // namespace

TEST_CASE("request scheduler: affinity placement raises LAR over round robin and stays balanced", "[placement][scheduler]") {
  auto const seed = std::random_device{}();
  synthetic::trace_params tp;
  tp.layers = 4;
  tp.experts = 32;
  tp.top_k = 4;
  tp.tokens = 12000;
  tp.requests = 48;
  tp.min_request = 64;
  tp.max_request = 400;
  tp.topics = 4;
  tp.topic_share = 0.95;
  tp.topic_affinity = 0.9;
  tp.seed = seed;
  tp.sample_seed = 1;
  auto const train = synthetic::generate_trace(tp);
  tp.sample_seed = 2;
  auto const test = synthetic::generate_trace(tp);
  grouping::co_cluster_options o;
  o.ranks = 4;
  o.seed = seed;
  auto const plan = std::make_shared<grouping::speculative_plan const>(grouping::make_plan(train, o));
  request_scheduler sched(plan, {.balance_tokens = false, .slack = 1});
  std::vector<int> chosen, round_robin;
  for (std::size_t q = 0; q < test.meta.sequences.size(); ++q) {
    auto const [b, e] = test.meta.sequences[q];
    chosen.push_back(sched.assign(std::span(test.token_ids).subspan(static_cast<std::size_t>(b), static_cast<std::size_t>(e - b))));
    round_robin.push_back(static_cast<int>(q % 4));
    auto const ld = sched.load();
    REQUIRE(*std::max_element(ld.begin(), ld.end()) - *std::min_element(ld.begin(), ld.end()) <= 2);
  }
  double const ours = lar(test, *plan, chosen), rr = lar(test, *plan, round_robin);
  double const bound = lar(test, *plan, hindsight_best(test, *plan));  // unbalanced, with hindsight
  INFO("LAR scheduler " << ours << " round robin " << rr << " hindsight " << bound);
  CHECK(ours > rr + 0.005);
  CHECK(ours - rr > 0.2 * (bound - rr));  // a good share of what hindsight (unbalanced) could gain
  // every rank got work
  for (int r = 0; r < 4; ++r) CHECK(std::count(chosen.begin(), chosen.end(), r) >= 10);
}

TEST_CASE("request scheduler: token balancing, finish, and bad input", "[placement][scheduler]") {
  auto plan = std::make_shared<grouping::speculative_plan>();
  plan->ranks = 2;
  plan->layers = 1;
  plan->experts = 2;
  grouping::plan_layer L;
  L.expert_rank = {0, 1};
  L.token_ids = {5, 9};
  L.token_rank = {1, 0};
  L.token_confidence = {0.9f, 0.6f};
  plan->per_layer.push_back(L);
  request_scheduler s(plan, {.balance_tokens = true, .slack = 3});
  std::vector<std::int32_t> const fives{5, 5, 5};
  auto const a = s.affinity(fives);
  CHECK(a[0] == 0.0);
  CHECK(a[1] == Approx(3 * 0.9));
  CHECK(s.assign(fives) == 1);  // affinity to rank 1
  CHECK(s.assign(fives) == 1);  // 3 tokens above rank 0: within the slack of 3
  CHECK(s.assign(fives) == 0);  // 6 above: masked, whatever the affinity
  CHECK(s.load()[0] == 3);
  CHECK(s.load()[1] == 6);
  s.finish(0, 3);
  CHECK(s.load()[0] == 0);
  require_error([&] { s.finish(0, 1); }, errc::invalid_argument, "holds load 0");
  require_error([&] { s.finish(2); }, errc::invalid_argument, "rank 2 outside");
  require_error([&] { (void)s.assign({}); }, errc::invalid_argument, "no tokens");
  require_error([] { request_scheduler bad(nullptr); }, errc::invalid_argument, "needs a plan");
}
