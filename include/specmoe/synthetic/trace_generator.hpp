// specmoe/synthetic/trace_generator.hpp: synthetic routing traces with the statistics that make
// Speculative MoE and SP-MoE work (or not), each a documented knob.
//
// The model behind a trace (all draws from one seed, deterministic):
//   - requests: `requests` sequences of lengths uniform in [min_request, max_request] (clipped to
//     `tokens` in total); token ids drawn from a Zipf(`token_zipf`) law over `vocab` ids;
//   - expert popularity: per layer, Zipf(`expert_zipf`) over a random permutation of the experts;
//   - token affinity: each (layer, token id) has a preferred top-k set, drawn by popularity. At each
//     occurrence, slot j keeps the j-th preferred expert with probability `affinity`, else it is
//     drawn by popularity (distinct within the token). Per-token "hottest top-k" F1 is about
//     `affinity` (published for real models: ~0.8);
//   - inter-layer correlation: layer l's preferred sets follow layer l-1's through a fixed random
//     expert map pi_l with probability `layer_correlation` per expert, so a placement that puts e
//     and pi_l(e) on one rank sees a token's rank repeat across layers (published 2-layer look-back
//     confidence ~0.7);
//   - weights: positive, in gate order (descending), summing to 1;
//   - topics (when `topics` > 0; off by default): the vocabulary splits into `topics` slices by
//     frequency rank, and each layer's experts into as many groups; a request draws one topic and
//     takes each token from its slice with probability `topic_share`; each of a token's preferred
//     slots comes from its slice's expert group with probability `topic_affinity` (else it follows
//     the previous layer or popularity, as without topics). Requests then have coherent expert usage (what data-parallel request
//     scheduling exploits), as domains do in real traffic;
//   - draft routing (SP-MoE, when `draft_layers` > 0): the draft's layer l predicts the target's
//     layer l * layers / draft_layers: each slot equals the target's with probability
//     `draft_agreement`, else a popularity draw.
#pragma once

#include <specmoe/core/error.hpp>
#include <specmoe/trace/routing_trace.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

namespace specmoe::synthetic {

/// Knobs of generate_trace; defaults follow the published statistics of real MoE models.
struct trace_params {
  int layers = 4;
  int experts = 64;
  int top_k = 8;
  std::int64_t tokens = 4096;
  int vocab = 32000;
  double token_zipf = 1.1;         ///< skew of token-id frequencies (natural text ~1.0-1.2)
  double expert_zipf = 0.8;        ///< skew of expert popularity within a layer (0 = uniform)
  double affinity = 0.8;           ///< share of a token's slots that go to its preferred experts
  double layer_correlation = 0.7;  ///< share of preferred experts that follow the previous layer's
  int requests = 16;
  std::int64_t min_request = 64, max_request = 512;
  int topics = 0;                  ///< > 0: requests of coherent topics (see above); 0 = none
  double topic_share = 0.8;        ///< share of a request's tokens from its topic's vocabulary slice
  double topic_affinity = 0.7;     ///< share of a topic token's preferred slots in its topic's experts
  int draft_layers = 0;            ///< > 0: also write draft routing (SP-MoE)
  double draft_agreement = 0.75;   ///< share of draft slots equal to the target's
  std::uint64_t seed = 1;         ///< the "model": popularity, preferred experts, layer maps
  std::uint64_t sample_seed = 0;  ///< the requests drawn from it (0: derived from seed); another
                                  ///< sample_seed with the same seed gives a held-out trace of the same model
  std::string model = "synthetic";
};

namespace trace_gen_detail {

/// Sampler of a Zipf(s) law over [0, n): P(i) ~ 1 / (i + 1)^s, by inverse CDF (binary search).
class zipf {
 public:
  zipf(int n, double s) : cdf_(static_cast<std::size_t>(n)) {
    double total = 0.0;
    for (int i = 0; i < n; ++i) cdf_[static_cast<std::size_t>(i)] = total += 1.0 / std::pow(i + 1.0, s);
    for (auto& c : cdf_) c /= total;
  }
  template <class Rng>
  int operator()(Rng& rng) const {
    double const u = std::uniform_real_distribution<double>(0.0, 1.0)(rng);
    auto const it = std::lower_bound(cdf_.begin(), cdf_.end(), u);
    return static_cast<int>(std::min<std::ptrdiff_t>(it - cdf_.begin(), static_cast<std::ptrdiff_t>(cdf_.size()) - 1));
  }

