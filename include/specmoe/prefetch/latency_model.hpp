// specmoe/prefetch/latency_model.hpp: SP-MoE's analytical latency model and the cutoff it picks.
//
// One speculative-decoding step = gamma draft passes, then one verification of gamma + 1 tokens
// through every target layer. The model follows expected counts along that timeline (a fluid
// model: fractions of experts, not samples):
//   - during draft pass j, when draft layer l finishes, the draft's prediction for target layer l
//     is read back and queued on the link if l < cutoff (FIFO, one copy at a time, t_io per
//     expert); each read-back costs the pass draft_readback_us;
//   - verification layer l: attention, then the gate; the layer needs u experts, a share h of them
//     already resident; of the rest, the share the draft predicted (accuracy a_l) comes from the
//     prefetch queue (whatever has not crossed yet is taken over by the demand path), the others
//     are demand loads. Demand copies go ahead of queued prefetches but wait for the copy in
//     flight (half a copy, expected). The experts compute once all have arrived.
//   - over-fetch: prefetches only help while they fit in the cache's room, the slots whose experts
//     would not be hit anyway. In a warm cache under a frequency order that room is about one
//     layer's demand loads (the other slots hold the hot set). Past it, a cache that protects the
//     step's predictions (protect_predicted) displaces residents that would have been hit, each
//     costing a later demand copy with the probability that it is used (`displaced_use`); one
//     that does not protect them loses the step's own earlier prefetches, evicted by the later ones
//     (usually while still queued: no link time, no gain). Deeper cutoffs then lose or stay level: with the link time that late prefetches
//     take from demand loads, this gives the U-shaped curve the paper reports. (Before the room
//     was the free slots, C - u, the model expected deeper cutoffs to win where an H100 measured a
//     4-16% loss, 2026-12-07.)
// TPOT = step time / expected tokens per step (1 + accepted drafts).
//
// The event-driven simulator (offload/offload_sim.hpp) replays real routing through the real
// cache book on the same link rules; benchmarks show the model's curve beside it and beside the
// GPU's measured one.
#pragma once

#include <specmoe/core/error.hpp>
#include <specmoe/prefetch/offload_profile.hpp>
#include <specmoe/trace/routing_trace.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace specmoe::prefetch {

/// @brief What the model needs beyond the profile: the cache and the resident share.
struct model_options {
  int cache_experts = 0;        ///< GPU slots for routed experts, over all layers
  double resident_hit = -1;     ///< share of needed experts resident without prefetch; < 0: estimate
                                ///< min(1, cache_experts / (layers * experts))
  bool protects = true;         ///< the cache keeps the step's predictions (protect_predicted)
  double room = -1;             ///< slots a step's prefetches may fill without displacing an expert
                                ///< that would be hit; < 0: one layer's demand loads, u (1 - h)
  int inflight_copies = 1;      ///< copies the prefetcher commits to the link at once (a demand load
                                ///< waits for them): prefetcher_config's min(max_batch,
                                ///< max_inflight_bytes / expert bytes) x max_inflight_batches
  double displaced_use = -1;    ///< expected uses in later steps of a resident displaced by an
                                ///< over-fetch (protects only); < 0: half the average resident's
                                ///< hits per step, h u layers / (2 cache_experts): the displaced are
                                ///< the least used residents
};

/// @brief The model's breakdown of one step at one cutoff.
struct step_estimate {
  int cutoff = 0;
  double step_us = 0;           ///< draft + verification
  double tpot_us = 0;           ///< step_us / expected tokens per step
  double stall_us = 0;          ///< verification time spent waiting for experts
  double prefetched = 0;        ///< expert copies issued speculatively per step
  double demand = 0;            ///< demand copies per step
  double covered = 0;           ///< needed experts served by a prefetch (or resident) per step
  double needed = 0;            ///< needed experts per step (distinct per layer, summed)
};

/// Expected distinct experts among `tokens` tokens of top_k each out of `experts` (independent, uniform).
[[nodiscard]] inline double expected_distinct(int experts, int top_k, int tokens) {
  if (tokens <= 0) return 0.0;
  return experts * (1.0 - std::pow(1.0 - static_cast<double>(top_k) / experts, tokens));
}

