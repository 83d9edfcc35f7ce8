// SP-MoE's profile file, latency model, cutoff choice and depth policies (prefetch/).
#include "support/testbed.hpp"

#include <specmoe/prefetch/depth_policies.hpp>
#include <specmoe/prefetch/latency_model.hpp>
#include <specmoe/prefetch/offload_profile.hpp>
#include <specmoe/synthetic/trace_generator.hpp>

#include <filesystem>
#include <fstream>
#include <random>

using namespace specmoe;
using specmoe::test::require_error;
namespace fs = std::filesystem;

namespace {

/// A DeepSeek-V2-Lite-like profile with random per-layer times, so no test relies on round numbers.
prefetch::offload_profile random_profile(std::mt19937_64& rng, int gamma = 1) {
  std::uniform_real_distribution<double> u(0.5, 1.5);
  auto p = prefetch::default_profile(26, 64, 6, 17.3e6, 17.3e6, 2.0e9, gamma);
  for (auto& t : p.attn_us) t *= u(rng);
  for (auto& t : p.moe_us) t *= u(rng);
  for (auto& a : p.accuracy) a = std::uniform_real_distribution<double>(0.3, 0.95)(rng);
  p.draft_pass_us *= u(rng);
  p.draft_readback_us = 30.0 * u(rng);
  p.device = "test";
  return p;
}

fs::path temp_file(std::string const& name) {
  return fs::temp_directory_path() / ("specmoe_" + name + "_" + std::to_string(std::random_device{}()) + ".json");
}

}  // namespace

TEST_CASE("offload profile: JSON round trip keeps every field", "[prefetch][profile]") {
  std::mt19937_64 rng(std::random_device{}());
  auto const p = random_profile(rng, 2);
  auto const path = temp_file("profile");
  prefetch::write_profile(path, p);
  auto const q = prefetch::read_profile(path);
  fs::remove(path);
  CHECK(q.layers == p.layers);
  CHECK(q.gamma == 2);
  CHECK(q.expert_bytes == p.expert_bytes);
  CHECK(q.draft_pass_us == p.draft_pass_us);
  CHECK(q.draft_readback_us == p.draft_readback_us);
  CHECK(q.attn_us == p.attn_us);
  CHECK(q.moe_us == p.moe_us);
  CHECK(q.accuracy == p.accuracy);
  CHECK(q.device == "test");
}

TEST_CASE("offload profile: bad files and fields get errors naming them", "[prefetch][profile]") {
  std::mt19937_64 rng(std::random_device{}());
  auto p = random_profile(rng);
  p.accuracy[3] = 1.5;
  require_error([&] { prefetch::validate_profile(p); }, errc::invalid_argument, "accuracy[3]");
  p = random_profile(rng);
  p.moe_us.pop_back();
  require_error([&] { prefetch::validate_profile(p); }, errc::invalid_argument, "moe_us has 25 entries");
  p = random_profile(rng);
  p.link_bytes_per_us = std::nan("");
  require_error([&] { prefetch::validate_profile(p); }, errc::invalid_argument, "link_bytes_per_us");
  p = random_profile(rng);
  p.draft_readback_us = -1;
  require_error([&] { prefetch::validate_profile(p); }, errc::invalid_argument, "draft_readback_us");
  auto const path = temp_file("bad_profile");
  {
    std::ofstream(path) << "{\"format\": \"specmoe-offload-profile/1\", \"layers\": 2}";
  }
  require_error([&] { (void)prefetch::read_profile(path); }, errc::invalid_argument, "experts");
  {
    std::ofstream(path) << "{\"format\": \"something-else\"}";
  }
  require_error([&] { (void)prefetch::read_profile(path); }, errc::io, "is not \"specmoe-offload-profile/1\"");
  fs::remove(path);
  require_error([&] { (void)prefetch::read_profile(path); }, errc::io, "cannot open");
}

TEST_CASE("latency model: no prefetch is the demand-only sum; perfect prediction with a free link hides the drafted positions' copies",
          "[prefetch][model]") {
  std::mt19937_64 rng(std::random_device{}());
  auto p = random_profile(rng);
  int const all = p.layers * p.experts;
  auto const on_demand = prefetch::estimate_step(p, 0, {all / 4, 0.0});
  double const u = prefetch::expected_distinct(p.experts, p.top_k, p.gamma + 1);
  double const expected = p.gamma * p.draft_pass_us + p.resident_compute_us() +
                          p.layers * (p.copy_latency_us + u * (p.expert_copy_us() - p.copy_latency_us));
  CHECK(on_demand.step_us == Approx(expected).epsilon(1e-9));
  CHECK(on_demand.demand == Approx(p.layers * u));
  CHECK(on_demand.prefetched == 0);
  // a very long draft window, exact predictions, room for everything: copies all land in time
  p.draft_pass_us = 1e9;
  std::fill(p.accuracy.begin(), p.accuracy.end(), 1.0);
  auto const hidden = prefetch::estimate_step(p, p.layers, {all, 0.0});
  // the gamma drafted inputs name gamma of the gamma + 1 verified positions: the experts only the
  // last position needs still load on demand, and nothing else does
  double const left = u - prefetch::expected_distinct(p.experts, p.top_k, p.gamma);
  REQUIRE(left > 0);
  CHECK(hidden.demand == Approx(p.layers * left));
  double const demand_only = p.gamma * p.draft_pass_us + p.resident_compute_us() +
                             p.layers * (p.copy_latency_us + left * (p.expert_copy_us() - p.copy_latency_us));
  CHECK(hidden.step_us >= demand_only * (1 - 1e-12));
  // (a demand load waits for the prefetch copy in flight: here the long window has none left)
  CHECK(hidden.step_us <= demand_only + 0.5 * p.layers * p.expert_copy_us());
  CHECK(hidden.step_us < prefetch::estimate_step(p, 0, {all, 0.0}).step_us);  // and faster than no prefetch
}

