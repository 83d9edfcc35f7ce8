#include "support/testbed.hpp"

#include <specmoe/core/expert_placement.hpp>

using namespace specmoe;
using specmoe::test::require_error;

TEST_CASE("placement answers owners, local experts and local indices", "[core][placement]") {
  expert_placement p(3, {{2}, {0, 1}, {1}, {0}, {2, 0}});
  REQUIRE(p.num_experts() == 5);
  REQUIRE(p.replicated());
  REQUIRE(std::vector<int>(p.owners(4).begin(), p.owners(4).end()) == std::vector<int>{0, 2});
  REQUIRE(std::vector<int>(p.local_experts(0).begin(), p.local_experts(0).end()) == std::vector<int>{1, 3, 4});
  REQUIRE(std::vector<int>(p.local_experts(1).begin(), p.local_experts(1).end()) == std::vector<int>{1, 2});
  REQUIRE(p.local_index(0, 4) == 2);
  REQUIRE(p.local_index(1, 0) == -1);
  REQUIRE(p.owns(2, 0));
  REQUIRE_FALSE(p.owns(2, 1));
}

TEST_CASE("replicas: the token's own rank serves when it can, else owners alternate by token", "[core][placement]") {
  expert_placement p(4, {{1, 3}, {0}});
  REQUIRE(p.serving_rank(0, 3, 17) == 3);
  REQUIRE(p.serving_rank(0, 0, 0) == 1);
  REQUIRE(p.serving_rank(0, 0, 1) == 3);
  REQUIRE(p.serving_rank(0, 2, 5) == 3);
  REQUIRE(p.serving_rank(1, 2, 5) == 0);
}

TEST_CASE("placement errors name the expert", "[core][placement]") {
  require_error([] { expert_placement(2, {{0}, {}}); }, errc::unowned_expert, "expert 1 has no owner rank");
  require_error([] { expert_placement(2, {{0}, {2}}); }, errc::invalid_argument, "expert 1 is placed on rank 2");
  require_error([] { expert_placement(2, {{1, 1}}); }, errc::invalid_argument, "expert 0 lists rank 1 twice");
  expert_placement a(2, {{0}, {1}}), b(2, {{0}, {0, 1}});
  REQUIRE(a.describe_difference(b) == "expert 1 is held by ranks {1} vs {0,1}");
  REQUIRE(a.describe_difference(a).empty());
  REQUIRE(a == expert_placement::from_owners(2, std::vector<int>{0, 1}));
}
