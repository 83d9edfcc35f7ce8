// specmoe/bench/policy_bench.hpp: Google Benchmark bodies that time one policy alone on generated
// routing, with the policy's quality (hit rates, local activation rate, bytes) as counters.
//
// Needs Google Benchmark (<benchmark/benchmark.h>); link benchmark::benchmark. Use:
//
//   benchmark::RegisterBenchmark("my_predictor", [](benchmark::State& s) {
//     specmoe::bench::time_predictor(s, my_predictor{}, specmoe::models::qwen3_30b_a3b());
//   })->Args({128, 8});   // tokens per rank, ranks
//
// Every body reads range(0) = tokens per rank and range(1) = ranks, and reports `time_per_token`.
#pragma once

#include <specmoe/comm/concepts.hpp>
#include <specmoe/core/dispatch_layout.hpp>
#include <specmoe/grouping/concepts.hpp>
#include <specmoe/placement/concepts.hpp>
#include <specmoe/router/concepts.hpp>
#include <specmoe/synthetic/routing_workload.hpp>

#include <benchmark/benchmark.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace specmoe::bench {

/// Batches a body cycles through, so a learning predictor is scored on batches it has not seen.
inline constexpr int num_batches = 8;

/// `base` with the rank count of range(1), and generated batches of range(0) tokens per rank.
inline std::vector<synthetic::routing_workload> workloads(benchmark::State const& state, moe_config base,
                                                          synthetic::workload_params params = {}) {
  base.num_ranks = static_cast<int>(state.range(1));
  params.tokens_per_rank = state.range(0);
  std::vector<synthetic::routing_workload> out;
  for (int b = 0; b < num_batches; ++b) {
    params.seed = 1000 + static_cast<std::uint64_t>(b);
    out.push_back(synthetic::make_workload(base, params));
  }
  return out;
}

/// Tokens processed per iteration, reported as nanoseconds per token.
inline void report_time_per_token(benchmark::State& state, std::int64_t tokens) {
  state.counters["time_per_token"] = benchmark::Counter(static_cast<double>(tokens),
                                                      benchmark::Counter::kIsIterationInvariantRate |
                                                          benchmark::Counter::kInvert);
}

/// Activations of `w` whose expert `placement` serves on the rank in `rank_of_token`.
inline std::int64_t local_activations(synthetic::routing_workload const& w, expert_placement const& placement,
                                      std::vector<int> const& rank_of_token) {
  std::int64_t local = 0;
  for (std::int64_t t = 0; t < w.num_tokens(); ++t) {
    for (int j = 0; j < w.actual.top_k; ++j) local += placement.owns(rank_of_token[static_cast<std::size_t>(t)], w.actual.id(t, j));
  }
  return local;
}

/// @brief Times `predict` + `observe` of a RouterPredictor; counters: rank_hit_rate (the predicted
/// rank owns the most of the token's experts), expert_recall, time_per_token.
template <router_predictor P, expert_grouping G = contiguous_blocks>
void time_predictor(benchmark::State& state, P predictor, moe_config base, synthetic::workload_params params = {},
                    G grouping = {}) {
  auto const batches = workloads(state, base, params);
  auto const& cfg = batches[0].config;
  auto const placement = grouping.place(cfg, 0);
  prediction guess;
  std::int64_t iteration = 0;
  auto step = [&](synthetic::routing_workload const& w) {
    auto const n = w.num_tokens();
    auto const x = w.activation_view();
    predictor.predict(prediction_request{cfg, n, w.home_rank, w.token_ids, x, placement}, guess);
    predictor.observe(routing_observation{cfg, w.home_rank, w.home_rank, w.token_ids, w.actual.view(), placement, &guess});
  };
  for (auto _ : state) {
    step(batches[static_cast<std::size_t>(iteration++ % num_batches)]);
    benchmark::DoNotOptimize(guess.rank.data());
  }
  // Score, untimed, one more pass over every batch, continuing the cycle (a learning predictor
  // keeps what it learned; a replaying one stays in step).
  std::int64_t tokens = 0, predicted = 0, rank_hits = 0, slots = 0, expert_hits = 0;
  std::vector<int> owned(static_cast<std::size_t>(cfg.num_ranks));
  for (int i = 0; i < num_batches; ++i) {
    auto const& w = batches[static_cast<std::size_t>((iteration + i) % num_batches)];
    auto const n = w.num_tokens();
    auto const x = w.activation_view();
    predictor.predict(prediction_request{cfg, n, w.home_rank, w.token_ids, x, placement}, guess);
    validate_prediction(guess, n, cfg.num_experts, cfg.num_ranks);
    derive_predicted_ranks(guess, placement, w.home_rank);
    for (std::int64_t t = 0; t < n; ++t) {
      std::fill(owned.begin(), owned.end(), 0);
      for (int j = 0; j < cfg.top_k; ++j) {
        auto const e = w.actual.id(t, j);
        for (int o : placement.owners(e)) ++owned[static_cast<std::size_t>(o)];
        for (int p = 0; p < guess.width; ++p) expert_hits += guess.expert(t, p) == e;
      }
      slots += guess.width > 0 ? cfg.top_k : 0;
      if (auto const r = guess.rank[static_cast<std::size_t>(t)]; r >= 0) {
        ++predicted;
        rank_hits += owned[static_cast<std::size_t>(r)] == *std::max_element(owned.begin(), owned.end());
      }
    }
    tokens += n;
    predictor.observe(routing_observation{cfg, w.home_rank, w.home_rank, w.token_ids, w.actual.view(), placement, &guess});
  }
  report_time_per_token(state, batches[0].num_tokens());
  state.counters["rank_hit_rate"] = predicted ? static_cast<double>(rank_hits) / static_cast<double>(predicted) : 0.0;
  state.counters["expert_recall"] = slots ? static_cast<double>(expert_hits) / static_cast<double>(slots) : 0.0;
  state.counters["predicted_share"] = tokens ? static_cast<double>(predicted) / static_cast<double>(tokens) : 0.0;
}

