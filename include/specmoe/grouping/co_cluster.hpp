// specmoe/grouping/co_cluster.hpp: Speculative MoE's offline solver — balanced token-expert
// co-clustering of one layer from its trace profile.
//
// Every expert goes to one of D ranks (E/D each) and every token id to one rank, minimising
//   theta * (token-load imbalance) + (1 - theta) * (share of activations whose expert is remote)
// where a token's load is its frequency and imbalance = max rank load / mean load - 1. Expert
// placement also keeps each rank's activation load (the expert compute) within `expert_slack` of
// the mean where the loads allow it.
//
//   co_cluster_layer  alternating optimisation: experts given token clusters (balanced greedy on
//                     the expert x rank affinity), tokens given experts (balanced greedy on each
//                     token's local activations), then random pairwise expert swaps kept when they
//                     raise local activations; repeated until nothing improves.
//   cem_layer         the cross-entropy-method sampler of the paper's first version: balanced
//                     placements sampled from a per-expert rank distribution, refit on the elite.
//   contiguous_layer  the baseline: experts in contiguous blocks, tokens to their best rank.
#pragma once

#include <specmoe/core/error.hpp>
#include <specmoe/trace/profile.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <utility>
#include <vector>

namespace specmoe::grouping {

struct co_cluster_options {
  int ranks = 8;
  double theta = 0.5;          ///< weight of token-load imbalance against remote activations, in [0, 1]
  double token_slack = 0.05;   ///< a rank's token load may exceed the mean by this share
  /// A rank's expert activation load may exceed the mean by this share (in the primary placement,
  /// before replicas). Negative: automatic, 0.05 without replicas (held-out traces land about 3
  /// points above the cap they were planned under), 0.15 with them (the replicas even out the
  /// rest, so the primary placement may favour locality).
  double expert_slack = -1.0;
  int max_rounds = 20;         ///< alternating rounds (stops earlier when the objective stops falling)
  int swaps_per_expert = 8;    ///< random pairwise expert swaps tried per round, per expert
  int cem_samples = 64;        ///< CEM: placements sampled per iteration
  int cem_iterations = 30;     ///< CEM: iterations
  double cem_elite = 0.125;    ///< CEM: share of samples refit on
  double cem_smoothing = 0.7;  ///< CEM: weight of the elite frequencies in the update
  int replicas_per_rank = 0;   ///< extra expert copies each rank may hold (hot experts, EPLB style)
  std::uint64_t seed = 1;
};

/// One layer's solution and how good it is.
struct layer_grouping {
  std::vector<int> expert_rank;          ///< [experts] the primary owner
  std::vector<std::pair<int, int>> replicas;  ///< extra (expert, rank) copies, at most replicas_per_rank a rank
  std::vector<int> token_rank;           ///< [profile rows] the rank of each token id (profile order)
  std::vector<float> token_confidence;   ///< [rows] share of the id's activations its rank holds locally
  double remote_share = 0.0;             ///< activations on another rank than their token's / all
  double token_imbalance = 0.0;          ///< max rank token load / mean - 1
  double expert_load_imbalance = 0.0;    ///< max rank activation load / mean - 1
  double objective = 0.0;
};

namespace co_cluster_detail {

struct problem {
  trace::layer_profile const& p;
  int D;
  int per_rank;
  double total_tokens;
  double total_acts;
  co_cluster_options const& o;
  double expert_slack;       ///< o.expert_slack, resolved
  bool tokens_stay = false;  ///< tokens are not clustered (load-only baseline): they stay home
};

inline problem make_problem(trace::layer_profile const& p, co_cluster_options const& o) {
  SPECMOE_EXPECTS(o.ranks > 0 && p.experts % o.ranks == 0, errc::invalid_argument, "co-clustering needs experts (", p.experts,
                  ") divisible by ranks (", o.ranks, "): E/D experts per rank");
  SPECMOE_EXPECTS(o.theta >= 0 && o.theta <= 1 && o.token_slack >= 0, errc::invalid_argument,
                  "co_cluster_options: theta in [0, 1], token_slack >= 0");
  double tokens = 0;
  for (auto f : p.frequency) tokens += static_cast<double>(f);
  double acts = 0;
  for (auto c : p.count) acts += c;
  double const slack = o.expert_slack >= 0 ? o.expert_slack : o.replicas_per_rank > 0 ? 0.15 : 0.05;
  return {p, o.ranks, p.experts / o.ranks, tokens, acts, o, slack, false};
}

/// Tokens given experts: each id to the rank holding most of its activations, heaviest ids first,
/// within a token-load cap (the least loaded rank when every good rank is full).
inline void assign_tokens(problem const& pr, std::vector<int> const& expert_rank, layer_grouping& g) {
  auto const& p = pr.p;
  auto const rows = p.token_ids.size();
  auto const D = static_cast<std::size_t>(pr.D);
  std::vector<double> local(rows * D, 0.0);
  for (std::size_t r = 0; r < rows; ++r) {
    for (auto i = p.row_offsets[r]; i < p.row_offsets[r + 1]; ++i) {
      local[r * D + static_cast<std::size_t>(expert_rank[static_cast<std::size_t>(p.expert[static_cast<std::size_t>(i)])])] +=
          p.count[static_cast<std::size_t>(i)];
    }
  }
  std::vector<std::size_t> order(rows);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return p.frequency[a] > p.frequency[b]; });
  double const cap = (1.0 + pr.o.token_slack) * pr.total_tokens / pr.D;
  std::vector<double> load(D, 0.0);
  g.token_rank.assign(rows, 0);
  g.token_confidence.assign(rows, 0.0f);
  std::vector<int> ranks(D);
  double local_total = 0;
  for (auto const r : order) {
    std::iota(ranks.begin(), ranks.end(), 0);
    std::stable_sort(ranks.begin(), ranks.end(), [&](int a, int b) { return local[r * D + static_cast<std::size_t>(a)] > local[r * D + static_cast<std::size_t>(b)]; });
    auto const f = static_cast<double>(p.frequency[r]);
    int chosen = -1;
    for (int const d : ranks) {
      if (load[static_cast<std::size_t>(d)] + f <= cap) {
        chosen = d;
        break;
      }
    }
    if (chosen < 0) chosen = static_cast<int>(std::min_element(load.begin(), load.end()) - load.begin());
    load[static_cast<std::size_t>(chosen)] += f;
    g.token_rank[r] = chosen;
    double const here = local[r * D + static_cast<std::size_t>(chosen)];
    local_total += here;
    g.token_confidence[r] = static_cast<float>(here / (f * p.top_k));
  }
  double const mean = pr.total_tokens / pr.D;
  g.token_imbalance = mean > 0 ? *std::max_element(load.begin(), load.end()) / mean - 1.0 : 0.0;
  g.remote_share = pr.total_acts > 0 ? 1.0 - local_total / pr.total_acts : 0.0;
}

