// specmoe/offload/offload_sim.hpp: SP-MoE replayed on a timeline, on the host (issue 7).
//
// Replays a routing trace with draft routing (../shared/TRACES.md) through the expert cache book
// (offload/expert_cache.hpp), a prefetch queue and a PrefetchDepth policy, on a timeline whose
// times come from an offload_profile (measured on the GPU, or defaults). Users size their GPU
// cache with it (`specmoe-sim --offload`); the cutoff policy is checked against its sweep.
//
// One step of speculative decoding at position p of a request:
//   draft:        gamma passes; pass j reads input p + j; when its layer l finishes (at
//                 (j + (l + 1) / layers) * draft_pass_us) the draft's routing of position p + j at
//                 layer l is known, and is queued for prefetch if the depth policy allows target
//                 layer l from the draft phase; each layer read back below the cutoff adds the
//                 profile's draft_readback_us to the pass. (The last drafted token, p + gamma, is never read
//                 by the draft: its experts have no prediction.)
//   verification: positions p .. p + gamma, layer by layer: attention, gate, then every distinct
//                 expert the layer needs must be resident: a queued prefetch not yet on the link is
//                 taken over by the demand path; a missing expert is a demand load. Demand copies
//                 go before queued prefetches but after the copy in flight. Then the experts.
//   tokens:       each draft is accepted with the profile's probability until the first rejection;
//                 the step produces accepted + 1 tokens (seeded: every mode sees the same ones).
// The link carries one copy at a time (t_io = copy_latency_us + expert_bytes / link bandwidth,
// the latency paid again whenever the link was idle).
//
// `lossless`: the first `check_steps` steps also compute every layer's output from the bytes the
// simulated slots hold at the moment of use (small random experts), and compare it bit for bit
// with all experts resident; a slot read before its copy landed, or holding another expert,
// fails the check.
#pragma once

#include <specmoe/core/error.hpp>
#include <specmoe/core/expert_weights.hpp>
#include <specmoe/layer/dense_reference.hpp>
#include <specmoe/offload/expert_cache.hpp>
#include <specmoe/prefetch/depth_policies.hpp>
#include <specmoe/prefetch/latency_model.hpp>
#include <specmoe/prefetch/offload_profile.hpp>
#include <specmoe/synthetic/random_layer.hpp>
#include <specmoe/trace/routing_trace.hpp>

#include <algorithm>
#include <cstdint>
#include <deque>
#include <random>
#include <string>
#include <vector>

