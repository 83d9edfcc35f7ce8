// specmoe-sim --offload: SP-MoE's expert offloading replayed on a timeline (issue 7).
//
//   specmoe-sim --trace DIR --offload --cache-experts N [--profile PROFILE.json] [--gamma G]
//               [--predictor draft|lookahead|oracle|none] [--cutoff L|auto] [--replacement
//               lru|lfu|protect|protect_lfu|frequency|protect_frequency] [--lookahead-accuracy A] [--steps S] [--sweep]
//               [--expert-mib M] [--draft-mib D] [--stretch-profile] [--seed S]
// Without --profile the times are default_profile's for the trace's shape: --expert-mib (default
// DeepSeek-V2-Lite's 16.5 MiB experts), a dense part per layer of a quarter expert, a draft that
// streams --draft-mib per pass (default: the target's activated experts at 4 bits, a quantised
// self-draft), 55 GB/s link. N counts GPU slots over all layers.
// Prints one JSON object: prefetch_hit_rate, tpot_us, on_demand_tpot_us (no prefetch, LRU),
// on_demand_same_replacement_tpot_us (no prefetch, the run's replacement: the prefetch's own
// gain), cutoff_layer, lossless, and more; --sweep adds the simulated and modelled TPOT at every cutoff.
#pragma once

#include <specmoe/detail/cli.hpp>
#include <specmoe/offload/offload_sim.hpp>
#include <specmoe/prefetch/latency_model.hpp>
#include <specmoe/prefetch/offload_profile.hpp>
#include <specmoe/trace/routing_trace.hpp>

#include <cstdio>
#include <string>