/// Expected tokens one step produces: accepted drafts (each accepted with probability a, until
/// the first rejection) plus the target's own token.
[[nodiscard]] inline double tokens_per_step(int gamma, double acceptance) {
  double t = 1.0, run = 1.0;
  for (int i = 0; i < gamma; ++i) {
    run *= acceptance;
    t += run;
  }
  return t;
}

/// @brief The model at one cutoff (0 = on demand, profile.layers = every layer).
[[nodiscard]] inline step_estimate estimate_step(offload_profile const& p, int cutoff, model_options const& o) {
  validate_profile(p);
  SPECMOE_EXPECTS(cutoff >= 0 && cutoff <= p.layers, errc::invalid_argument, "estimate_step: cutoff ", cutoff,
                  " outside [0, ", p.layers, "]");
  double const u = expected_distinct(p.experts, p.top_k, p.gamma + 1);  // needed per layer
  SPECMOE_EXPECTS(o.cache_experts >= static_cast<int>(std::ceil(u - 1e-9)) && o.cache_experts >= p.top_k, errc::invalid_argument,
                  "estimate_step: ", o.cache_experts, " cache slots cannot hold one layer's ", u,
                  " experts of a verification (at least top_k = ", p.top_k, ")");
  double const total = static_cast<double>(p.layers) * p.experts;
  double const h = o.resident_hit >= 0 ? std::min(1.0, o.resident_hit) : std::min(1.0, o.cache_experts / total);
  double const t_io = p.expert_copy_us();

  // Prefetch volume per layer: the distinct predictions of the gamma drafted inputs, less what is
  // resident; pass j adds the experts its token names that earlier passes did not.
  std::vector<double> copies(static_cast<std::size_t>(p.layers), 0.0);
  std::vector<double> keep(static_cast<std::size_t>(p.layers), 1.0);  // share of a layer's prefetch still cached at use
  double prefetched = 0;
  for (int l = 0; l < cutoff; ++l) {
    copies[static_cast<std::size_t>(l)] = expected_distinct(p.experts, p.top_k, p.gamma) * (1.0 - h);
    prefetched += copies[static_cast<std::size_t>(l)];
  }
  // Over-fetch past the room (see the header): displaced residents come back as demand copies
  // spread over the layers, or (no protection) the earliest prefetches are lost before use.
  // Whatever the policy, no more than the slots beside the computing layer's (C - u) can wait.
  double const capacity = std::max(0.0, o.cache_experts - u);
  double const room = std::min(capacity, o.room >= 0 ? o.room : u * (1.0 - h));
  double displaced_demand = 0;  // per layer
  if (o.protects) {
    double const q = o.displaced_use >= 0 ? o.displaced_use
                                          : std::min(1.0, h * u * p.layers / (2.0 * std::max(1, o.cache_experts)));
    displaced_demand = std::max(0.0, std::min(prefetched, capacity) - room) * q / p.layers;
  }
  double excess = std::max(0.0, prefetched - (o.protects ? capacity : room));
  for (int l = 0; l < cutoff && excess > 0; ++l) {
    double const lost = std::min(excess, copies[static_cast<std::size_t>(l)]);
    keep[static_cast<std::size_t>(l)] = copies[static_cast<std::size_t>(l)] > 0 ? 1.0 - lost / copies[static_cast<std::size_t>(l)] : 1.0;
    excess -= lost;
  }

  // The link: FIFO batches of prefetches (layer, amount, issue time), served one expert at a time.
  struct batch {
    int layer;
    double amount;
    double issue;
  };
  std::vector<batch> queue;
  for (int j = 0; j < p.gamma; ++j) {
    for (int l = 0; l < cutoff; ++l) {
      double const share = expected_distinct(p.experts, p.top_k, j + 1) - expected_distinct(p.experts, p.top_k, j);
      double const amount = share * (1.0 - h) * keep[static_cast<std::size_t>(l)];  // a lost one is evicted while queued: never crosses
      double const issue = j * (p.draft_pass_us + cutoff * p.draft_readback_us) + (l + 1.0) / p.layers * p.draft_pass_us +
                           (l + 1) * p.draft_readback_us;
      if (amount > 0) queue.push_back({l, amount, issue});
    }
  }
  std::size_t head = 0;
  double link = 0;                         // when the link is next free
  std::vector<double> done(static_cast<std::size_t>(p.layers), 0.0);      // when each layer's prefetches landed
  std::vector<double> remaining(static_cast<std::size_t>(p.layers), 0.0);  // prefetch copies not yet crossed
  for (auto const& b : queue) remaining[static_cast<std::size_t>(b.layer)] += b.amount;
  auto serve_until = [&](double t) {  // runs queued prefetches that can start before t
    while (head < queue.size()) {
      auto& b = queue[head];
      double const start = std::max(link, b.issue);
      if (start >= t) break;
      double const can = std::max(0.0, (t - start) / t_io);
      // whole batches start before t: a batch, once issued, cannot be overtaken by a demand load
      double const batch = std::max(1, o.inflight_copies);
      double const take = std::min(b.amount, std::ceil(can / batch) * batch);
      link = start + take * t_io;
      b.amount -= take;
      remaining[static_cast<std::size_t>(b.layer)] -= take;
      done[static_cast<std::size_t>(b.layer)] = link;
      if (b.amount > 1e-12) break;
      ++head;
    }
  };

  step_estimate est;
  est.cutoff = cutoff;
  est.prefetched = prefetched;
  double t = p.gamma * (p.draft_pass_us + cutoff * p.draft_readback_us);
  for (int l = 0; l < p.layers; ++l) {
    auto const L = static_cast<std::size_t>(l);
    t += p.attn_us[L];
    serve_until(t);
    double const missing = u * (1.0 - h);
    // the gamma drafted inputs name the experts of gamma of the gamma + 1 verified positions: at
    // most the share `named` of the layer's distinct experts, each right with the draft's accuracy
    double const named = expected_distinct(p.experts, p.top_k, p.gamma) / u;
    double const predicted = l < cutoff ? std::min(1.0, p.accuracy[L]) * std::min(1.0, named) * keep[L] : 0.0;
    double demand = missing * (1.0 - predicted) + displaced_demand;
    double ready = t;
    if (l < cutoff) {
      // prefetches of this layer still queued are taken over by the demand path
      double const late = std::max(0.0, remaining[L]) * std::min(1.0, p.accuracy[L]);
      demand += late;
      if (remaining[L] <= 1e-12) ready = std::max(ready, done[L]);
      for (std::size_t q = head; q < queue.size(); ++q) {
        if (queue[q].layer == l) queue[q].amount = 0;
      }
      remaining[L] = 0;
    }
    if (demand > 1e-12) {
      double const inflight = link > t ? link - t : 0.0;  // the copies already on the link finish first (no double booking)
      double const end = t + inflight + p.copy_latency_us + demand * (t_io - p.copy_latency_us);
      link = std::max(link, end);
      ready = std::max(ready, end);
    }
    est.demand += demand;
    est.needed += u;
    est.covered += u - demand;
    est.stall_us += ready - t;
    t = ready + p.moe_us[L];
  }
  est.step_us = t;
  est.tpot_us = t / tokens_per_step(p.gamma, p.acceptance);
  return est;
}

