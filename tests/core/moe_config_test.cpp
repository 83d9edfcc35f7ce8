#include "support/testbed.hpp"

#include <specmoe/core/moe_config.hpp>

#include <sstream>

using namespace specmoe;
using specmoe::test::require_error;

TEST_CASE("published model configs are valid", "[core][config]") {
  for (auto const& c : {models::mixtral_8x7b(), models::qwen3_30b_a3b(4), models::deepseek_v3(8)}) {
    REQUIRE_NOTHROW(c.validate());
  }
  REQUIRE(models::deepseek_v3(8).experts_per_rank_ceil() == 32);
}

TEST_CASE("config validation names the field", "[core][config]") {
  auto c = models::mixtral_8x7b();
  c.hidden_size = 0;
  require_error([&] { c.validate(); }, errc::invalid_argument, "hidden_size must be positive, got 0");
  c = models::mixtral_8x7b();
  c.top_k = 0;
  require_error([&] { c.validate(); }, errc::invalid_argument, "top_k must be positive");
  c = models::deepseek_v3();
  c.gate.topk_groups = 9;
  require_error([&] { c.validate(); }, errc::invalid_argument, "topk_groups 9 must be in [1, num_groups 8]");
  c = models::deepseek_v3();
  c.gate.topk_groups = 1;  // 32 experts kept, top-8 fits
  REQUIRE_NOTHROW(c.validate());
  c.top_k = 33;
  require_error([&] { c.validate(); }, errc::invalid_argument, "top_k 33 exceeds the experts in the kept groups");
  c = models::mixtral_8x7b();
  c.gate.num_groups = 2;
  require_error([&] { c.validate(); }, errc::invalid_argument, "softmax_topk needs 1/1");
  c = models::mixtral_8x7b();
  c.num_shared_experts = 1;
  require_error([&] { c.validate(); }, errc::invalid_argument, "shared_ffn_size must be positive");
}

TEST_CASE("describe_difference names the first differing field", "[core][config]") {
  auto a = models::qwen3_30b_a3b(2), b = a;
  REQUIRE(describe_difference(a, b).empty());
  b.ffn_size = 512;
  REQUIRE(describe_difference(a, b) == "ffn_size 768 vs 512");
  b = a;
  b.gate.renormalize = false;
  REQUIRE(describe_difference(a, b).find("gate softmax_topk{renormalize=1") == 0);
  std::ostringstream os;
  os << models::deepseek_v3(8);
  REQUIRE(os.str().find("experts=256, top_k=8, gate=sigmoid_grouped_topk{renormalize=1, groups=8, topk_groups=4") !=
          std::string::npos);
}
