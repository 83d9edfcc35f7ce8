// The offload runtime on the GPU (issue 7): copies, residency table, offloaded stack == resident
// layers bit for bit, races, pinning, budget errors and shutdown. Host-compiled: the CUDA side is
// offload_gpu.cu (no Catch2 under nvcc, see tests/CMakeLists.txt).
#include "catch.hpp"
#include "offload/offload_gpu.hpp"

#include <specmoe/core/error.hpp>

#include <string>

namespace {

using namespace offload_test;

void require_gpu() {
  REQUIRE(has_gpu());  // a GPU test: no GPU is a failure
}

void require_clean(report const& r) {
  for (auto const& f : r.failures) UNSCOPED_INFO(f);
  REQUIRE(r.failures.empty());
}

char const* name(model_kind m) { return m == model_kind::mixtral_like ? "mixtral_like" : "deepseek_like"; }
char const* name(prediction p) { return p == prediction::right ? "right" : p == prediction::wrong ? "wrong" : "none"; }

}  // namespace

TEST_CASE("offload: prefetched experts arrive intact and the residency table points at their slots", "[offload][gpu]") {
  require_gpu();
  for (bool const registered : {false, true}) {
    CAPTURE(registered);
    SECTION("one expert") {
      auto const r = prefetch_copies(copy_pattern::single, registered, 1);
      require_clean(r);
      CHECK(r.speculative_copies == 1);
    }
    SECTION("adjacent experts into adjacent slots move as one copy") {
      auto const r = prefetch_copies(copy_pattern::coalesced, registered, 2);
      require_clean(r);
      CHECK(r.speculative_copies == 4);
      CHECK(r.copy_operations == 1);
    }
    SECTION("scattered experts move in one batch") {
      auto const r = prefetch_copies(copy_pattern::batched, registered, 3);
      require_clean(r);
      CHECK(r.speculative_copies == 4);
      CHECK(r.copy_operations == 4);
      CHECK(r.copy_calls >= 1);
      CHECK(r.copy_calls <= 4);
    }
    SECTION("evicted experts' table entries are null") {
      auto const r = prefetch_copies(copy_pattern::evicting, registered, 4);
      require_clean(r);
      CHECK(r.evictions > 0);
    }
  }
}

TEST_CASE("offload: the offloaded stack equals the all-resident layers bit for bit", "[offload][gpu][lossless]") {
  require_gpu();
  for (auto const model : {model_kind::mixtral_like, model_kind::deepseek_like}) {
    for (double const fraction : {0.25, 0.5, 1.0}) {
      for (auto const predict : {prediction::right, prediction::wrong, prediction::none}) {
        for (int const tokens : {2, 3, 5}) {
          stack_case c;
          c.model = model;
          c.cache_fraction = fraction;
          c.predict = predict;
          c.tokens = tokens;
          c.steps = 3;
          c.seed = static_cast<std::uint64_t>(tokens * 131 + static_cast<int>(fraction * 100) + static_cast<int>(predict) * 7);
          INFO(name(model) << " cache " << fraction << " predictions " << name(predict) << " tokens " << tokens);
          auto const r = stack_matches_resident(c);
          require_clean(r);
          CHECK(r.forwards == static_cast<long long>(c.steps) * (model == model_kind::mixtral_like ? 4 : 3));
          if (fraction == 0.25) CHECK(r.evictions > 0);
          if (predict == prediction::right) CHECK(r.speculative_copies > 0);
          if (predict == prediction::none) CHECK(r.speculative_copies == 0);
        }
      }
    }
  }
}

TEST_CASE("offload: every replacement policy keeps the stack lossless", "[offload][gpu][lossless]") {
  require_gpu();
  for (auto const policy : {policy_kind::lru, policy_kind::lfu, policy_kind::protect_predicted, policy_kind::frequency_warm}) {
    stack_case c;
    c.model = model_kind::deepseek_like;
    c.cache_fraction = 0.25;
    c.predict = prediction::right;
    c.tokens = 3;
    c.steps = 4;
    c.policy = policy;
    c.seed = 77 + static_cast<std::uint64_t>(policy);
    INFO("policy " << static_cast<int>(policy));
    require_clean(stack_matches_resident(c));
  }
}

TEST_CASE("offload: no expert is used before it arrives, with prefetches racing demand loads", "[offload][gpu][stress]") {
  require_gpu();
  auto const r = stress_racing_prefetches(2024, 40);
  require_clean(r);
  CHECK(r.forwards == 40 * 4);
  CHECK(r.speculative_copies > 0);
  CHECK(r.demand_copies > 0);
}

TEST_CASE("offload: a slot is never overwritten while a kernel reads it, nor while pinned", "[offload][gpu]") {
  require_gpu();
  require_clean(pinned_slots_are_not_overwritten(9));
}

TEST_CASE("offload: a budget smaller than one layer's experts is refused with a clear error", "[offload][gpu][errors]") {
  require_gpu();
  // 2 tokens x top-2 need 4 slots at once
  REQUIRE_THROWS_WITH(build_stack(3, 2), specmoe_test::contains("cannot hold one layer's 4 experts"));
  REQUIRE_THROWS_AS(build_stack(1, 1), specmoe::error);
  REQUIRE_NOTHROW(build_stack(4, 2));

  auto const more = acquire_beyond_budget(4, 2, 3);  // 5 experts at once for 4 slots... 3 of them new
  CHECK(more.threw);
  CHECK(more.invalid_argument);
  CHECK_THAT(more.message, specmoe_test::contains("pinned"));
  CHECK(more.first_pins == std::vector<int>{1, 1});
  CHECK(more.occupied <= 4);

  auto const too_many = acquire_beyond_budget(4, 0, 5);
  CHECK(too_many.threw);
  CHECK_THAT(too_many.message, specmoe_test::contains("5 distinct experts but the cache has 4 slots"));
  CHECK(too_many.occupied == 0);
}

TEST_CASE("offload: destroying the prefetcher with copies queued and in flight neither hangs nor crashes", "[offload][gpu]") {
  require_gpu();
  auto const r = shutdown_with_copies_in_flight(12, 256);
  require_clean(r);
  CHECK(r.speculative_copies == 3);
}