/// affinity[e * D + d] = activations of expert e by the token ids clustered on rank d.
inline std::vector<double> expert_affinity(problem const& pr, std::vector<int> const& token_rank) {
  auto const D = static_cast<std::size_t>(pr.D);
  std::vector<double> a(static_cast<std::size_t>(pr.p.experts) * D, 0.0);
  for (std::size_t r = 0; r < token_rank.size(); ++r) {
    for (auto i = pr.p.row_offsets[r]; i < pr.p.row_offsets[r + 1]; ++i) {
      a[static_cast<std::size_t>(pr.p.expert[static_cast<std::size_t>(i)]) * D + static_cast<std::size_t>(token_rank[r])] +=
          pr.p.count[static_cast<std::size_t>(i)];
    }
  }
  return a;
}

/// expert_affinity as the runtime sees it: the token shuffle gives every rank an equal shard, so a
/// rank whose clustered ids exceed the mean keeps only the mean's share of their activations; the
/// overflow lands on the ranks with room, in proportion to it (a frequent id at EP 64 can be several
/// shards on its own).
inline std::vector<double> served_affinity(problem const& pr, std::vector<int> const& token_rank) {
  auto const D = static_cast<std::size_t>(pr.D);
  std::vector<double> tokens(D, 0.0);
  for (std::size_t r = 0; r < token_rank.size(); ++r) tokens[static_cast<std::size_t>(token_rank[r])] += static_cast<double>(pr.p.frequency[r]);
  double const cap = pr.total_tokens / pr.D;
  std::vector<double> keep(D, 1.0), room(D, 0.0);
  double total_room = 0;
  for (std::size_t d = 0; d < D; ++d) {
    if (tokens[d] > cap) keep[d] = cap / tokens[d];
    room[d] = std::max(0.0, cap - tokens[d]);
    total_room += room[d];
  }
  auto a = expert_affinity(pr, token_rank);
  if (total_room <= 0) return a;
  auto const E = static_cast<std::size_t>(pr.p.experts);
  for (std::size_t e = 0; e < E; ++e) {
    double overflow = 0;
    for (std::size_t d = 0; d < D; ++d) {
      overflow += a[e * D + d] * (1.0 - keep[d]);
      a[e * D + d] *= keep[d];
    }
    for (std::size_t d = 0; d < D; ++d) a[e * D + d] += overflow * room[d] / total_room;
  }
  return a;
}

