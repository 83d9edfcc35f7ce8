// specmoe/grouping/speculative_plan.hpp: the offline plan of Speculative MoE, made from a trace and
// kept as JSON: per layer, expert -> rank; token id -> rank with confidence (T, T_p); and the device
// 2-gram table (ranks at the two previous layers -> next rank, with confidence; A, A_p).
//
//   make_plan(trace, options, solver)  solves every layer (co_cluster.hpp), then counts the 2-grams
//                                      of the ranks tokens take under the solved placements;
//   write_plan / read_plan             "specmoe-plan/1" JSON; read_plan checks every constraint
//                                      (E/D experts per rank, ranks and confidences in range);
//   plan_placements(plan)              the placements as an explicit_placement for the layers.
#pragma once

#include <specmoe/core/error.hpp>
#include <specmoe/core/expert_placement.hpp>
#include <specmoe/detail/json.hpp>
#include <specmoe/grouping/co_cluster.hpp>
#include <specmoe/grouping/concepts.hpp>
#include <specmoe/trace/profile.hpp>
#include <specmoe/trace/routing_trace.hpp>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace specmoe::grouping {

inline constexpr char const* plan_format = "specmoe-plan/1";

/// Which solver make_plan runs per layer.
enum class plan_solver { alternating, cem, contiguous, load_balanced };

inline char const* to_string(plan_solver s) {
  switch (s) {
    case plan_solver::alternating: return "alternating";
    case plan_solver::cem: return "cem";
    case plan_solver::load_balanced: return "load_balanced";
    default: return "contiguous";
  }
}

/// One layer of a plan.
struct plan_layer {
  std::vector<int> expert_rank;              ///< [experts] primary owner
  std::vector<std::pair<int, int>> replicas; ///< extra (expert, rank) copies of hot experts
  std::vector<std::int32_t> token_ids;       ///< [n] ascending vocabulary ids (T's keys)
  std::vector<int> token_rank;               ///< [n] T
  std::vector<float> token_confidence;       ///< [n] T_p: share of the id's occurrences served mostly by T's rank
  std::vector<int> ngram_rank;               ///< [D * D] A: next rank after (rank at l-2, rank at l-1); empty for l < 2
  std::vector<float> ngram_confidence;       ///< [D * D] A_p; 0 where the 2-gram was never seen
  double remote_share = 0.0, token_imbalance = 0.0, expert_load_imbalance = 0.0, lookback_confidence = 0.0;

  /// T, T_p of a vocabulary id: {-1, 0} when the plan never saw it.
  [[nodiscard]] std::pair<int, float> token(std::int32_t id) const {
    auto const it = std::lower_bound(token_ids.begin(), token_ids.end(), id);
    if (it == token_ids.end() || *it != id) return {-1, 0.0f};
    auto const i = static_cast<std::size_t>(it - token_ids.begin());
    return {token_rank[i], token_confidence[i]};
  }
  /// A, A_p after ranks (a, b) at the two previous layers: {-1, 0} when unknown.
  [[nodiscard]] std::pair<int, float> next_rank(int a, int b, int ranks) const {
    if (ngram_rank.empty() || a < 0 || b < 0 || a >= ranks || b >= ranks) return {-1, 0.0f};
    auto const i = static_cast<std::size_t>(a * ranks + b);
    return {ngram_rank[i], ngram_confidence[i]};
  }
};

struct speculative_plan {
  int layers = 0, experts = 0, ranks = 0;
  int replicas_per_rank = 0;
  double theta = 0.5;
  std::string solver;
  std::vector<plan_layer> per_layer;
};