namespace specmoe::offload {

/// Where predictions come from.
enum class sim_predictor {
  none,       ///< on demand only
  draft,      ///< SP-MoE: the draft's routing (the trace's draft_topk_ids), during drafting
  lookahead,  ///< the look-ahead gate of earlier offloaders: during layer l, layer l + d's experts
              ///< (the truth, each slot kept with probability lookahead_accuracy, else a random expert)
  oracle      ///< the verification's exact experts, during drafting (upper bound)
};
/// Replacement policy of the cache book.
enum class sim_replacement { lru, lfu, protect, protect_lfu, frequency, protect_frequency };

struct offload_sim_options {
  int cache_experts = 0;          ///< GPU slots for routed experts, over all layers
  sim_predictor predictor = sim_predictor::draft;
  int cutoff = -1;                ///< draft / oracle: prefetch target layers < cutoff; -1: the latency model's choice
  int lookahead_depth = 1;        ///< lookahead: layers ahead
  double lookahead_accuracy = 0.7;
  sim_replacement replacement = sim_replacement::frequency;  // as specmoe-sim's default
  std::int64_t max_steps = 2000;  ///< steps replayed (over the trace's requests, in order)
  std::uint64_t seed = 1;
  int check_steps = 4;            ///< steps whose outputs are computed and compared (0: none)
  int check_hidden = 16;          ///< hidden = ffn size of the experts in that check
  double resident_hit = -1;       ///< for the latency model's cutoff: the on-demand run's cache hit
                                  ///< rate (measured); < 0: estimated from the cache size
};

struct offload_sim_result {
  double tpot_us = 0;             ///< time per output token
  double step_us = 0;             ///< mean step time
  double stall_us = 0;            ///< mean verification time waiting for experts, per step
  double prefetch_hit_rate = 0;   ///< needed experts found resident or on their way (no demand load)
  double cache_hit_rate = 0;      ///< needed experts resident and landed at the gate
  double prediction_recall = 0;   ///< needed experts that the predictor named
  std::int64_t steps = 0, tokens = 0;
  std::int64_t needed = 0, demand_copies = 0, speculative_copies = 0, stolen = 0, wasted_prefetches = 0;
  int cutoff = 0;
  bool lossless = true;
  std::string lossless_detail;    ///< what failed, when lossless is false
};

namespace sim_detail {

/// Random experts (hidden = ffn = h) per (layer, expert) and per-layer inputs, for the bit check.
struct check_model {
  int h = 0;
  std::vector<std::vector<float>> experts;  // [layer * E + e] gate, up, down ([h, h] each)
  [[nodiscard]] ffn_weights<float> view(float const* p) const {
    auto const n = static_cast<std::int64_t>(h) * h;
    return ffn_weights<float>::dense(p, p + n, p + 2 * n, 1, h, h);
  }
};

struct pending_copy {
  expert_key key;
  int slot = -1;
  double issue = 0;
  bool cancelled = false;
};

}  // namespace sim_detail

/// @brief Replays `tr` (which must carry draft routing for sim_predictor::draft) on the timeline.
/// @throw specmoe::error invalid_argument on a profile that disagrees with the trace, a cache too
///        small for one layer of a verification, or a missing draft routing.
template <replacement_policy Policy>
offload_sim_result simulate_offload(trace::routing_trace const& tr, prefetch::offload_profile const& prof, offload_sim_options const& o) {
  prefetch::validate_profile(prof);
  auto const& m = tr.meta;
  int const L = m.layers, E = m.experts, k = m.top_k, gamma = prof.gamma;
  SPECMOE_EXPECTS(prof.layers == L && prof.experts == E && prof.top_k == k, errc::invalid_argument, "offload profile (",
                  prof.layers, " layers, ", prof.experts, " experts, top_k ", prof.top_k, ") does not match the trace (", L,
                  ", ", E, ", ", k, ")");
  SPECMOE_EXPECTS(o.predictor != sim_predictor::draft || m.draft.has_value(), errc::invalid_argument,
                  "the draft predictor needs a trace with draft routing (draft_topk_ids.npy)");
  int const per_layer = std::min(E, (gamma + 1) * k);  // most distinct experts one layer of a verification reads
  SPECMOE_EXPECTS(o.cache_experts >= per_layer, errc::invalid_argument, "cache of ", o.cache_experts,
                  " experts cannot hold one layer's ", per_layer, " experts of a verification of ", gamma + 1,
                  " tokens (top_k ", k, "); give at least ", per_layer);
  SPECMOE_EXPECTS(o.lookahead_accuracy >= 0 && o.lookahead_accuracy <= 1 && o.lookahead_depth >= 1, errc::invalid_argument,
                  "lookahead_accuracy must lie in [0, 1] and lookahead_depth be >= 1");
  SPECMOE_EXPECTS(o.cutoff >= -1 && o.cutoff <= L, errc::invalid_argument, "cutoff ", o.cutoff, " outside [-1, ", L, "]");

  offload_sim_result r;
  r.cutoff = o.predictor == sim_predictor::draft || o.predictor == sim_predictor::oracle ? (o.cutoff < 0 ? L : o.cutoff) : 0;
  if ((o.predictor == sim_predictor::draft || o.predictor == sim_predictor::oracle) && o.cutoff < 0) {
    r.cutoff = prefetch::choose_cutoff(prof, {.cache_experts = o.cache_experts, .resident_hit = o.resident_hit, .protects = Policy::protects}).cutoff;
  }
  prefetch::cutoff_layer const draft_depth(r.cutoff);
  // the draft's routing is read back after each layer below the cutoff (the oracle needs none)
  int const read_back = o.predictor == sim_predictor::draft ? r.cutoff : 0;
  double const draft_pass = prof.draft_pass_us + read_back * prof.draft_readback_us;
  prefetch::fixed_depth const look_depth(o.lookahead_depth);

  expert_cache<Policy> cache(L, E, o.cache_experts, per_layer);
  double const t_io = prof.expert_bytes / prof.link_bytes_per_us;
  std::deque<sim_detail::pending_copy> queue;
  std::vector<double> arrival(static_cast<std::size_t>(L) * E, 0.0);  // when a resident expert's bytes landed
  double link = 0;
  auto key_index = [E](expert_key kk) { return static_cast<std::size_t>(kk.layer) * E + static_cast<std::size_t>(kk.expert); };

  // bit check state: what each slot holds (which expert's bytes, landed when)
  sim_detail::check_model chk;
  std::vector<expert_key> slot_bytes(static_cast<std::size_t>(o.cache_experts), expert_key{-1, -1});
  if (o.check_steps > 0) {
    chk.h = o.check_hidden;
    auto const n = static_cast<std::size_t>(3 * chk.h * chk.h);
    chk.experts.resize(static_cast<std::size_t>(L) * E);
    for (std::size_t i = 0; i < chk.experts.size(); ++i) {
      chk.experts[i] = synthetic::uniform<float>(n, 1.0f / static_cast<float>(chk.h), o.seed * 1000003u + i);
    }
  }

  auto land = [&](sim_detail::pending_copy const& c) {  // the copy's bytes reach the slot
    double const start = std::max(link, c.issue);
    link = (start > link ? start + prof.copy_latency_us : start) + t_io;
    arrival[key_index(c.key)] = link;
    slot_bytes[static_cast<std::size_t>(c.slot)] = c.key;
  };
  auto serve_until = [&](double t) {  // prefetches that start before t
    while (!queue.empty()) {
      auto const& c = queue.front();
      if (c.cancelled) {
        queue.pop_front();
        continue;
      }
      if (std::max(link, c.issue) >= t) break;
      land(c);
      queue.pop_front();
    }
  };
  auto forget = [&](std::optional<expert_key> ev) {  // an evicted expert's queued copy is dropped
    if (!ev) return;
    for (auto& c : queue) {
      if (c.key == *ev) c.cancelled = true;
    }
  };
  auto prefetch = [&](expert_key kk, double t) {
    if (cache.resident(kk)) return;
    auto const a = cache.admit(kk, /*speculative=*/true);
    if (!a) return;
    forget(a->evicted);
    queue.push_back({kk, a->slot, t, false});
    ++r.speculative_copies;
  };

  std::mt19937_64 accept_rng(o.seed), guess_rng(o.seed ^ 0x9e3779b97f4a7c15ull);  // apart: every mode accepts the same drafts
  std::bernoulli_distribution accept(prof.acceptance), keep_guess(o.lookahead_accuracy);
  std::uniform_int_distribution<int> any_expert(0, E - 1);
  std::vector<char> named(static_cast<std::size_t>(L) * E, 0);
  std::vector<expert_key> protect;
  std::vector<int> needed;
  std::int64_t named_hits = 0;
  double clock = 0;
  auto const& draft = m.draft;
  int const dk = draft ? draft->top_k : 0;

  for (auto const& [seq_begin, seq_end] : m.sequences) {
    for (std::int64_t p = seq_begin; p + gamma < seq_end && r.steps < o.max_steps;) {
      double const t0 = clock;
      std::fill(named.begin(), named.end(), 0);
      protect.clear();
      if constexpr (Policy::protects) cache.protect(protect);  // the last step's guesses are free game
      // --- draft phase: predictions queued as the draft's layers finish
      if (o.predictor == sim_predictor::draft || o.predictor == sim_predictor::oracle) {
        for (int j = 0; j < gamma; ++j) {
          for (int l = 0; l < L; ++l) {
            double const t = t0 + j * draft_pass + (l + 1.0) / L * prof.draft_pass_us + std::min(l + 1, read_back) * prof.draft_readback_us;
            auto name = [&](int e) {
              if (e < 0 || named[static_cast<std::size_t>(l) * E + e]) return;
              named[static_cast<std::size_t>(l) * E + e] = 1;
              protect.push_back({l, e});
              // protected before it is admitted: otherwise the step's own prefetches, cold experts
              // with the lowest scores, evict each other before verification reads them
              if constexpr (Policy::protects) cache.protect(protect);
              if (prefetch::may_prefetch(draft_depth, -1, l)) prefetch({l, e}, t);
            };
            if (o.predictor == sim_predictor::draft) {
              // draft layer dl predicts target layer dl * L / draft.layers
              for (int dl = 0; dl < draft->layers; ++dl) {
                if (static_cast<std::int64_t>(dl) * L / draft->layers != l) continue;
                for (int s = 0; s < dk; ++s) {
                  name(tr.draft_topk_ids[static_cast<std::size_t>((static_cast<std::int64_t>(dl) * m.tokens + p + j) * dk + s)]);
                }
              }
            } else if (j == 0) {  // oracle: the whole verification, known at once
              for (int jj = 0; jj <= gamma; ++jj) {
                for (int s = 0; s < k; ++s) name(tr.id(l, p + jj, s));
              }
            }
          }
        }
      }
      // --- verification
      double t = t0 + gamma * draft_pass;
      for (int l = 0; l < L; ++l) {
        t += prof.attn_us[static_cast<std::size_t>(l)];
        serve_until(t);
        needed.clear();
        for (int j = 0; j <= gamma; ++j) {
          for (int s = 0; s < k; ++s) {
            int const e = tr.id(l, p + j, s);
            if (e >= 0 && std::find(needed.begin(), needed.end(), e) == needed.end()) needed.push_back(e);
          }
        }
        double ready = t;
        std::vector<expert_key> demand;
        for (int e : needed) {
          expert_key const kk{l, e};
          ++r.needed;
          named_hits += named[key_index(kk)];
          bool const hit = cache.use(kk);
          if (hit) {
            // landed, in flight, or still queued (then the demand path takes it over)
            auto it = std::find_if(queue.begin(), queue.end(), [&](auto const& c) { return !c.cancelled && c.key == kk; });
            if (it != queue.end()) {
              it->cancelled = true;
              ++r.stolen;
              demand.push_back(kk);
            } else {
              ready = std::max(ready, arrival[key_index(kk)]);
              if (arrival[key_index(kk)] <= t) ++r.cache_hit_rate;  // counted, normalised below
              ++r.prefetch_hit_rate;
            }
          } else {
            auto const a = cache.admit(kk, /*speculative=*/false);
            SPECMOE_EXPECTS(a.has_value(), errc::internal, "offload sim: no evictable slot for a demand load");
            forget(a->evicted);
            demand.push_back(kk);
          }
          cache.pin(kk);
        }
        if (!demand.empty()) {
          double start = std::max(t, link);  // after the copy in flight
          start += prof.copy_latency_us;
          for (auto kk : demand) {
            start += t_io;
            arrival[key_index(kk)] = start;
            slot_bytes[static_cast<std::size_t>(cache.slot_of(kk))] = kk;
            ++r.demand_copies;
          }
          link = start;
          ready = std::max(ready, start);
        }
        if (o.predictor == sim_predictor::lookahead) {  // after this layer's demand loads: its state predicts layers l+1 .. l+d
          for (int ahead = l + 1; ahead < L && prefetch::may_prefetch(look_depth, l, ahead); ++ahead) {
            for (int j = 0; j <= gamma; ++j) {
              for (int s = 0; s < k; ++s) {
                int const e = keep_guess(guess_rng) ? tr.id(ahead, p + j, s) : any_expert(guess_rng);
                if (e < 0) continue;
                named[static_cast<std::size_t>(ahead) * E + e] = 1;
                if constexpr (Policy::protects) {  // the same protection as the draft's guesses
                  protect.push_back({ahead, e});
                  cache.protect(protect);
                }
                prefetch({ahead, e}, t);
              }
            }
          }
        }
        // the bit check: the layer computed from what its slots hold when it runs
        if (r.steps < o.check_steps && r.lossless) {
          std::vector<float> x(static_cast<std::size_t>((gamma + 1) * chk.h));
          auto const xs = synthetic::uniform<float>(x.size(), 1.0f, o.seed + static_cast<std::uint64_t>(r.steps * L + l));
          std::copy(xs.begin(), xs.end(), x.begin());
          std::vector<std::int32_t> ids;
          std::vector<float> w;
          for (int j = 0; j <= gamma; ++j) {
            for (int s = 0; s < k; ++s) {
              ids.push_back(tr.id(l, p + j, s));
              w.push_back(1.0f / static_cast<float>(k));
            }
          }
          std::vector<float> y(static_cast<std::size_t>(chk.h));
          for (int j = 0; j <= gamma && r.lossless; ++j) {
            std::vector<float> acc(static_cast<std::size_t>(chk.h), 0.0f), accw(acc.size(), 0.0f);
            for (int s = 0; s < k; ++s) {
              int const e = ids[static_cast<std::size_t>(j * k + s)];
              if (e < 0) continue;
              expert_key const kk{l, e};
              int const slot = cache.slot_of(kk);
              expert_key const held = slot >= 0 ? slot_bytes[static_cast<std::size_t>(slot)] : expert_key{-1, -1};
              if (held.layer < 0 || arrival[key_index(held)] > ready) {
                r.lossless = false;
                r.lossless_detail = "layer " + std::to_string(l) + " expert " + std::to_string(e) +
                                    " read from a slot whose bytes had not landed";
                break;
              }
              // computed from whatever bytes the slot holds: a wrong expert shows in the output
              auto const& bytes = chk.experts[key_index(held)];
              detail::host::swiglu_expert(x.data() + j * chk.h, 1, chk.view(bytes.data()), 0, y.data());
              for (int h = 0; h < chk.h; ++h) acc[static_cast<std::size_t>(h)] = acc[static_cast<std::size_t>(h)] + w[static_cast<std::size_t>(j * k + s)] * y[static_cast<std::size_t>(h)];
              auto const& truth = chk.experts[key_index(kk)];
              detail::host::swiglu_expert(x.data() + j * chk.h, 1, chk.view(truth.data()), 0, y.data());
              for (int h = 0; h < chk.h; ++h) accw[static_cast<std::size_t>(h)] = accw[static_cast<std::size_t>(h)] + w[static_cast<std::size_t>(j * k + s)] * y[static_cast<std::size_t>(h)];
            }
            if (r.lossless && acc != accw) {
              r.lossless = false;
              r.lossless_detail = "layer " + std::to_string(l) + " output differs from all-resident";
            }
          }
        }
        if constexpr (Policy::protects) {  // this layer has run: its guesses, right or wrong, need no slot any more
          auto const gone = std::remove_if(protect.begin(), protect.end(), [l](expert_key kk) { return kk.layer == l; });
          if (gone != protect.end()) {
            protect.erase(gone, protect.end());
            cache.protect(protect);
          }
        }
        r.stall_us += ready - t;
        t = ready + prof.moe_us[static_cast<std::size_t>(l)];
        for (int e : needed) cache.unpin({l, e});
      }
      serve_until(t);
      // --- tokens produced: accepted drafts + the target's own
      int produced = 1;
      for (int j = 0; j < gamma && accept(accept_rng); ++j) ++produced;
      r.tokens += produced;
      ++r.steps;
      p += produced;
      clock = t;
    }
  }
  SPECMOE_EXPECTS(r.steps > 0, errc::invalid_argument, "offload sim: no request of the trace is longer than gamma + 1 = ",
                  gamma + 1, " tokens");
  r.tpot_us = clock / static_cast<double>(r.tokens);
  r.step_us = clock / static_cast<double>(r.steps);
  r.stall_us /= static_cast<double>(r.steps);
  double const need = static_cast<double>(r.needed);
  r.cache_hit_rate /= need;
  r.prefetch_hit_rate /= need;
  r.prediction_recall = static_cast<double>(named_hits) / need;
  r.wasted_prefetches = cache.counters().wasted_prefetches;
  return r;
}

/// The same with the replacement chosen at run time.
inline offload_sim_result simulate_offload(trace::routing_trace const& tr, prefetch::offload_profile const& prof,
                                           offload_sim_options const& o) {
  switch (o.replacement) {
    case sim_replacement::lru: return simulate_offload<lru_replacement>(tr, prof, o);
    case sim_replacement::lfu: return simulate_offload<lfu_replacement>(tr, prof, o);
    case sim_replacement::protect_lfu: return simulate_offload<protect_predicted<lfu_replacement>>(tr, prof, o);
    case sim_replacement::frequency: return simulate_offload<frequency_replacement>(tr, prof, o);
    case sim_replacement::protect_frequency: return simulate_offload<protect_predicted<frequency_replacement>>(tr, prof, o);
    case sim_replacement::protect: break;
  }
  return simulate_offload<protect_predicted<lru_replacement>>(tr, prof, o);
}

}  // namespace specmoe::offload