/// @brief Times a TokenPlacement's `plan`, given the guesses of `predictor` (made untimed);
/// counters: lar (local activations at the planned ranks), moved_share, load_imbalance (max
/// tokens on a rank / mean), time_per_token.
template <token_placement Pl, router_predictor P, expert_grouping G = contiguous_blocks>
void time_placement(benchmark::State& state, Pl placement_policy, P predictor, moe_config base,
                    synthetic::workload_params params = {}, G grouping = {}) {
  auto const batches = workloads(state, base, params);
  auto const& cfg = batches[0].config;
  auto const placement = grouping.place(cfg, 0);
  std::vector<prediction> guesses(batches.size());
  for (std::size_t b = 0; b < batches.size(); ++b) {
    auto const& w = batches[b];
    auto const x = w.activation_view();
    if constexpr (P::predicts) {
      predictor.predict(prediction_request{cfg, w.num_tokens(), w.home_rank, w.token_ids, x, placement}, guesses[b]);
      derive_predicted_ranks(guesses[b], placement, w.home_rank);
    } else {
      guesses[b].reset(w.num_tokens(), 0);
    }
  }
  token_plan plan;
  std::int64_t iteration = 0;
  auto plan_batch = [&](std::size_t b) {
    auto const& w = batches[b];
    placement_policy.plan(placement_request{cfg, w.num_tokens(), w.home_rank, w.tokens_per_rank, guesses[b], placement},
                          plan);
  };
  for (auto _ : state) {
    plan_batch(static_cast<std::size_t>(iteration++ % num_batches));
    benchmark::DoNotOptimize(plan.rank.data());
  }
  // Score, untimed, every batch once.
  std::int64_t local = 0, activations = 0, moved = 0, tokens = 0;
  double imbalance = 0;
  for (std::size_t b = 0; b < batches.size(); ++b) {
    auto const& w = batches[b];
    plan_batch(b);
    plan.validate(w.num_tokens(), cfg.num_ranks);
    local += local_activations(w, placement, plan.rank);
    activations += w.num_tokens() * cfg.top_k;
    std::vector<std::int64_t> per_rank(static_cast<std::size_t>(cfg.num_ranks));
    for (std::size_t t = 0; t < plan.rank.size(); ++t) {
      ++per_rank[static_cast<std::size_t>(plan.rank[t])];
      moved += plan.rank[t] != w.home_rank[t];
    }
    imbalance += static_cast<double>(*std::max_element(per_rank.begin(), per_rank.end())) * cfg.num_ranks /
                 static_cast<double>(w.num_tokens() > 0 ? w.num_tokens() : 1);
    tokens += w.num_tokens();
  }
  report_time_per_token(state, batches[0].num_tokens());
  state.counters["lar"] = activations ? static_cast<double>(local) / static_cast<double>(activations) : 0.0;
  state.counters["moved_share"] = tokens ? static_cast<double>(moved) / static_cast<double>(tokens) : 0.0;
  state.counters["load_imbalance"] = imbalance / static_cast<double>(batches.size());
}