/// @brief The model's TPOT for every cutoff 0 .. layers, and the best.
struct cutoff_choice {
  int cutoff = 0;
  std::vector<step_estimate> curve;  ///< [layers + 1], index = cutoff
  [[nodiscard]] step_estimate const& best() const { return curve[static_cast<std::size_t>(cutoff)]; }
};

/// @brief Picks the shallowest cutoff whose modelled TPOT is within `tolerance` of the lowest.
/// A deeper cutoff moves more bytes and displaces more residents for a gain smaller than the
/// model can resolve: on an H100 and an H200 the measured curves rose 4-16% from the best
/// cutoff to the deepest where the model's were flat to 1% (docs/benchmarks.md, issue 7).
[[nodiscard]] inline cutoff_choice choose_cutoff(offload_profile const& p, model_options const& o, double tolerance = 0.01) {
  SPECMOE_EXPECTS(std::isfinite(tolerance) && tolerance >= 0 && tolerance < 1, errc::invalid_argument, "choose_cutoff: tolerance ",
                  tolerance, " must lie in [0, 1)");
  cutoff_choice c;
  double best = std::numeric_limits<double>::infinity();
  for (int L = 0; L <= p.layers; ++L) {
    c.curve.push_back(estimate_step(p, L, o));
    best = std::min(best, c.curve.back().tpot_us);
  }
  for (int L = 0; L <= p.layers; ++L) {
    if (c.curve[static_cast<std::size_t>(L)].tpot_us <= best * (1.0 + tolerance) * (1.0 + 1e-12)) {
      c.cutoff = L;
      break;
    }
  }
  return c;
}

