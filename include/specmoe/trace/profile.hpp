// specmoe/trace/profile.hpp: what a routing trace says about token-expert affinity and about how a
// token's rank evolves across layers (Speculative MoE's profiling step).
//
//   profile_layer(trace, l)        token id x expert activation counts of layer l (sparse, one row
//                                  per distinct token id), token frequencies, expert loads, and the
//                                  confidence C_p(v, e) = share of v's occurrences that activate e;
//   token_ranks(trace, l, rank_of) the rank serving most of each position's experts at layer l;
//   device_ngrams(trace, rank_of)  per layer l >= 2: counts of (rank at l-2, rank at l-1) -> rank at
//                                  l, and the look-back confidence (how often the most frequent
//                                  next rank of a 2-gram is right).
// One layer at a time, so a 61-layer trace of a million tokens profiles in bounded memory.
#pragma once

#include <specmoe/core/error.hpp>
#include <specmoe/trace/routing_trace.hpp>

#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

namespace specmoe::trace {

/// Activation counts of one layer, rows = distinct token ids (ascending), columns = experts (sparse).
struct layer_profile {
  int experts = 0;
  int top_k = 0;
  std::vector<std::int32_t> token_ids;     ///< [rows] distinct vocabulary ids, ascending
  std::vector<std::int64_t> frequency;     ///< [rows] occurrences of each id
  std::vector<std::int64_t> row_offsets;   ///< [rows + 1] CSR offsets into expert / count
  std::vector<std::int32_t> expert;        ///< [nnz] experts of a row, ascending
  std::vector<std::int32_t> count;         ///< [nnz] activations of (row, expert)
  std::vector<std::int64_t> expert_load;   ///< [experts] activations per expert