 private:
  std::vector<double> cdf_;
};

}  // namespace trace_gen_detail

/// A trace drawn from `p` (see the file comment), valid by construction (checked anyway).
/// @throw specmoe::error{invalid_argument} on parameters outside their domain.
inline trace::routing_trace generate_trace(trace_params const& p) {
  SPECMOE_EXPECTS(p.layers > 0 && p.experts > 0 && p.top_k > 0 && p.top_k <= p.experts && p.tokens >= 0 && p.vocab > 0,
                  errc::invalid_argument, "trace_params: layers, experts, top_k (<= experts), vocab must be positive, tokens >= 0");
  SPECMOE_EXPECTS(p.affinity >= 0 && p.affinity <= 1 && p.layer_correlation >= 0 && p.layer_correlation <= 1 &&
                      p.draft_agreement >= 0 && p.draft_agreement <= 1 && p.token_zipf >= 0 && p.expert_zipf >= 0,
                  errc::invalid_argument, "trace_params: affinity, layer_correlation, draft_agreement must lie in [0, 1], skews >= 0");
  SPECMOE_EXPECTS(p.topics >= 0 && p.topics <= std::min(p.experts, p.vocab) && p.topic_share >= 0 && p.topic_share <= 1 &&
                      p.topic_affinity >= 0 && p.topic_affinity <= 1,
                  errc::invalid_argument, "trace_params: topics must lie in [0, min(experts, vocab)], topic_share and topic_affinity in [0, 1]");
  SPECMOE_EXPECTS(p.requests > 0 && p.min_request > 0 && p.min_request <= p.max_request && p.draft_layers >= 0,
                  errc::invalid_argument, "trace_params: requests and request lengths must be positive, min <= max");
  std::mt19937_64 structure(p.seed);
  std::mt19937_64 rng(p.sample_seed ? p.sample_seed : p.seed * 0x9e3779b97f4a7c15ull + 1);
  int const E = p.experts, k = p.top_k, L = p.layers;
  trace::routing_trace tr;
  tr.meta.model = p.model;
  tr.meta.layers = L;
  tr.meta.experts = E;
  tr.meta.top_k = k;
  tr.meta.tokens = p.tokens;
  tr.meta.source = "specmoe::synthetic::generate_trace seed=" + std::to_string(p.seed) + " sample_seed=" + std::to_string(p.sample_seed) +
                   " affinity=" + std::to_string(p.affinity) +
                   " layer_correlation=" + std::to_string(p.layer_correlation) + " expert_zipf=" + std::to_string(p.expert_zipf) +
                   " token_zipf=" + std::to_string(p.token_zipf);

  // requests and token ids
  trace_gen_detail::zipf const token_law(p.vocab, p.token_zipf);
  std::vector<int> vocab_perm(static_cast<std::size_t>(p.vocab));  // which id is the i-th most frequent
  std::iota(vocab_perm.begin(), vocab_perm.end(), 0);
  std::shuffle(vocab_perm.begin(), vocab_perm.end(), structure);
  std::int64_t t0 = 0;
  for (int r = 0; r < p.requests && t0 < p.tokens; ++r) {
    std::int64_t len = std::uniform_int_distribution<std::int64_t>(p.min_request, p.max_request)(rng);
    if (r + 1 == p.requests) len = p.tokens - t0;  // the last request takes what is left
    len = std::min(len, p.tokens - t0);
    tr.meta.sequences.emplace_back(t0, t0 + len);
    t0 += len;
  }
  if (t0 < p.tokens) tr.meta.sequences.back().second = p.tokens;
  tr.token_ids.resize(static_cast<std::size_t>(p.tokens));
  int const topics = p.topics;
  std::int64_t const slice = topics > 0 ? p.vocab / topics : p.vocab;  // vocabulary ranks per topic
  std::vector<int> topic_of_id;                                         // [vocab] (topics > 0)
  if (topics == 0) {
    for (auto& id : tr.token_ids) id = vocab_perm[static_cast<std::size_t>(token_law(rng))];
  } else {
    topic_of_id.resize(static_cast<std::size_t>(p.vocab));
    for (int i = 0; i < p.vocab; ++i) {
      topic_of_id[static_cast<std::size_t>(vocab_perm[static_cast<std::size_t>(i)])] = static_cast<int>(std::min<std::int64_t>(i / slice, topics - 1));
    }
    trace_gen_detail::zipf const slice_law(static_cast<int>(slice), p.token_zipf);
    std::bernoulli_distribution on_topic(p.topic_share);
    for (auto const& [b, e] : tr.meta.sequences) {
      int const topic = std::uniform_int_distribution<int>(0, topics - 1)(rng);
      for (auto t = b; t < e; ++t) {
        auto const rank = on_topic(rng) ? topic * slice + slice_law(rng) : static_cast<std::int64_t>(token_law(rng));
        tr.token_ids[static_cast<std::size_t>(t)] = vocab_perm[static_cast<std::size_t>(rank)];
      }
    }
    tr.meta.source += " topics=" + std::to_string(topics) + " topic_share=" + std::to_string(p.topic_share) +
                      " topic_affinity=" + std::to_string(p.topic_affinity);
  }

  // per-layer popularity (a Zipf law over a random order of the experts) and the layer maps pi_l
  trace_gen_detail::zipf const expert_law(E, p.expert_zipf);
  std::vector<std::vector<int>> by_rank(static_cast<std::size_t>(L), std::vector<int>(static_cast<std::size_t>(E)));
  std::vector<std::vector<int>> pi(static_cast<std::size_t>(L), std::vector<int>(static_cast<std::size_t>(E)));
  for (int l = 0; l < L; ++l) {
    auto& o = by_rank[static_cast<std::size_t>(l)];
    std::iota(o.begin(), o.end(), 0);
    std::shuffle(o.begin(), o.end(), structure);
    auto& m = pi[static_cast<std::size_t>(l)];
    std::iota(m.begin(), m.end(), 0);
    std::shuffle(m.begin(), m.end(), structure);
  }
  // topic expert groups: per layer, a random order of the experts cut into `topics` groups
  std::vector<std::vector<int>> topic_order(static_cast<std::size_t>(topics > 0 ? L : 0), std::vector<int>(static_cast<std::size_t>(E)));
  for (auto& o : topic_order) {
    std::iota(o.begin(), o.end(), 0);
    std::shuffle(o.begin(), o.end(), structure);
  }
  std::vector<char> taken(static_cast<std::size_t>(E), 0);
  // k distinct experts: `first` (may hold -1 = draw) in order, the rest by popularity
  auto draw_distinct = [&](int layer, std::vector<int> const& want, std::vector<int>& out, std::mt19937_64& g) {
    out.clear();
    for (int const e : want) {
      if (e >= 0 && !taken[static_cast<std::size_t>(e)]) {
        out.push_back(e);
        taken[static_cast<std::size_t>(e)] = 1;
      } else {
        int d;
        do {
          d = by_rank[static_cast<std::size_t>(layer)][static_cast<std::size_t>(expert_law(g))];
        } while (taken[static_cast<std::size_t>(d)]);
        out.push_back(d);
        taken[static_cast<std::size_t>(d)] = 1;
      }
    }
    for (int const e : out) taken[static_cast<std::size_t>(e)] = 0;
  };

  // preferred sets, per layer and token id, created on first use from their own generator (so they
  // belong to the model, whatever order a sample meets the ids in)
  std::vector<std::vector<std::vector<int>>> preferred(static_cast<std::size_t>(L));
  for (auto& v : preferred) v.resize(static_cast<std::size_t>(p.vocab));
  std::bernoulli_distribution keep(p.affinity), follow(p.layer_correlation), agree(p.draft_agreement);
  auto preferred_of = [&](int layer, int id) -> std::vector<int> const& {
    auto& set = preferred[static_cast<std::size_t>(layer)][static_cast<std::size_t>(id)];
    if (set.empty()) {
      std::mt19937_64 own(p.seed ^ (static_cast<std::uint64_t>(layer) << 40) ^ (static_cast<std::uint64_t>(id) * 0xd1b54a32d192ed03ull));
      std::vector<int> want(static_cast<std::size_t>(k), -1);
      if (layer > 0) {
        // the token's set at layer - 1 exists: layers are visited in order for each token
        auto const& prev = preferred[static_cast<std::size_t>(layer - 1)][static_cast<std::size_t>(id)];
        for (int j = 0; j < k; ++j) {
          if (!prev.empty() && follow(own)) want[static_cast<std::size_t>(j)] = pi[static_cast<std::size_t>(layer)][static_cast<std::size_t>(prev[static_cast<std::size_t>(j)])];
        }
      }
      if (topics > 0) {  // slots lean to the token's topic group, in every layer
        std::bernoulli_distribution in_topic(p.topic_affinity);
        int const group = E / topics, topic = topic_of_id[static_cast<std::size_t>(id)];
        for (auto& w : want) {
          if (in_topic(own)) {
            w = topic_order[static_cast<std::size_t>(layer)][static_cast<std::size_t>(topic * group + std::uniform_int_distribution<int>(0, group - 1)(own))];
          }
        }
      }
      draw_distinct(layer, want, set, own);
    }
    return set;
  };

  tr.topk_ids.resize(static_cast<std::size_t>(L * p.tokens * k));
  tr.topk_weights.resize(tr.topk_ids.size());
  std::vector<int> want(static_cast<std::size_t>(k)), chosen;
  std::vector<float> w(static_cast<std::size_t>(k));
  for (std::int64_t t = 0; t < p.tokens; ++t) {
    int const id = tr.token_ids[static_cast<std::size_t>(t)];
    for (int l = 0; l < L; ++l) {
      auto const& pref = preferred_of(l, id);
      for (int j = 0; j < k; ++j) want[static_cast<std::size_t>(j)] = keep(rng) ? pref[static_cast<std::size_t>(j)] : -1;
      draw_distinct(l, want, chosen, rng);
      float total = 0.0f;
      for (auto& x : w) total += x = std::exponential_distribution<float>(1.0f)(rng) + 0.05f;
      std::sort(w.begin(), w.end(), std::greater<>());
      auto const base = static_cast<std::size_t>((l * p.tokens + t) * k);
      for (int j = 0; j < k; ++j) {
        tr.topk_ids[base + static_cast<std::size_t>(j)] = chosen[static_cast<std::size_t>(j)];
        tr.topk_weights[base + static_cast<std::size_t>(j)] = w[static_cast<std::size_t>(j)] / total;
      }
    }
  }

  if (p.draft_layers > 0) {
    tr.meta.draft = trace::draft_meta{p.model + "-draft", p.draft_layers, E, k};
    tr.draft_topk_ids.resize(static_cast<std::size_t>(p.draft_layers * p.tokens * k));
    for (int d = 0; d < p.draft_layers; ++d) {
      int const l = static_cast<int>(static_cast<std::int64_t>(d) * L / p.draft_layers);
      for (std::int64_t t = 0; t < p.tokens; ++t) {
        auto const base = static_cast<std::size_t>((l * p.tokens + t) * k);
        for (int j = 0; j < k; ++j) want[static_cast<std::size_t>(j)] = agree(rng) ? tr.topk_ids[base + static_cast<std::size_t>(j)] : -1;
        draw_distinct(l, want, chosen, rng);
        std::copy(chosen.begin(), chosen.end(), tr.draft_topk_ids.begin() + static_cast<std::ptrdiff_t>((d * p.tokens + t) * k));
      }
    }
  }
  trace::validate_trace(tr, "generate_trace");
  return tr;
}

}  // namespace specmoe::synthetic