/// Every expert's owners: the primary, then its replicas.
inline std::vector<std::vector<int>> expert_owners(std::vector<int> const& expert_rank,
                                                   std::vector<std::pair<int, int>> const& replicas) {
  std::vector<std::vector<int>> owners(expert_rank.size());
  for (std::size_t e = 0; e < expert_rank.size(); ++e) owners[e].push_back(expert_rank[e]);
  for (auto const& [e, r] : replicas) owners[static_cast<std::size_t>(e)].push_back(r);
  return owners;
}

/// Adds expert e's expected activations to `load` (sign -1 removes them) under the layer's serving
/// rule: a token on a rank that holds a copy is served there, the others split evenly over the
/// copies. `affinity` null: the tokens stay home, spread evenly, so every copy gets an even share.
inline void add_expert_load(problem const& pr, std::size_t e, std::vector<int> const& owners,
                            std::vector<double> const* affinity, double sign, std::vector<double>& load) {
  auto const D = static_cast<std::size_t>(pr.D);
  auto const copies = static_cast<double>(owners.size());
  if (affinity == nullptr || owners.size() == 1) {
    for (int o : owners) load[static_cast<std::size_t>(o)] += sign * static_cast<double>(pr.p.expert_load[e]) / copies;
    return;
  }
  double remote = 0;
  for (std::size_t d = 0; d < D; ++d) {
    double const a = (*affinity)[e * D + d];
    if (std::find(owners.begin(), owners.end(), static_cast<int>(d)) != owners.end()) {
      load[d] += sign * a;
    } else {
      remote += a;
    }
  }
  for (int o : owners) load[static_cast<std::size_t>(o)] += sign * remote / copies;
}

inline std::vector<double> rank_loads(problem const& pr, std::vector<std::vector<int>> const& owners,
                                      std::vector<double> const* affinity) {
  std::vector<double> load(static_cast<std::size_t>(pr.D), 0.0);
  for (std::size_t e = 0; e < owners.size(); ++e) add_expert_load(pr, e, owners[e], affinity, 1.0, load);
  return load;
}