/// @brief Per target layer: the share of a verification's experts (gamma + 1 consecutive
/// positions of one request) that the draft's routing named for the first gamma of them (the
/// draft has seen those inputs; the last drafted token it has not). The profile's `accuracy`.
/// Draft layer d predicts target layer d * layers / draft.layers (the trace's convention).
/// @throw specmoe::error invalid_argument when the trace carries no draft routing.
[[nodiscard]] inline std::vector<double> draft_accuracy(trace::routing_trace const& tr, int gamma, std::int64_t max_steps = 4096) {
  SPECMOE_EXPECTS(tr.meta.draft.has_value(), errc::invalid_argument,
                  "draft_accuracy: the trace has no draft routing (draft_topk_ids.npy)");
  SPECMOE_EXPECTS(gamma >= 1, errc::invalid_argument, "draft_accuracy: gamma must be >= 1, got ", gamma);
  auto const& m = tr.meta;
  auto const& d = *m.draft;
  int const L = m.layers, k = m.top_k, dk = d.top_k;
  std::vector<int> draft_of(static_cast<std::size_t>(L), -1);  // target layer -> draft layer predicting it
  for (int dl = 0; dl < d.layers; ++dl) {
    draft_of[static_cast<std::size_t>(static_cast<std::int64_t>(dl) * L / d.layers)] = dl;
  }
  std::vector<double> hit(static_cast<std::size_t>(L), 0.0), need(static_cast<std::size_t>(L), 0.0);
  std::vector<char> named(static_cast<std::size_t>(m.experts)), used(static_cast<std::size_t>(m.experts));
  std::int64_t steps = 0;
  for (auto const& [b, e] : m.sequences) {
    for (std::int64_t p = b; p + gamma < e && steps < max_steps; p += gamma + 1, ++steps) {
      for (int l = 0; l < L; ++l) {
        std::fill(named.begin(), named.end(), 0);
        std::fill(used.begin(), used.end(), 0);
        int const dl = draft_of[static_cast<std::size_t>(l)];
        for (int j = 0; j < gamma && dl >= 0; ++j) {
          for (int s = 0; s < dk; ++s) {
            auto const x = tr.draft_topk_ids[static_cast<std::size_t>((static_cast<std::int64_t>(dl) * m.tokens + p + j) * dk + s)];
            if (x >= 0) named[static_cast<std::size_t>(x)] = 1;
          }
        }
        for (int j = 0; j <= gamma; ++j) {
          for (int s = 0; s < k; ++s) {
            auto const x = tr.topk_ids[static_cast<std::size_t>((static_cast<std::int64_t>(l) * m.tokens + p + j) * k + s)];
            if (x >= 0 && !used[static_cast<std::size_t>(x)]) {
              used[static_cast<std::size_t>(x)] = 1;
              need[static_cast<std::size_t>(l)] += 1;
              hit[static_cast<std::size_t>(l)] += named[static_cast<std::size_t>(x)];
            }
          }
        }
      }
    }
  }
  std::vector<double> acc(static_cast<std::size_t>(L), 0.0);
  for (int l = 0; l < L; ++l) acc[static_cast<std::size_t>(l)] = need[static_cast<std::size_t>(l)] > 0 ? hit[static_cast<std::size_t>(l)] / need[static_cast<std::size_t>(l)] : 0.0;
  return acc;
}

}  // namespace specmoe::prefetch