/// Checks the constraints every plan must meet; `where` names it in errors.
inline void validate_plan(speculative_plan const& p, std::string const& where) {
  SPECMOE_EXPECTS(p.layers > 0 && p.experts > 0 && p.ranks > 0 && p.experts % p.ranks == 0, errc::io, where,
                  ": layers, experts, ranks must be positive and experts divisible by ranks");
  SPECMOE_EXPECTS(static_cast<int>(p.per_layer.size()) == p.layers, errc::io, where, ": holds ", p.per_layer.size(), " layers, says ", p.layers);
  auto const D = static_cast<std::size_t>(p.ranks);
  for (int l = 0; l < p.layers; ++l) {
    auto const& L = p.per_layer[static_cast<std::size_t>(l)];
    SPECMOE_EXPECTS(static_cast<int>(L.expert_rank.size()) == p.experts, errc::io, where, ": layer ", l, " places ",
                    L.expert_rank.size(), " experts, expected ", p.experts);
    std::vector<int> per(D, 0);
    for (std::size_t e = 0; e < L.expert_rank.size(); ++e) {
      SPECMOE_EXPECTS(L.expert_rank[e] >= 0 && L.expert_rank[e] < p.ranks, errc::io, where, ": layer ", l, " puts expert ", e,
                      " on rank ", L.expert_rank[e], ", outside [0, ", p.ranks, ")");
      ++per[static_cast<std::size_t>(L.expert_rank[e])];
    }
    for (std::size_t d = 0; d < D; ++d) {
      SPECMOE_EXPECTS(per[d] == p.experts / p.ranks, errc::io, where, ": layer ", l, " puts ", per[d], " experts on rank ", d,
                      ", every rank needs ", p.experts / p.ranks);
    }
    std::vector<int> extra(D, 0);
    std::vector<std::pair<int, int>> seen;
    for (auto const& [e, r] : L.replicas) {
      SPECMOE_EXPECTS(e >= 0 && e < p.experts && r >= 0 && r < p.ranks && L.expert_rank[static_cast<std::size_t>(e)] != r, errc::io,
                      where, ": layer ", l, " replica (expert ", e, ", rank ", r, ") is out of range or on its primary rank");
      SPECMOE_EXPECTS(std::find(seen.begin(), seen.end(), std::pair<int, int>{e, r}) == seen.end(), errc::io, where, ": layer ", l,
                      " repeats replica (expert ", e, ", rank ", r, ")");
      seen.emplace_back(e, r);
      SPECMOE_EXPECTS(++extra[static_cast<std::size_t>(r)] <= p.replicas_per_rank, errc::io, where, ": layer ", l, " gives rank ", r,
                      " more than replicas_per_rank = ", p.replicas_per_rank, " replicas");
    }
    SPECMOE_EXPECTS(L.token_rank.size() == L.token_ids.size() && L.token_confidence.size() == L.token_ids.size(), errc::io, where,
                    ": layer ", l, " token table arrays differ in length");
    for (std::size_t i = 0; i < L.token_ids.size(); ++i) {
      SPECMOE_EXPECTS(i == 0 || L.token_ids[i] > L.token_ids[i - 1], errc::io, where, ": layer ", l,
                      " token ids must be strictly ascending (at entry ", i, ")");
      SPECMOE_EXPECTS(L.token_rank[i] >= 0 && L.token_rank[i] < p.ranks && L.token_confidence[i] >= 0 && L.token_confidence[i] <= 1,
                      errc::io, where, ": layer ", l, " token ", L.token_ids[i], " has rank ", L.token_rank[i], " / confidence ",
                      L.token_confidence[i], " out of range");
    }
    SPECMOE_EXPECTS(L.ngram_rank.empty() || (L.ngram_rank.size() == D * D && L.ngram_confidence.size() == D * D), errc::io, where,
                    ": layer ", l, " 2-gram table must hold ranks x ranks entries");
    for (std::size_t i = 0; i < L.ngram_rank.size(); ++i) {
      SPECMOE_EXPECTS(L.ngram_rank[i] >= -1 && L.ngram_rank[i] < p.ranks && L.ngram_confidence[i] >= 0 && L.ngram_confidence[i] <= 1,
                      errc::io, where, ": layer ", l, " 2-gram entry ", i, " is out of range");
    }
  }
}