/// Replication under the serving rule, in two phases. Balance: while it helps, copy one of the
/// busiest rank's experts to the rank with a free slot where the copy lowers the larger of the two
/// ranks' loads most (any rank, not only the idlest: a copy takes its own rank's tokens, and a hot
/// expert whose tokens all sit on its rank gains nothing from a copy).
/// Locality: fill the remaining slots with the copies that serve the most activations locally,
/// each only if it lifts no rank above the current peak or 1 + replica_locality_slack times the
/// mean, whichever is higher.
inline constexpr double replica_locality_slack = 0.02;
inline void add_replicas(problem const& pr, layer_grouping& g, std::vector<double> const* affinity) {
  int const R = pr.o.replicas_per_rank;
  if (R <= 0 || pr.D < 2) return;
  auto const D = static_cast<std::size_t>(pr.D);
  std::vector<int> slots(D, R);
  auto owners = expert_owners(g.expert_rank, g.replicas);
  auto load = rank_loads(pr, owners, affinity);
  auto holds = [&](std::size_t e, std::size_t d) {
    return std::find(owners[e].begin(), owners[e].end(), static_cast<int>(d)) != owners[e].end();
  };
  std::vector<double> trial;
  auto try_copy = [&](std::size_t e, std::size_t d) {  // loads with a copy of e on d, in `trial`
    trial = load;
    add_expert_load(pr, e, owners[e], affinity, -1.0, trial);
    owners[e].push_back(static_cast<int>(d));
    add_expert_load(pr, e, owners[e], affinity, 1.0, trial);
    owners[e].pop_back();
  };
  auto place = [&](std::size_t e, std::size_t d) {
    try_copy(e, d);
    load = trial;
    owners[e].push_back(static_cast<int>(d));
    g.replicas.emplace_back(static_cast<int>(e), static_cast<int>(d));
    --slots[d];
  };
  while (true) {  // balance
    auto const busy = static_cast<std::size_t>(std::max_element(load.begin(), load.end()) - load.begin());
    std::size_t best_e = owners.size(), best_d = D;
    double best_peak = load[busy];
    for (std::size_t d = 0; d < D; ++d) {
      if (slots[d] == 0 || d == busy) continue;
      for (std::size_t e = 0; e < owners.size(); ++e) {
        if (!holds(e, busy) || holds(e, d)) continue;
        try_copy(e, d);
        double const peak = std::max(trial[busy], trial[d]);
        if (peak < best_peak - 1e-9) {
          best_peak = peak;
          best_e = e;
          best_d = d;
        }
      }
    }
    if (best_e == owners.size()) break;
    place(best_e, best_d);
  }
  double const mean = pr.total_acts / pr.D;
  while (true) {  // locality
    double const peak = std::max(*std::max_element(load.begin(), load.end()), (1.0 + replica_locality_slack) * mean);
    std::size_t best_e = owners.size(), best_d = D;
    double best_gain = 0;
    for (std::size_t d = 0; d < D; ++d) {
      if (slots[d] == 0) continue;
      for (std::size_t e = 0; e < owners.size(); ++e) {
        if (holds(e, d)) continue;
        double const gain = affinity ? (*affinity)[e * D + d] : static_cast<double>(pr.p.expert_load[e]) / pr.D;
        if (gain <= best_gain) continue;
        try_copy(e, d);
        if (*std::max_element(trial.begin(), trial.end()) > peak + 1e-9) continue;
        best_gain = gain;
        best_e = e;
        best_d = d;
      }
    }
    if (best_e == owners.size()) return;
    place(best_e, best_d);
  }
}

inline void finish(problem const& pr, layer_grouping& g) {
  // Clustered tokens sit on the plan's token ranks; the load-only baseline leaves them home.
  std::vector<double> affinity;
  if (!pr.tokens_stay) affinity = served_affinity(pr, g.token_rank);
  auto const* aff = pr.tokens_stay ? nullptr : &affinity;
  add_replicas(pr, g, aff);
  auto const load = rank_loads(pr, expert_owners(g.expert_rank, g.replicas), aff);
  double const mean = pr.total_acts / pr.D;
  g.expert_load_imbalance = mean > 0 ? *std::max_element(load.begin(), load.end()) / mean - 1.0 : 0.0;
  g.objective = pr.o.theta * g.token_imbalance + (1.0 - pr.o.theta) * g.remote_share;
}