  /// The row of vocabulary id `token`, or -1 when the trace never saw it.
  [[nodiscard]] std::int64_t row_of(std::int32_t token) const {
    auto const it = std::lower_bound(token_ids.begin(), token_ids.end(), token);
    return it != token_ids.end() && *it == token ? it - token_ids.begin() : -1;
  }
  /// C_p(token, e): the share of `token`'s occurrences that activated expert e (0 when unseen).
  [[nodiscard]] double confidence(std::int32_t token, int e) const {
    auto const r = row_of(token);
    if (r < 0) return 0.0;
    auto const b = expert.begin() + row_offsets[static_cast<std::size_t>(r)];
    auto const end = expert.begin() + row_offsets[static_cast<std::size_t>(r) + 1];
    auto const it = std::lower_bound(b, end, e);
    if (it == end || *it != e) return 0.0;
    return static_cast<double>(count[static_cast<std::size_t>(it - expert.begin())]) /
           static_cast<double>(frequency[static_cast<std::size_t>(r)]);
  }
  /// The k experts `token` activated most often, most first (ties: lower expert id); fewer when
  /// the token activated fewer, none when unseen.
  [[nodiscard]] std::vector<int> hottest(std::int32_t token, int k) const {
    auto const r = row_of(token);
    if (r < 0) return {};
    std::vector<std::pair<std::int32_t, std::int32_t>> row;  // (count, expert)
    for (auto i = row_offsets[static_cast<std::size_t>(r)]; i < row_offsets[static_cast<std::size_t>(r) + 1]; ++i) {
      row.emplace_back(count[static_cast<std::size_t>(i)], expert[static_cast<std::size_t>(i)]);
    }
    std::sort(row.begin(), row.end(), [](auto a, auto b) { return a.first != b.first ? a.first > b.first : a.second < b.second; });
    std::vector<int> out;
    for (std::size_t j = 0; j < row.size() && static_cast<int>(j) < k; ++j) out.push_back(row[j].second);
    return out;
  }
};

/// Profiles layer `layer` of `tr`, which must carry token ids.
inline layer_profile profile_layer(routing_trace const& tr, int layer) {
  auto const& m = tr.meta;
  SPECMOE_EXPECTS(tr.has_token_ids(), errc::invalid_argument,
                  "profiling token affinity needs token_ids.npy in the trace (the vocabulary id of each position)");
  SPECMOE_EXPECTS(layer >= 0 && layer < m.layers, errc::invalid_argument, "layer ", layer, " is outside [0, ", m.layers, ")");
  layer_profile p;
  p.experts = m.experts;
  p.top_k = m.top_k;
  p.expert_load.assign(static_cast<std::size_t>(m.experts), 0);
  // (token id, expert) of every slot, sorted, then run-length encoded into CSR rows
  std::vector<std::uint64_t> keys(static_cast<std::size_t>(m.tokens * m.top_k));
  for (std::int64_t t = 0; t < m.tokens; ++t) {
    auto const id = static_cast<std::uint64_t>(static_cast<std::uint32_t>(tr.token_ids[static_cast<std::size_t>(t)]));
    for (int j = 0; j < m.top_k; ++j) {
      auto const e = tr.id(layer, t, j);
      ++p.expert_load[static_cast<std::size_t>(e)];
      keys[static_cast<std::size_t>(t * m.top_k + j)] = id << 32 | static_cast<std::uint32_t>(e);
    }
  }
  std::sort(keys.begin(), keys.end());
  for (std::size_t i = 0; i < keys.size();) {
    auto const id = static_cast<std::int32_t>(keys[i] >> 32);
    p.token_ids.push_back(id);
    p.row_offsets.push_back(static_cast<std::int64_t>(p.expert.size()));
    std::int64_t slots = 0;
    while (i < keys.size() && static_cast<std::int32_t>(keys[i] >> 32) == id) {
      std::size_t j = i;
      while (j < keys.size() && keys[j] == keys[i]) ++j;
      p.expert.push_back(static_cast<std::int32_t>(keys[i] & 0xffffffffu));
      p.count.push_back(static_cast<std::int32_t>(j - i));
      slots += static_cast<std::int64_t>(j - i);
      i = j;
    }
    p.frequency.push_back(slots / m.top_k);  // each occurrence holds top_k distinct experts
  }
  p.row_offsets.push_back(static_cast<std::int64_t>(p.expert.size()));
  return p;
}

/// The rank serving most of each position's experts at `layer`, under `rank_of` (expert -> rank):
/// ties go to the lower rank. [tokens]
inline std::vector<int> token_ranks(routing_trace const& tr, int layer, std::span<int const> rank_of, int num_ranks) {
  auto const& m = tr.meta;
  SPECMOE_EXPECTS(static_cast<int>(rank_of.size()) == m.experts, errc::shape_mismatch, "rank_of holds ", rank_of.size(),
                  " experts, the trace has ", m.experts);
  std::vector<int> out(static_cast<std::size_t>(m.tokens));
  std::vector<int> votes(static_cast<std::size_t>(num_ranks));
  for (std::int64_t t = 0; t < m.tokens; ++t) {
    std::fill(votes.begin(), votes.end(), 0);
    for (int j = 0; j < m.top_k; ++j) {
      int const r = rank_of[static_cast<std::size_t>(tr.id(layer, t, j))];
      SPECMOE_EXPECTS(r >= 0 && r < num_ranks, errc::invalid_argument, "rank_of maps expert ", tr.id(layer, t, j), " to rank ", r,
                      ", outside [0, ", num_ranks, ")");
      ++votes[static_cast<std::size_t>(r)];
    }
    out[static_cast<std::size_t>(t)] = static_cast<int>(std::max_element(votes.begin(), votes.end()) - votes.begin());
  }
  return out;
}

/// Per-layer statistics of rank sequences: counts[(a * D + b) * D + c] = positions whose rank was
/// a at layer l-2, b at l-1 and c at l.
struct device_ngram_layer {
  std::vector<std::int64_t> counts;  ///< [D * D * D]; empty for layers 0 and 1
  double lookback_confidence = 0.0;  ///< share of positions whose rank at l is the most frequent next rank of its 2-gram
};

/// 2-gram device statistics of `tr` under per-layer placements `rank_of[l]` (expert -> rank).
inline std::vector<device_ngram_layer> device_ngrams(routing_trace const& tr, std::vector<std::vector<int>> const& rank_of, int num_ranks) {
  auto const& m = tr.meta;
  SPECMOE_EXPECTS(static_cast<int>(rank_of.size()) == m.layers, errc::shape_mismatch, "placements for ", rank_of.size(),
                  " layers, the trace has ", m.layers);
  SPECMOE_EXPECTS(num_ranks > 0 && num_ranks <= 1024, errc::invalid_argument, "num_ranks ", num_ranks, " is outside [1, 1024]");
  auto const D = static_cast<std::size_t>(num_ranks);
  std::vector<device_ngram_layer> out(static_cast<std::size_t>(m.layers));
  std::vector<int> r2, r1;
  for (int l = 0; l < m.layers; ++l) {
    auto r0 = token_ranks(tr, l, rank_of[static_cast<std::size_t>(l)], num_ranks);
    if (l >= 2) {
      auto& layer = out[static_cast<std::size_t>(l)];
      layer.counts.assign(D * D * D, 0);
      for (std::size_t t = 0; t < r0.size(); ++t) {
        ++layer.counts[(static_cast<std::size_t>(r2[t]) * D + static_cast<std::size_t>(r1[t])) * D + static_cast<std::size_t>(r0[t])];
      }
      std::int64_t right = 0;
      for (std::size_t ab = 0; ab < D * D; ++ab) right += *std::max_element(layer.counts.begin() + static_cast<std::ptrdiff_t>(ab * D),
                                                                          layer.counts.begin() + static_cast<std::ptrdiff_t>((ab + 1) * D));
      layer.lookback_confidence = r0.empty() ? 0.0 : static_cast<double>(right) / static_cast<double>(r0.size());
    }
    r2 = std::move(r1);
    r1 = std::move(r0);
  }
  return out;
}

}  // namespace specmoe::trace