/// Solves every layer of `tr` (which must carry token ids) for `o.ranks` ranks.
inline speculative_plan make_plan(trace::routing_trace const& tr, co_cluster_options const& o, plan_solver solver = plan_solver::alternating) {
  auto const& m = tr.meta;
  speculative_plan plan;
  plan.layers = m.layers;
  plan.experts = m.experts;
  plan.ranks = o.ranks;
  plan.theta = o.theta;
  plan.replicas_per_rank = o.replicas_per_rank;
  plan.solver = to_string(solver);
  std::vector<std::vector<int>> rank_of;
  for (int l = 0; l < m.layers; ++l) {
    auto const prof = trace::profile_layer(tr, l);
    auto const g = solver == plan_solver::alternating     ? co_cluster_layer(prof, o)
                   : solver == plan_solver::cem           ? cem_layer(prof, o)
                   : solver == plan_solver::load_balanced ? load_balanced_layer(prof, o)
                                                          : contiguous_layer(prof, o);
    plan_layer L;
    L.expert_rank = g.expert_rank;
    L.replicas = g.replicas;
    L.token_ids = prof.token_ids;
    L.token_rank = g.token_rank;
    L.token_confidence.assign(g.token_rank.size(), 0.0f);  // filled below
    L.remote_share = g.remote_share;
    L.token_imbalance = g.token_imbalance;
    L.expert_load_imbalance = g.expert_load_imbalance;
    rank_of.push_back(g.expert_rank);
    plan.per_layer.push_back(std::move(L));
  }
  // T_p as the share of the id's occurrences whose served rank (the rank holding most of its
  // experts) is T's rank: the same kind of probability as A_p, so the two compare fairly.
  for (int l = 0; l < m.layers; ++l) {
    auto& L = plan.per_layer[static_cast<std::size_t>(l)];
    auto const served = trace::token_ranks(tr, l, rank_of[static_cast<std::size_t>(l)], o.ranks);
    std::vector<std::int64_t> hits(L.token_ids.size(), 0), seen(L.token_ids.size(), 0);
    for (std::size_t t = 0; t < served.size(); ++t) {
      auto const it = std::lower_bound(L.token_ids.begin(), L.token_ids.end(), tr.token_ids[t]);
      auto const i = static_cast<std::size_t>(it - L.token_ids.begin());
      ++seen[i];
      hits[i] += served[t] == L.token_rank[i] ? 1 : 0;
    }
    for (std::size_t i = 0; i < hits.size(); ++i) {
      L.token_confidence[i] = seen[i] ? static_cast<float>(static_cast<double>(hits[i]) / static_cast<double>(seen[i])) : 0.0f;
    }
  }
  auto const ngrams = trace::device_ngrams(tr, rank_of, o.ranks);
  auto const D = static_cast<std::size_t>(o.ranks);
  for (int l = 2; l < m.layers; ++l) {
    auto const& counts = ngrams[static_cast<std::size_t>(l)].counts;
    auto& L = plan.per_layer[static_cast<std::size_t>(l)];
    L.lookback_confidence = ngrams[static_cast<std::size_t>(l)].lookback_confidence;
    L.ngram_rank.assign(D * D, -1);
    L.ngram_confidence.assign(D * D, 0.0f);
    for (std::size_t ab = 0; ab < D * D; ++ab) {
      auto const b = counts.begin() + static_cast<std::ptrdiff_t>(ab * D);
      std::int64_t total = 0;
      for (std::size_t c = 0; c < D; ++c) total += b[static_cast<std::ptrdiff_t>(c)];
      if (total == 0) continue;
      auto const best = std::max_element(b, b + static_cast<std::ptrdiff_t>(D));
      L.ngram_rank[ab] = static_cast<int>(best - b);
      L.ngram_confidence[ab] = static_cast<float>(static_cast<double>(*best) / static_cast<double>(total));
    }
  }
  validate_plan(plan, "make_plan");
  return plan;
}

/// The plan's per-layer placements, for `moe_layer`'s ExpertGrouping slot.
inline explicit_placement plan_placements(speculative_plan const& plan) {
  std::vector<expert_placement> layers;
  for (auto const& L : plan.per_layer) {
    std::vector<std::vector<int>> owners(L.expert_rank.size());
    for (std::size_t e = 0; e < owners.size(); ++e) owners[e] = {L.expert_rank[e]};
    for (auto const& [e, r] : L.replicas) owners[static_cast<std::size_t>(e)].push_back(r);
    layers.emplace_back(plan.ranks, std::move(owners));
  }
  return explicit_placement(std::move(layers));
}

namespace plan_detail {
template <class T>
detail::json::value to_json(std::vector<T> const& v) {
  detail::json::array a;
  a.reserve(v.size());
  for (auto const& x : v) {
    if constexpr (std::is_floating_point_v<T>) {
      a.emplace_back(static_cast<double>(x));
    } else {
      a.emplace_back(static_cast<std::int64_t>(x));
    }
  }
  return detail::json::value(std::move(a));
}
template <class T>
std::vector<T> from_json(detail::json::value const& v, std::string const& what) {
  std::vector<T> out;
  for (auto const& x : v.as_array(what)) {
    if constexpr (std::is_floating_point_v<T>) {
      out.push_back(static_cast<T>(x.as_double(what)));
    } else {
      auto const i = x.as_int(what);
      SPECMOE_EXPECTS(i >= std::numeric_limits<T>::min() && i <= std::numeric_limits<T>::max(), errc::io, what, ": value ", i,
                      " does not fit");
      out.push_back(static_cast<T>(i));
    }
  }
  return out;
}
}  // namespace plan_detail