TEST_CASE("latency model: the curve is U-shaped when prefetches outgrow the cache", "[prefetch][model]") {
  std::mt19937_64 rng(std::random_device{}());
  auto p = random_profile(rng);
  p.draft_pass_us = 26 * 2 * p.expert_copy_us();  // a window that can hide about 2 layers' copies per pass ... and more
  std::fill(p.accuracy.begin(), p.accuracy.end(), 0.9);
  int const cache = 8 * 10;  // room for about 8 layers of prefetch
  auto const c = prefetch::choose_cutoff(p, {cache, 0.0});
  REQUIRE(c.curve.size() == 27u);
  CHECK(c.cutoff > 0);
  CHECK(c.cutoff < p.layers);
  CHECK(c.best().tpot_us < c.curve.front().tpot_us);
  CHECK(c.best().tpot_us < c.curve.back().tpot_us);
  for (auto const& e : c.curve) CHECK(e.tpot_us * 1.01 >= c.best().tpot_us);
  // the choice is the shallowest within 1% of the lowest; with no tolerance, the lowest itself
  double lowest = 1e300;
  for (auto const& e : c.curve) lowest = std::min(lowest, e.tpot_us);
  for (int L = 0; L < c.cutoff; ++L) CHECK(c.curve[static_cast<std::size_t>(L)].tpot_us > lowest * 1.01);
  auto const exact = prefetch::choose_cutoff(p, {cache, 0.0}, 0.0);
  CHECK(exact.best().tpot_us == lowest);
  CHECK(exact.cutoff >= c.cutoff);
  require_error([&] { (void)prefetch::choose_cutoff(p, {cache, 0.0}, -0.1); }, errc::invalid_argument, "tolerance");
}

TEST_CASE("latency model: prefetches past the room displace residents or are lost", "[prefetch][model]") {
  std::mt19937_64 rng(std::random_device{}());
  auto const p = random_profile(rng);
  double const u = prefetch::expected_distinct(p.experts, p.top_k, p.gamma + 1);
  int const cache = p.layers * p.experts / 2;
  double const h = std::uniform_real_distribution<double>(0.3, 0.7)(rng);
  double const room = std::uniform_real_distribution<double>(2.0, 20.0)(rng);
  double const q = std::uniform_real_distribution<double>(0.1, 0.9)(rng);
  // protected: each prefetch past the room costs q demand copies later, spread over the layers
  prefetch::model_options kept{.cache_experts = cache, .resident_hit = h, .protects = true, .room = room, .displaced_use = 0.0};
  auto with_q = kept;
  with_q.displaced_use = q;
  auto const free_of_cost = prefetch::estimate_step(p, p.layers, kept);
  auto const charged = prefetch::estimate_step(p, p.layers, with_q);
  REQUIRE(free_of_cost.prefetched > room);
  double const capacity = cache - u;
  CHECK(charged.demand - free_of_cost.demand == Approx((std::min(free_of_cost.prefetched, capacity) - room) * q));
  CHECK(charged.step_us > free_of_cost.step_us);
  // a demand load cannot overtake a batch the prefetcher has issued: bigger batches, longer waits
  auto batched = with_q;
  batched.inflight_copies = 4;
  CHECK(prefetch::estimate_step(p, p.layers, batched).step_us >= charged.step_us * (1 - 1e-12));
  // unprotected with no room: every prefetch is evicted by the next one, so the step is on demand
  prefetch::model_options lost{.cache_experts = cache, .resident_hit = h, .protects = false, .room = 0.0};
  auto const none = prefetch::estimate_step(p, 0, lost);
  auto const deep = prefetch::estimate_step(p, p.layers, lost);
  CHECK(deep.demand == Approx(none.demand));
  CHECK(deep.step_us == Approx(none.step_us + p.gamma * p.layers * p.draft_readback_us));  // only the read-backs
  // the default room is one layer's demand loads, u (1 - h): a prefetch depth within it costs nothing
  prefetch::model_options def{.cache_experts = cache, .resident_hit = h, .protects = true, .displaced_use = q};
  auto no_charge = def;
  no_charge.displaced_use = 0.0;
  auto const one = prefetch::estimate_step(p, 1, def);
  if (one.prefetched <= u * (1 - h)) CHECK(one.demand == Approx(prefetch::estimate_step(p, 1, no_charge).demand));
}