/// @brief Times an ExpertGrouping's `place` plus the serving-rank lookup of every activation of a
/// batch; counters: lar (tokens at home), expert_load_imbalance (max activations served by a
/// rank / mean), time_per_token.
template <expert_grouping G>
void time_grouping(benchmark::State& state, G grouping, moe_config base, synthetic::workload_params params = {}) {
  auto const batches = workloads(state, base, params);
  auto const& cfg = batches[0].config;
  std::int64_t iteration = 0, checksum = 0;
  for (auto _ : state) {
    auto const& w = batches[static_cast<std::size_t>(iteration++ % num_batches)];
    auto const placement = grouping.place(cfg, 0);
    for (std::int64_t t = 0; t < w.num_tokens(); ++t) {
      for (int j = 0; j < cfg.top_k; ++j) checksum += placement.serving_rank(w.actual.id(t, j), w.home_rank[static_cast<std::size_t>(t)], t);
    }
    benchmark::DoNotOptimize(checksum);
  }
  auto const placement = grouping.place(cfg, 0);
  std::int64_t local = 0, activations = 0;
  std::vector<std::int64_t> load(static_cast<std::size_t>(cfg.num_ranks));
  for (auto const& w : batches) {
    local += local_activations(w, placement, w.home_rank);
    activations += w.num_tokens() * cfg.top_k;
    for (std::int64_t t = 0; t < w.num_tokens(); ++t) {
      for (int j = 0; j < cfg.top_k; ++j) ++load[static_cast<std::size_t>(placement.serving_rank(w.actual.id(t, j), w.home_rank[static_cast<std::size_t>(t)], t))];
    }
  }
  report_time_per_token(state, batches[0].num_tokens());
  state.counters["lar"] = activations ? static_cast<double>(local) / static_cast<double>(activations) : 0.0;
  state.counters["expert_load_imbalance"] = activations ? static_cast<double>(*std::max_element(load.begin(), load.end())) *
                                                              cfg.num_ranks / static_cast<double>(activations)
                                                        : 0.0;
}

/// @brief Times a host CommBackend's all-to-all-v carrying one de-duplicated dispatch of bf16 rows
/// of the config's hidden size; counters: bytes_per_second (bytes that cross ranks), rows.
template <host_comm_backend C, expert_grouping G = contiguous_blocks>
void time_host_comm(benchmark::State& state, C comm, moe_config base, synthetic::workload_params params = {},
                    G grouping = {}) {
  auto const batches = workloads(state, base, params);
  auto const& w = batches[0];
  auto const& cfg = w.config;
  auto const D = static_cast<std::size_t>(cfg.num_ranks);
  auto const placement = grouping.place(cfg, 0);
  std::int64_t const row_bytes = 2 * static_cast<std::int64_t>(cfg.hidden_size);
  std::vector<std::int64_t> counts(D * D);
  std::int64_t crossing = 0;
  std::vector<std::vector<std::byte>> send(D), recv(D);
  std::int64_t first = 0;
  for (std::size_t s = 0; s < D; ++s) {
    routing_view mine{std::span(w.actual.topk_ids).subspan(static_cast<std::size_t>(first * cfg.top_k),
                                                           static_cast<std::size_t>(w.tokens_per_rank[s] * cfg.top_k)),
                      std::span(w.actual.topk_weights).subspan(static_cast<std::size_t>(first * cfg.top_k),
                                                               static_cast<std::size_t>(w.tokens_per_rank[s] * cfg.top_k)),
                      w.tokens_per_rank[s], cfg.top_k};
    first += w.tokens_per_rank[s];
    auto const l = make_dispatch_layout(mine, placement, static_cast<int>(s));
    for (std::size_t d = 0; d < D; ++d) {
      counts[s * D + d] = l.num_tokens_per_rank[d];
      if (s != d) crossing += l.num_tokens_per_rank[d];
    }
    send[s].assign(static_cast<std::size_t>(l.rank_prefix.back() * row_bytes), std::byte{0x5a});
  }
  std::vector<std::byte const*> sp(D);
  std::vector<std::byte*> rp(D);
  for (std::size_t d = 0; d < D; ++d) {
    std::int64_t rows = 0;
    for (std::size_t s = 0; s < D; ++s) rows += counts[s * D + d];
    recv[d].resize(static_cast<std::size_t>(rows * row_bytes));
    sp[d] = send[d].data();
    rp[d] = recv[d].data();
  }
  for (auto _ : state) {
    comm.alltoallv(host_exchange{cfg.num_ranks, row_bytes, counts, sp, rp});
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * crossing * row_bytes);
  report_time_per_token(state, w.num_tokens());
  state.counters["rows"] = static_cast<double>(crossing);
}

}  // namespace specmoe::bench
