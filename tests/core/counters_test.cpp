#include "catch.hpp"

#include <specmoe/core/counters.hpp>

using namespace specmoe;

TEST_CASE("traffic matrices ignore self traffic and sum per sender", "[core][counters]") {
  traffic_matrix m(3);
  m.add(0, 1, 10);
  m.add(0, 2, 5);
  m.add(1, 1, 99);  // never crosses a link
  m.add(2, 0, 7);
  REQUIRE(m.total() == 22);
  REQUIRE(m.sent_by(0) == 15);
  REQUIRE(m.sent_by(1) == 0);
  REQUIRE(m.max_sent() == 15);
  REQUIRE(m.bytes(2, 0) == 7);
}

TEST_CASE("layer counters derive rates and accumulate", "[core][counters]") {
  layer_counters a, b;
  a.activations = 10;
  a.local_activations = 4;
  a.dispatch_rows = 3;
  a.dispatch_rows_without_dedup = 6;
  a.dispatch = traffic_matrix(2);
  a.dispatch.add(0, 1, 8);
  a.tokens_per_expert = {1, 2};
  b = a;
  b.predicted_tokens = 5;
  b.rank_hits = 4;
  a.accumulate(b);
  REQUIRE(a.lar() == 0.4);
  REQUIRE(a.dedup_saving() == 0.5);
  REQUIRE(a.rank_hit_rate() == 0.8);
  REQUIRE(a.dispatch.total() == 16);
  REQUIRE(a.tokens_per_expert == std::vector<std::int64_t>{2, 4});
  traffic_matrix bad(3);
  REQUIRE_THROWS_AS(a.dispatch.accumulate(bad), specmoe::error);
}