TEST_CASE("latency model: each layer read back below the cutoff costs the draft pass", "[prefetch][model]") {
  std::mt19937_64 rng(std::random_device{}());
  auto p = random_profile(rng);
  int const cache = p.layers * p.experts / 2;
  // everything resident: nothing crosses the link, so only the read-backs differ
  prefetch::model_options const o{.cache_experts = cache, .resident_hit = 1.0, .protects = true, .displaced_use = 0.0};
  int const cutoff = std::uniform_int_distribution<int>(1, p.layers)(rng);
  auto q = p;
  q.draft_readback_us = 0;
  auto const with = prefetch::estimate_step(p, cutoff, o);
  auto const without = prefetch::estimate_step(q, cutoff, o);
  REQUIRE(p.draft_readback_us > 0);
  CHECK(with.step_us - without.step_us == Approx(p.gamma * cutoff * p.draft_readback_us));
  CHECK(prefetch::estimate_step(p, 0, o).step_us == Approx(prefetch::estimate_step(q, 0, o).step_us));  // none at cutoff 0
  // a profile file without the field (written before it existed) reads as 0
  auto const path = temp_file("old_profile");
  prefetch::write_profile(path, p);
  std::string text;
  {
    std::ifstream in(path);
    text.assign(std::istreambuf_iterator<char>(in), {});
  }
  auto const at = text.find("\"draft_readback_us\"");
  REQUIRE(at != std::string::npos);
  auto const end = text.find(',', at);
  text.erase(at, end - at + 1);
  {
    std::ofstream(path) << text;
  }
  CHECK(prefetch::read_profile(path).draft_readback_us == 0.0);
  fs::remove(path);
}

TEST_CASE("latency model: tokens per step and distinct experts", "[prefetch][model]") {
  CHECK(prefetch::tokens_per_step(1, 0.5) == Approx(1.5));
  CHECK(prefetch::tokens_per_step(3, 1.0) == Approx(4.0));
  CHECK(prefetch::expected_distinct(8, 2, 1) == Approx(2.0));
  CHECK(prefetch::expected_distinct(8, 2, 2) == Approx(8 * (1 - 0.75 * 0.75)));
  std::mt19937_64 rng(std::random_device{}());
  auto const p = random_profile(rng);
  require_error([&] { (void)prefetch::estimate_step(p, 27, {100, -1}); }, errc::invalid_argument, "cutoff 27");
  require_error([&] { (void)prefetch::estimate_step(p, 0, {5, -1}); }, errc::invalid_argument, "cannot hold one layer");
}

TEST_CASE("draft accuracy from a trace follows the draft's agreement", "[prefetch][model]") {
  synthetic::trace_params tp;
  tp.layers = 4;
  tp.experts = 32;
  tp.top_k = 4;
  tp.tokens = 6000;
  tp.draft_layers = 4;
  tp.seed = std::random_device{}();
  tp.draft_agreement = 1.0;
  auto const exact = prefetch::draft_accuracy(synthetic::generate_trace(tp), 3);
  tp.draft_agreement = 0.5;
  auto const half = prefetch::draft_accuracy(synthetic::generate_trace(tp), 3);
  for (int l = 0; l < 4; ++l) {
    // agreeing drafts name the experts of 3 of the 4 verified tokens
    CHECK(exact[static_cast<std::size_t>(l)] > 0.7);
    CHECK(exact[static_cast<std::size_t>(l)] < 1.0);
    CHECK(half[static_cast<std::size_t>(l)] < exact[static_cast<std::size_t>(l)] - 0.15);
  }
  tp.draft_layers = 0;
  require_error([&] { (void)prefetch::draft_accuracy(synthetic::generate_trace(tp), 1); }, errc::invalid_argument, "no draft routing");
}

TEST_CASE("depth policies: which layers may be fetched from where", "[prefetch][depth]") {
  prefetch::on_demand const none;
  prefetch::fixed_depth const two(2);
  prefetch::cutoff_layer const cut(5);
  CHECK_FALSE(prefetch::may_prefetch(none, -1, 0));
  CHECK(prefetch::may_prefetch(two, -1, 1));
  CHECK_FALSE(prefetch::may_prefetch(two, -1, 2));
  CHECK(prefetch::may_prefetch(two, 3, 5));
  CHECK_FALSE(prefetch::may_prefetch(two, 3, 3));
  CHECK(prefetch::may_prefetch(cut, -1, 4));
  CHECK_FALSE(prefetch::may_prefetch(cut, -1, 5));
  CHECK(prefetch::may_prefetch(cut, 2, 4));
  CHECK_FALSE(prefetch::may_prefetch(cut, 4, 5));
  CHECK_FALSE(prefetch::may_prefetch(all_resident{}, -1, 0));
  require_error([] { prefetch::fixed_depth bad(-1); }, errc::invalid_argument, "layers_ahead");
}
