// The synthetic trace generator: valid, deterministic, and its knobs move the statistics they name.
#include "support/testbed.hpp"

#include <specmoe/synthetic/trace_generator.hpp>

#include <algorithm>
#include <filesystem>
#include <algorithm>
#include <map>
#include <random>
#include <set>
#include <vector>

using namespace specmoe;

namespace {

/// Mean over occurrences of frequent token ids of F1(occurrence's top-k, the id's k hottest experts).
double hottest_topk_f1(trace::routing_trace const& tr, int layer) {
  int const k = tr.meta.top_k;
  std::map<int, std::map<int, int>> counts;
  std::map<int, int> occurrences;
  for (std::int64_t t = 0; t < tr.meta.tokens; ++t) {
    int const id = tr.token_ids[static_cast<std::size_t>(t)];
    ++occurrences[id];
    for (int j = 0; j < k; ++j) ++counts[id][tr.id(layer, t, j)];
  }
  double f1 = 0;
  std::int64_t n = 0;
  for (std::int64_t t = 0; t < tr.meta.tokens; ++t) {
    int const id = tr.token_ids[static_cast<std::size_t>(t)];
    if (occurrences[id] < 20) continue;  // the hottest set of a rare id is noise
    std::vector<std::pair<int, int>> c(counts[id].begin(), counts[id].end());
    std::sort(c.begin(), c.end(), [](auto a, auto b) { return a.second != b.second ? a.second > b.second : a.first < b.first; });
    std::set<int> hot;
    for (int j = 0; j < k && j < static_cast<int>(c.size()); ++j) hot.insert(c[static_cast<std::size_t>(j)].first);
    int hits = 0;
    for (int j = 0; j < k; ++j) hits += hot.count(tr.id(layer, t, j)) ? 1 : 0;
    f1 += static_cast<double>(hits) / k;  // both sets hold k experts: precision = recall = F1
    ++n;
  }
  REQUIRE(n > 100);
  return f1 / static_cast<double>(n);
}

}  // namespace

TEST_CASE("trace generator: valid traces, the same for the same seed, different for another", "[synthetic][trace]") {
  synthetic::trace_params p;
  p.tokens = 3000;
  p.draft_layers = 2;
  auto const a = synthetic::generate_trace(p);
  auto const b = synthetic::generate_trace(p);
  CHECK(a.topk_ids == b.topk_ids);
  CHECK(a.topk_weights == b.topk_weights);
  CHECK(a.token_ids == b.token_ids);
  CHECK(a.draft_topk_ids == b.draft_topk_ids);
  p.seed = 2;
  CHECK(synthetic::generate_trace(p).topk_ids != a.topk_ids);
  // requests cover the tokens in order; weights in gate order sum to 1
  REQUIRE(!a.meta.sequences.empty());
  CHECK(a.meta.sequences.front().first == 0);
  CHECK(a.meta.sequences.back().second == 3000);
  for (std::size_t i = 0; i < a.topk_weights.size(); i += 8) {
    float s = 0;
    for (int j = 0; j < 8; ++j) s += a.topk_weights[i + static_cast<std::size_t>(j)];
    CHECK(std::abs(s - 1.0f) < 1e-5f);
    CHECK(a.topk_weights[i] >= a.topk_weights[i + 7]);
  }
  // written and read back unchanged
  auto const dir = std::filesystem::temp_directory_path() / ("specmoe_gen_" + std::to_string(std::random_device{}()));
  trace::write_trace(dir, a);
  auto const back = trace::read_trace(dir);
  std::filesystem::remove_all(dir);
  CHECK(back.topk_ids == a.topk_ids);
  CHECK(back.draft_topk_ids == a.draft_topk_ids);
}

TEST_CASE("trace generator: affinity sets the hottest-top-k F1, draft_agreement the draft's hit rate", "[synthetic][trace]") {
  synthetic::trace_params p{.layers = 2, .tokens = 20000, .vocab = 2000, .draft_layers = 2};
  auto const strong = synthetic::generate_trace(p);
  double const f1_strong = hottest_topk_f1(strong, 1);
  INFO("F1 at affinity 0.8: " << f1_strong);
  CHECK(f1_strong > 0.75);
  CHECK(f1_strong < 0.95);
  p.affinity = 0.2;
  double const f1_weak = hottest_topk_f1(synthetic::generate_trace(p), 1);
  INFO("F1 at affinity 0.2: " << f1_weak);
  CHECK(f1_weak < f1_strong - 0.3);
  // draft slot j equals the target's slot j about draft_agreement of the time (plus chance)
  std::int64_t same = 0, total = 0;
  for (int d = 0; d < 2; ++d) {
    for (std::int64_t t = 0; t < p.tokens; ++t) {
      for (int j = 0; j < 8; ++j) {
        same += strong.draft_topk_ids[static_cast<std::size_t>((d * p.tokens + t) * 8 + j)] == strong.id(d, t, j);
        ++total;
      }
    }
  }
  double const agreement = static_cast<double>(same) / static_cast<double>(total);
  INFO("draft agreement " << agreement);
  CHECK(agreement > 0.72);
  CHECK(agreement < 0.85);
}

TEST_CASE("trace generator: another sample_seed is a held-out sample of the same model", "[synthetic][trace]") {
  synthetic::trace_params p{.layers = 2, .tokens = 20000, .vocab = 500, .affinity = 0.9, .sample_seed = 1};
  auto const a = synthetic::generate_trace(p);
  p.sample_seed = 2;
  auto const b = synthetic::generate_trace(p);
  CHECK(a.token_ids != b.token_ids);
  // the same frequent id prefers the same experts in both samples
  auto hottest = [](trace::routing_trace const& tr, int id) {
    std::map<int, int> c;
    for (std::int64_t t = 0; t < tr.meta.tokens; ++t) {
      if (tr.token_ids[static_cast<std::size_t>(t)] != id) continue;
      for (int j = 0; j < tr.meta.top_k; ++j) ++c[tr.id(1, t, j)];
    }
    std::vector<std::pair<int, int>> v(c.begin(), c.end());
    std::sort(v.begin(), v.end(), [](auto x, auto y) { return x.second > y.second; });
    std::set<int> top;
    for (std::size_t j = 0; j < v.size() && j < 8; ++j) top.insert(v[j].first);
    return top;
  };
  int const id = a.token_ids[0];
  auto const ha = hottest(a, id), hb = hottest(b, id);
  int common = 0;
  for (int e : ha) common += hb.count(e) ? 1 : 0;
  CHECK(common >= 6);
}

TEST_CASE("trace generator: parameters outside their domain are refused", "[synthetic][trace][errors]") {
  synthetic::trace_params p;
  p.top_k = 65;
  specmoe::test::require_error([&] { (void)synthetic::generate_trace(p); }, errc::invalid_argument, "top_k (<= experts)");
  p = {};
  p.affinity = 1.5;
  specmoe::test::require_error([&] { (void)synthetic::generate_trace(p); }, errc::invalid_argument, "must lie in [0, 1]");
  p = {};
  p.min_request = 10;
  p.max_request = 5;
  specmoe::test::require_error([&] { (void)synthetic::generate_trace(p); }, errc::invalid_argument, "min <= max");
}
