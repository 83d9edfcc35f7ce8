// Trace profiling (trace/profile.hpp) on hand-made traces whose statistics are known exactly.
#include "support/testbed.hpp"

#include <specmoe/trace/profile.hpp>

#include <vector>

using namespace specmoe;

namespace {

// 3 layers, 4 experts, top-2, 4 positions with vocabulary ids 5, 7, 5, 5.
trace::routing_trace small_trace() {
  trace::routing_trace tr;
  tr.meta = {.model = "hand-made", .layers = 3, .experts = 4, .top_k = 2, .tokens = 4, .sequences = {{0, 4}}, .source = "test",
             .draft = std::nullopt};
  tr.topk_ids = {0, 1, 2, 3, 0, 2, 1, 0,   // layer 0
                 3, 2, 0, 1, 2, 3, 3, 1,   // layer 1
                 1, 0, 2, 3, 0, 1, 3, 2};  // layer 2
  tr.token_ids = {5, 7, 5, 5};
  trace::validate_trace(tr, "small");
  return tr;
}

}  // namespace

TEST_CASE("profile: token x expert counts, frequencies, loads and confidences of one layer", "[trace][profile]") {
  auto const tr = small_trace();
  auto const p = trace::profile_layer(tr, 0);
  CHECK(p.token_ids == std::vector<std::int32_t>{5, 7});
  CHECK(p.frequency == std::vector<std::int64_t>{3, 1});
  CHECK(p.row_offsets == std::vector<std::int64_t>{0, 3, 5});
  CHECK(p.expert == std::vector<std::int32_t>{0, 1, 2, 2, 3});
  CHECK(p.count == std::vector<std::int32_t>{3, 2, 1, 1, 1});
  CHECK(p.expert_load == std::vector<std::int64_t>{3, 2, 2, 1});
  CHECK(p.confidence(5, 0) == 1.0);
  CHECK(p.confidence(5, 1) == 2.0 / 3.0);
  CHECK(p.confidence(5, 3) == 0.0);
  CHECK(p.confidence(9, 0) == 0.0);  // never seen
  CHECK(p.hottest(5, 2) == std::vector<int>{0, 1});
  CHECK(p.hottest(7, 3) == std::vector<int>{2, 3});  // only two seen
  CHECK(p.hottest(9, 2).empty());
  auto const p1 = trace::profile_layer(tr, 1);
  CHECK(p1.hottest(5, 1) == std::vector<int>{3});  // 3 appears in all three occurrences of id 5
  CHECK(p1.confidence(5, 3) == 1.0);
}

TEST_CASE("profile: ranks per position and 2-gram device statistics", "[trace][profile]") {
  auto const tr = small_trace();
  std::vector<int> const halves{0, 0, 1, 1};  // experts 0, 1 on rank 0; 2, 3 on rank 1
  // layer 0: {0,1} -> 0; {2,3} -> 1; {0,2} -> tie, lower rank 0; {1,0} -> 0
  CHECK(trace::token_ranks(tr, 0, halves, 2) == std::vector<int>{0, 1, 0, 0});
  CHECK(trace::token_ranks(tr, 1, halves, 2) == std::vector<int>{1, 0, 1, 0});
  CHECK(trace::token_ranks(tr, 2, halves, 2) == std::vector<int>{0, 1, 0, 1});
  auto const ng = trace::device_ngrams(tr, {halves, halves, halves}, 2);
  REQUIRE(ng.size() == 3);
  CHECK(ng[0].counts.empty());
  CHECK(ng[1].counts.empty());
  auto const& c = ng[2].counts;
  REQUIRE(c.size() == 8);
  auto at = [&](int a, int b, int r) { return c[static_cast<std::size_t>((a * 2 + b) * 2 + r)]; };
  // (l0, l1) -> l2 per position: (0,1)->0, (1,0)->1, (0,1)->0, (0,0)->1
  CHECK(at(0, 1, 0) == 2);
  CHECK(at(1, 0, 1) == 1);
  CHECK(at(0, 0, 1) == 1);
  CHECK(at(1, 1, 0) + at(1, 1, 1) + at(0, 1, 1) + at(1, 0, 0) + at(0, 0, 0) == 0);
  CHECK(ng[2].lookback_confidence == 1.0);  // every 2-gram seen has one next rank
}

TEST_CASE("profile: bad requests are refused", "[trace][profile][errors]") {
  auto tr = small_trace();
  specmoe::test::require_error([&] { (void)trace::profile_layer(tr, 3); }, errc::invalid_argument, "layer 3 is outside [0, 3)");
  specmoe::test::require_error([&] { (void)trace::token_ranks(tr, 0, std::vector<int>{0, 1}, 2); }, errc::shape_mismatch,
                               "rank_of holds 2 experts");
  specmoe::test::require_error([&] { (void)trace::token_ranks(tr, 0, std::vector<int>{0, 0, 2, 1}, 2); }, errc::invalid_argument,
                               "rank_of maps expert 2 to rank 2");
  tr.token_ids.clear();
  specmoe::test::require_error([&] { (void)trace::profile_layer(tr, 0); }, errc::invalid_argument, "needs token_ids.npy");
}
