// specmoe-plan: Speculative MoE's offline planning. Reads a routing trace (with token ids), solves
// every layer's balanced token-expert co-clustering for D ranks, writes the plan as JSON and prints
// a summary (remote activation share against the contiguous baseline, per solver, and the time).
//
//   specmoe-plan --trace DIR --ranks D --out PLAN.json [--solver alternating|cem|contiguous|load_balanced]
//                [--replicas-per-rank R] [--theta T] [--expert-slack S] [--seed S]
// load_balanced is the EPLB-style baseline (experts spread by load only); --replicas-per-rank adds
// copies of the experts that relieve the busiest ranks most (any solver). --expert-slack caps each
// rank's activation load at (1 + S) x the mean (default 0.05, or 0.15 with replicas).
#include <specmoe/detail/cli.hpp>
#include <specmoe/grouping/speculative_plan.hpp>
#include <specmoe/trace/routing_trace.hpp>

#include <chrono>
#include <cstdio>
#include <exception>

int main(int argc, char** argv) {
  using namespace specmoe;
  detail::cli::args a(argc, argv, "specmoe-plan",
                      "specmoe-plan --trace DIR --ranks D --out PLAN.json [--solver alternating|cem|contiguous|load_balanced] "
                      "[--replicas-per-rank R] [--theta T] [--expert-slack S] [--seed S]");
  try {
    auto const dir = a.required("--trace");
    auto const out = a.required("--out");
    grouping::co_cluster_options o;
    o.ranks = static_cast<int>(a.integer("--ranks", 0, 1, 4096));
    if (!a.has("--ranks")) a.fail("--ranks is required");
    o.theta = a.real("--theta", o.theta, 0, 1);
    if (a.has("--expert-slack")) o.expert_slack = a.real("--expert-slack", 0, 0, 10);
    o.seed = static_cast<std::uint64_t>(a.integer("--seed", 1, 0, 1ll << 62));
    auto const name = a.choice("--solver", "alternating", {"alternating", "cem", "contiguous", "load_balanced"});
    o.replicas_per_rank = static_cast<int>(a.integer("--replicas-per-rank", 0, 0, 1024));
    a.finish();
    auto const solver = name == "cem"             ? grouping::plan_solver::cem
                        : name == "contiguous"    ? grouping::plan_solver::contiguous
                        : name == "load_balanced" ? grouping::plan_solver::load_balanced
                                                  : grouping::plan_solver::alternating;
    auto const t0 = std::chrono::steady_clock::now();
    auto const tr = trace::read_trace(dir);
    auto const t1 = std::chrono::steady_clock::now();
    auto const plan = grouping::make_plan(tr, o, solver);
    auto const t2 = std::chrono::steady_clock::now();
    grouping::write_plan(out, plan);
    double remote = 0, imbalance = 0, load = 0, lookback = 0;
    for (auto const& L : plan.per_layer) {
      remote += L.remote_share / plan.layers;
      imbalance = std::max(imbalance, L.token_imbalance);
      load = std::max(load, L.expert_load_imbalance);
      lookback += L.lookback_confidence / std::max(1, plan.layers - 2);
    }
    auto secs = [](auto d) { return std::chrono::duration<double>(d).count(); };
    std::printf(
        "{\"plan\": \"%s\", \"solver\": \"%s\", \"layers\": %d, \"experts\": %d, \"ranks\": %d, \"tokens\": %lld, "
        "\"mean_remote_share\": %.4f, \"max_token_imbalance\": %.4f, \"max_expert_load_imbalance\": %.4f, "
        "\"mean_lookback_confidence\": %.4f, \"read_seconds\": %.2f, \"solve_seconds\": %.2f}\n",
        out.c_str(), plan.solver.c_str(), plan.layers, plan.experts, plan.ranks, static_cast<long long>(tr.meta.tokens), remote, imbalance,
        load, lookback, secs(t1 - t0), secs(t2 - t1));
  } catch (std::exception const& e) {
    std::fprintf(stderr, "specmoe-plan: %s\n", e.what());
    return 1;
  }
  return 0;
}