namespace specmoe_sim {

inline int run_offload(specmoe::detail::cli::args& a) {
  using namespace specmoe;
  auto const dir = a.required("--trace");
  if (!a.has("--cache-experts")) a.fail("--offload needs --cache-experts N (GPU slots over all layers)");
  offload::offload_sim_options o;
  o.cache_experts = static_cast<int>(a.integer("--cache-experts", 0, 1, 1 << 24));
  auto const profile_path = a.text("--profile", "");
  int const gamma = static_cast<int>(a.integer("--gamma", 1, 1, 64));
  auto const pred = a.choice("--predictor", "draft", {"draft", "lookahead", "oracle", "none"});
  auto const cutoff = a.text("--cutoff", "auto");
  auto const repl = a.choice("--replacement", "frequency", {"lru", "lfu", "protect", "protect_lfu", "frequency", "protect_frequency"});
  o.lookahead_accuracy = a.real("--lookahead-accuracy", 0.7, 0.0, 1.0);
  o.max_steps = a.integer("--steps", 2000, 1, 1ll << 40);
  bool const sweep = a.has("--sweep");
  (void)a.has("--stretch-profile");
  double const expert_mib = a.real("--expert-mib", 16.5, 1e-6, 1e6);
  double const draft_mib = a.real("--draft-mib", 0.0, 0.0, 1e9);
  o.seed = static_cast<std::uint64_t>(a.integer("--seed", 1, 0, 1ll << 62));
  (void)a.has("--offload");
  a.finish();

  bool const stretch = a.has("--stretch-profile");
  auto const tr = trace::read_trace(dir);
  auto const& m = tr.meta;
  prefetch::offload_profile prof;
  if (!profile_path.empty()) {
    prof = prefetch::read_profile(profile_path);
    if (stretch && prof.layers != m.layers) {
      // a profile measured on a few layers of the model: its per-layer times repeat over the
      // trace's layers (the draft pass scales with the layer count)
      auto repeat = [&](std::vector<double> const& v) {
        std::vector<double> out(static_cast<std::size_t>(m.layers));
        for (int l = 0; l < m.layers; ++l) out[static_cast<std::size_t>(l)] = v[static_cast<std::size_t>(l % prof.layers)];
        return out;
      };
      prof.draft_pass_us *= static_cast<double>(m.layers) / prof.layers;
      prof.attn_us = repeat(prof.attn_us);
      prof.moe_us = repeat(prof.moe_us);
      prof.accuracy = repeat(prof.accuracy);
      prof.layers = m.layers;
    }
    SPECMOE_EXPECTS(!a.has("--gamma") || prof.gamma == gamma, errc::invalid_argument, profile_path, " was measured for gamma ",
                    prof.gamma, "; --gamma ", gamma, " disagrees (measure a profile for it)");
  } else {
    double const eb = expert_mib * 1024 * 1024;
    double const draft = draft_mib > 0 ? draft_mib * 1024 * 1024 : eb * m.layers * m.top_k / 4;
    prof = prefetch::default_profile(m.layers, m.experts, m.top_k, eb, eb / 4, draft, gamma);
    prof.model = m.model;
  }
  if (m.draft && (pred == "draft")) prof.accuracy = prefetch::draft_accuracy(tr, prof.gamma);
  if (cutoff != "auto") {
    char* end = nullptr;
    long const v = std::strtol(cutoff.c_str(), &end, 10);
    if (cutoff.empty() || *end || v < 0 || v > m.layers) a.fail("--cutoff wants auto or an integer in [0, " + std::to_string(m.layers) + "]");
    o.cutoff = static_cast<int>(v);
  }
  o.predictor = pred == "draft" ? offload::sim_predictor::draft
                : pred == "lookahead" ? offload::sim_predictor::lookahead
                : pred == "oracle" ? offload::sim_predictor::oracle
                                   : offload::sim_predictor::none;
  o.replacement = repl == "lru" ? offload::sim_replacement::lru
                  : repl == "lfu" ? offload::sim_replacement::lfu
                  : repl == "protect" ? offload::sim_replacement::protect
                  : repl == "protect_lfu" ? offload::sim_replacement::protect_lfu
                  : repl == "protect_frequency" ? offload::sim_replacement::protect_frequency
                                      : offload::sim_replacement::frequency;

  // the baseline: on demand with LRU; and the chosen replacement without prefetch, whose hit rate
  // is the latency model's resident share
  auto base_o = o;
  base_o.predictor = offload::sim_predictor::none;
  base_o.replacement = offload::sim_replacement::lru;
  base_o.check_steps = 0;
  auto const base = offload::simulate_offload(tr, prof, base_o);
  auto resident_o = base_o;
  resident_o.replacement = o.replacement;
  auto const same_policy = offload::simulate_offload(tr, prof, resident_o);
  o.resident_hit = same_policy.cache_hit_rate;
  auto const r = offload::simulate_offload(tr, prof, o);
  prefetch::model_options const mo{.cache_experts = o.cache_experts,
                                    .resident_hit = o.resident_hit,
                                    .protects = repl.rfind("protect", 0) == 0};
  auto const model = prefetch::estimate_step(prof, r.cutoff, mo);

  std::printf("{\"layers\": %d, \"experts\": %d, \"top_k\": %d, \"gamma\": %d, \"cache_experts\": %d, \"predictor\": \"%s\", "
              "\"replacement\": \"%s\", \"profile\": \"%s\", \"steps\": %lld, \"tokens\": %lld, "
              "\"prefetch_hit_rate\": %.4f, \"cache_hit_rate\": %.4f, \"prediction_recall\": %.4f, "
              "\"tpot_us\": %.1f, \"on_demand_tpot_us\": %.1f, \"speedup\": %.3f, \"on_demand_same_replacement_tpot_us\": %.1f, "
              "\"stall_us_per_step\": %.1f, "
              "\"model_tpot_us\": %.1f, \"cutoff_layer\": %d, \"speculative_copies\": %lld, \"demand_copies\": %lld, "
              "\"wasted_prefetches\": %lld, \"lossless\": %s",
              m.layers, m.experts, m.top_k, prof.gamma, o.cache_experts, pred.c_str(), repl.c_str(),
              profile_path.empty() ? "defaults" : profile_path.c_str(), static_cast<long long>(r.steps),
              static_cast<long long>(r.tokens), r.prefetch_hit_rate, r.cache_hit_rate, r.prediction_recall, r.tpot_us,
              base.tpot_us, base.tpot_us / r.tpot_us, same_policy.tpot_us, r.stall_us, model.tpot_us, r.cutoff,
              static_cast<long long>(r.speculative_copies), static_cast<long long>(r.demand_copies),
              static_cast<long long>(r.wasted_prefetches), r.lossless ? "true" : "false");
  if (!r.lossless) std::printf(", \"lossless_detail\": \"%s\"", r.lossless_detail.c_str());
  if (sweep && (o.predictor == offload::sim_predictor::draft || o.predictor == offload::sim_predictor::oracle)) {
    auto const choice = prefetch::choose_cutoff(prof, mo);
    double best = 1e300;
    int best_cutoff = 0;
    std::printf(", \"sweep\": [");
    for (int L = 0; L <= m.layers; ++L) {
      auto so = o;
      so.cutoff = L;
      so.check_steps = 0;
      auto const s = offload::simulate_offload(tr, prof, so);
      if (s.tpot_us < best) best = s.tpot_us, best_cutoff = L;
      std::printf("%s{\"cutoff\": %d, \"sim_tpot_us\": %.1f, \"model_tpot_us\": %.1f}", L ? ", " : "", L, s.tpot_us,
                  choice.curve[static_cast<std::size_t>(L)].tpot_us);
    }
    auto chosen_o = o;
    chosen_o.cutoff = choice.cutoff;
    chosen_o.check_steps = 0;
    double const chosen = offload::simulate_offload(tr, prof, chosen_o).tpot_us;
    std::printf("], \"best_cutoff\": %d, \"best_tpot_us\": %.1f, \"model_cutoff\": %d, \"model_cutoff_over_best\": %.4f", best_cutoff,
                best, choice.cutoff, chosen / best);
  }
  std::printf("}\n");
  return r.lossless ? 0 : 3;
}

}  // namespace specmoe_sim