/// Experts given token clusters: (expert, rank) pairs by affinity, best first, each taken when the
/// expert is free and the rank has a slot and activation-load room; leftovers to the lightest rank
/// with a slot.
inline std::vector<int> assign_experts(problem const& pr, std::vector<double> const& affinity) {
  auto const E = static_cast<std::size_t>(pr.p.experts), D = static_cast<std::size_t>(pr.D);
  std::vector<std::size_t> pairs(E * D);
  std::iota(pairs.begin(), pairs.end(), 0);
  std::stable_sort(pairs.begin(), pairs.end(), [&](std::size_t a, std::size_t b) { return affinity[a] > affinity[b]; });
  double const load_cap = (1.0 + pr.expert_slack) * pr.total_acts / pr.D;
  std::vector<int> rank(E, -1), slots(D, pr.per_rank);
  std::vector<double> load(D, 0.0);
  for (auto const pd : pairs) {
    auto const e = pd / D, d = pd % D;
    auto const l = static_cast<double>(pr.p.expert_load[e]);
    if (rank[e] >= 0 || slots[d] == 0 || load[d] + l > load_cap) continue;
    rank[e] = static_cast<int>(d);
    --slots[d];
    load[d] += l;
  }
  // heavy leftovers first, each to the lightest rank with a free slot
  std::vector<std::size_t> left;
  for (std::size_t e = 0; e < E; ++e) if (rank[e] < 0) left.push_back(e);
  std::stable_sort(left.begin(), left.end(), [&](std::size_t a, std::size_t b) { return pr.p.expert_load[a] > pr.p.expert_load[b]; });
  for (auto const e : left) {
    std::size_t best = D;
    for (std::size_t d = 0; d < D; ++d) if (slots[d] > 0 && (best == D || load[d] < load[best])) best = d;
    rank[e] = static_cast<int>(best);
    --slots[best];
    load[best] += static_cast<double>(pr.p.expert_load[e]);
  }
  return rank;
}

/// Random pairwise swaps of experts on different ranks, kept when local activations rise and the
/// activation-load cap still holds (token clusters fixed).
inline void refine_by_swaps(problem const& pr, std::vector<double> const& affinity, std::vector<int>& rank, std::mt19937_64& rng) {
  auto const E = pr.p.experts;
  auto const D = static_cast<std::size_t>(pr.D);
  std::vector<double> load(D, 0.0);
  for (int e = 0; e < E; ++e) load[static_cast<std::size_t>(rank[static_cast<std::size_t>(e)])] += static_cast<double>(pr.p.expert_load[static_cast<std::size_t>(e)]);
  double const load_cap = (1.0 + pr.expert_slack) * pr.total_acts / pr.D;
  std::uniform_int_distribution<int> pick(0, E - 1);
  auto const tries = static_cast<std::int64_t>(pr.o.swaps_per_expert) * E;
  for (std::int64_t i = 0; i < tries; ++i) {
    int const e1 = pick(rng), e2 = pick(rng);
    auto const a = static_cast<std::size_t>(rank[static_cast<std::size_t>(e1)]), b = static_cast<std::size_t>(rank[static_cast<std::size_t>(e2)]);
    if (a == b) continue;
    auto const u1 = static_cast<std::size_t>(e1) * D, u2 = static_cast<std::size_t>(e2) * D;
    double const gain = affinity[u2 + a] - affinity[u1 + a] + affinity[u1 + b] - affinity[u2 + b];
    if (gain <= 0) continue;
    double const l1 = static_cast<double>(pr.p.expert_load[static_cast<std::size_t>(e1)]), l2 = static_cast<double>(pr.p.expert_load[static_cast<std::size_t>(e2)]);
    double const la = load[a] - l1 + l2, lb = load[b] - l2 + l1;
    if ((la > load_cap && la > load[a]) || (lb > load_cap && lb > load[b])) continue;
    rank[static_cast<std::size_t>(e1)] = static_cast<int>(b);
    rank[static_cast<std::size_t>(e2)] = static_cast<int>(a);
    load[a] = la;
    load[b] = lb;
  }
}