/// Writes `plan` as JSON to `path` (checked first).
inline void write_plan(std::filesystem::path const& path, speculative_plan const& plan) {
  validate_plan(plan, path.string());
  using detail::json::value;
  using plan_detail::to_json;
  detail::json::array layers;
  for (auto const& L : plan.per_layer) {
    detail::json::array reps;
    for (auto const& [e, r] : L.replicas) reps.emplace_back(detail::json::array{value(e), value(r)});
    detail::json::object o{{"expert_rank", to_json(L.expert_rank)},
                           {"replicas", value(std::move(reps))},
                           {"token_ids", to_json(L.token_ids)},
                           {"token_rank", to_json(L.token_rank)},
                           {"token_confidence", to_json(L.token_confidence)},
                           {"ngram_rank", to_json(L.ngram_rank)},
                           {"ngram_confidence", to_json(L.ngram_confidence)},
                           {"remote_share", L.remote_share},
                           {"token_imbalance", L.token_imbalance},
                           {"expert_load_imbalance", L.expert_load_imbalance},
                           {"lookback_confidence", L.lookback_confidence}};
    layers.emplace_back(std::move(o));
  }
  detail::json::object doc{{"format", plan_format}, {"layers", plan.layers},  {"experts", plan.experts},
                           {"ranks", plan.ranks},   {"replicas_per_rank", plan.replicas_per_rank},
                           {"theta", plan.theta},   {"solver", plan.solver},
                           {"per_layer", value(std::move(layers))}};
  detail::json::write_file(path, value(std::move(doc)));
}

/// Reads and checks a plan written by write_plan (or by hand).
inline speculative_plan read_plan(std::filesystem::path const& path) {
  std::string const file = path.string();
  auto const doc = detail::json::read_file(path, plan_format);
  speculative_plan p;
  p.layers = static_cast<int>(doc.at("layers", file).as_int(file + ": layers"));
  p.experts = static_cast<int>(doc.at("experts", file).as_int(file + ": experts"));
  p.ranks = static_cast<int>(doc.at("ranks", file).as_int(file + ": ranks"));
  if (auto const* t = doc.find("theta")) p.theta = t->as_double(file + ": theta");
  if (auto const* r = doc.find("replicas_per_rank")) p.replicas_per_rank = static_cast<int>(r->as_int(file + ": replicas_per_rank"));
  if (auto const* s = doc.find("solver")) p.solver = s->as_string(file + ": solver");
  using plan_detail::from_json;
  for (auto const& Lj : doc.at("per_layer", file).as_array(file + ": per_layer")) {
    std::string const what = file + ": layer " + std::to_string(p.per_layer.size());
    plan_layer L;
    L.expert_rank = from_json<int>(Lj.at("expert_rank", what), what + ".expert_rank");
    if (auto const* reps = Lj.find("replicas")) {
      for (auto const& pair : reps->as_array(what + ".replicas")) {
        auto const ints = from_json<int>(pair, what + ".replicas");
        SPECMOE_EXPECTS(ints.size() == 2, errc::io, what, ".replicas: each entry must be [expert, rank]");
        L.replicas.emplace_back(ints[0], ints[1]);
      }
    }
    L.token_ids = from_json<std::int32_t>(Lj.at("token_ids", what), what + ".token_ids");
    L.token_rank = from_json<int>(Lj.at("token_rank", what), what + ".token_rank");
    L.token_confidence = from_json<float>(Lj.at("token_confidence", what), what + ".token_confidence");
    L.ngram_rank = from_json<int>(Lj.at("ngram_rank", what), what + ".ngram_rank");
    L.ngram_confidence = from_json<float>(Lj.at("ngram_confidence", what), what + ".ngram_confidence");
    if (auto const* v = Lj.find("remote_share")) L.remote_share = v->as_double(what);
    if (auto const* v = Lj.find("token_imbalance")) L.token_imbalance = v->as_double(what);
    if (auto const* v = Lj.find("expert_load_imbalance")) L.expert_load_imbalance = v->as_double(what);
    if (auto const* v = Lj.find("lookback_confidence")) L.lookback_confidence = v->as_double(what);
    p.per_layer.push_back(std::move(L));
  }
  validate_plan(p, file);
  return p;
}

}  // namespace specmoe::grouping