/// While the busiest rank's activation load exceeds the cap, swap one of its experts with a lighter
/// one of the least busy rank, choosing the swap that loses the least affinity.
inline void rebalance(problem const& pr, std::vector<double> const& affinity, std::vector<int>& rank) {
  auto const E = static_cast<std::size_t>(pr.p.experts), D = static_cast<std::size_t>(pr.D);
  double const load_cap = (1.0 + pr.expert_slack) * pr.total_acts / pr.D;
  std::vector<double> load(D, 0.0);
  for (std::size_t e = 0; e < E; ++e) load[static_cast<std::size_t>(rank[e])] += static_cast<double>(pr.p.expert_load[e]);
  for (std::size_t step = 0; step < E; ++step) {
    auto const a = static_cast<std::size_t>(std::max_element(load.begin(), load.end()) - load.begin());
    auto const b = static_cast<std::size_t>(std::min_element(load.begin(), load.end()) - load.begin());
    if (load[a] <= load_cap || a == b) return;
    double best_loss = 0;
    std::size_t best1 = E, best2 = E;
    for (std::size_t e1 = 0; e1 < E; ++e1) {
      if (static_cast<std::size_t>(rank[e1]) != a) continue;
      for (std::size_t e2 = 0; e2 < E; ++e2) {
        if (static_cast<std::size_t>(rank[e2]) != b) continue;
        double const moved = static_cast<double>(pr.p.expert_load[e1]) - static_cast<double>(pr.p.expert_load[e2]);
        if (moved <= 0 || load[b] + moved >= load[a]) continue;  // must lower the maximum
        double const loss = affinity[e1 * D + a] - affinity[e1 * D + b] + affinity[e2 * D + b] - affinity[e2 * D + a];
        if (best1 == E || loss < best_loss) {
          best_loss = loss;
          best1 = e1;
          best2 = e2;
        }
      }
    }
    if (best1 == E) return;
    double const moved = static_cast<double>(pr.p.expert_load[best1]) - static_cast<double>(pr.p.expert_load[best2]);
    rank[best1] = static_cast<int>(b);
    rank[best2] = static_cast<int>(a);
    load[a] -= moved;
    load[b] += moved;
  }
}

inline layer_grouping evaluate(problem const& pr, std::vector<int> expert_rank) {
  layer_grouping g;
  g.expert_rank = std::move(expert_rank);
  assign_tokens(pr, g.expert_rank, g);
  finish(pr, g);
  return g;
}

}  // namespace co_cluster_detail

/// EPLB-style load-only balancing: experts heaviest first, each to the least loaded rank with a
/// free slot (no token clustering), then the replicas of co_cluster_options::replicas_per_rank.
inline layer_grouping load_balanced_layer(trace::layer_profile const& p, co_cluster_options const& o) {
  auto pr = co_cluster_detail::make_problem(p, o);
  pr.tokens_stay = true;
  auto const E = static_cast<std::size_t>(p.experts), D = static_cast<std::size_t>(pr.D);
  std::vector<std::size_t> order(E);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return p.expert_load[a] > p.expert_load[b]; });
  std::vector<int> rank(E), slots(D, pr.per_rank);
  std::vector<double> load(D, 0.0);
  for (auto const e : order) {
    std::size_t best = D;
    for (std::size_t d = 0; d < D; ++d) if (slots[d] > 0 && (best == D || load[d] < load[best])) best = d;
    rank[e] = static_cast<int>(best);
    --slots[best];
    load[best] += static_cast<double>(p.expert_load[e]);
  }
  return co_cluster_detail::evaluate(pr, std::move(rank));
}

/// The baseline: expert e on rank e / (E / D); token ids to their best rank, balanced.
inline layer_grouping contiguous_layer(trace::layer_profile const& p, co_cluster_options const& o) {
  auto const pr = co_cluster_detail::make_problem(p, o);
  std::vector<int> rank(static_cast<std::size_t>(p.experts));
  for (int e = 0; e < p.experts; ++e) rank[static_cast<std::size_t>(e)] = e / pr.per_rank;
  return co_cluster_detail::evaluate(pr, std::move(rank));
}

/// Alternating optimisation from the contiguous placement; returns the best solution seen (it
/// stops after three rounds without a better one).
inline layer_grouping co_cluster_layer(trace::layer_profile const& p, co_cluster_options const& o) {
  namespace cd = co_cluster_detail;
  auto const pr = cd::make_problem(p, o);
  std::mt19937_64 rng(o.seed);
  auto best = contiguous_layer(p, o);
  auto current = best;
  int stale = 0;
  for (int round = 0; round < o.max_rounds && stale < 3; ++round) {
    auto const affinity = cd::expert_affinity(pr, current.token_rank);
    auto rank = cd::assign_experts(pr, affinity);
    cd::refine_by_swaps(pr, affinity, rank, rng);
    cd::rebalance(pr, affinity, rank);
    current = cd::evaluate(pr, std::move(rank));
    if (current.objective < best.objective - 1e-12) {
      best = current;
      stale = 0;
    } else {
      ++stale;
    }
  }
  return best;
}

/// The cross-entropy method over balanced expert placements (tokens assigned greedily per sample).
inline layer_grouping cem_layer(trace::layer_profile const& p, co_cluster_options const& o) {
  namespace cd = co_cluster_detail;
  auto const pr = cd::make_problem(p, o);
  SPECMOE_EXPECTS(o.cem_samples > 1 && o.cem_iterations > 0 && o.cem_elite > 0 && o.cem_elite <= 1 && o.cem_smoothing >= 0 &&
                      o.cem_smoothing <= 1,
                  errc::invalid_argument, "co_cluster_options: CEM needs samples > 1, iterations > 0, elite and smoothing in (0, 1]");
  auto const E = static_cast<std::size_t>(p.experts), D = static_cast<std::size_t>(pr.D);
  std::mt19937_64 rng(o.seed);
  std::vector<double> prob(E * D, 1.0 / static_cast<double>(D));
  auto best = contiguous_layer(p, o);
  auto const elite = std::max<std::size_t>(1, static_cast<std::size_t>(o.cem_elite * o.cem_samples));
  std::vector<std::pair<double, std::vector<int>>> samples;
  std::vector<std::size_t> order(E);
  std::iota(order.begin(), order.end(), 0);
  std::vector<int> slots(D);
  std::vector<double> w(D);
  for (int it = 0; it < o.cem_iterations; ++it) {
    samples.clear();
    for (int s = 0; s < o.cem_samples; ++s) {
      std::shuffle(order.begin(), order.end(), rng);
      std::fill(slots.begin(), slots.end(), pr.per_rank);
      std::vector<int> rank(E);
      for (auto const e : order) {
        double total = 0;
        for (std::size_t d = 0; d < D; ++d) total += w[d] = slots[d] > 0 ? prob[e * D + d] + 1e-9 : 0.0;
        double u = std::uniform_real_distribution<double>(0.0, total)(rng);
        std::size_t d = 0;
        while (d + 1 < D && (w[d] == 0.0 || u >= w[d])) {
          u -= w[d];
          ++d;
        }
        if (slots[d] == 0) d = static_cast<std::size_t>(std::find_if(slots.begin(), slots.end(), [](int x) { return x > 0; }) - slots.begin());
        rank[e] = static_cast<int>(d);
        --slots[d];
      }
      auto g = cd::evaluate(pr, rank);
      if (g.objective < best.objective) best = g;
      samples.emplace_back(g.objective, std::move(rank));
    }
    std::partial_sort(samples.begin(), samples.begin() + static_cast<std::ptrdiff_t>(elite), samples.end(),
                      [](auto const& a, auto const& b) { return a.first < b.first; });
    std::vector<double> freq(E * D, 0.0);
    for (std::size_t i = 0; i < elite; ++i) {
      for (std::size_t e = 0; e < E; ++e) freq[e * D + static_cast<std::size_t>(samples[i].second[e])] += 1.0 / static_cast<double>(elite);
    }
    for (std::size_t i = 0; i < prob.size(); ++i) prob[i] = o.cem_smoothing * freq[i] + (1.0 - o.cem_smoothing) * prob[i];
  }
  return best;
}

}  // namespace specmoe::grouping
