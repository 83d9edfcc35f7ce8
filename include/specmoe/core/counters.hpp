// specmoe/core/counters.hpp: what one forward pass did, counted (bytes per peer, hits, stalls).
#pragma once

#include <specmoe/core/error.hpp>

#include <cstdint>
#include <ostream>
#include <vector>

namespace specmoe {

/// @brief Bytes sent from each rank to each peer: `bytes(src, dst)`, row-major [D, D].
///
/// NOTES: the diagonal stays zero: what a rank "sends" to itself never crosses a link.
struct traffic_matrix {
  int num_ranks = 0;
  std::vector<std::int64_t> per_pair;  ///< [D * D]

  traffic_matrix() = default;
  explicit traffic_matrix(int d) : num_ranks(d), per_pair(static_cast<std::size_t>(d) * static_cast<std::size_t>(d), 0) {}

  [[nodiscard]] std::int64_t bytes(int src, int dst) const noexcept {
    return per_pair[static_cast<std::size_t>(src) * static_cast<std::size_t>(num_ranks) + static_cast<std::size_t>(dst)];
  }
  void add(int src, int dst, std::int64_t b) noexcept {
    if (src != dst) per_pair[static_cast<std::size_t>(src) * static_cast<std::size_t>(num_ranks) + static_cast<std::size_t>(dst)] += b;
  }
  /// Bytes that crossed between ranks, all pairs together.
  [[nodiscard]] std::int64_t total() const noexcept {
    std::int64_t t = 0;
    for (auto b : per_pair) t += b;
    return t;
  }
  /// Bytes rank `src` sent to all peers.
  [[nodiscard]] std::int64_t sent_by(int src) const noexcept {
    std::int64_t t = 0;
    for (int d = 0; d < num_ranks; ++d) t += bytes(src, d);
    return t;
  }
  /// The largest number of bytes one rank sent (what bounds an all-to-all's time).
  [[nodiscard]] std::int64_t max_sent() const noexcept {
    std::int64_t m = 0;
    for (int s = 0; s < num_ranks; ++s) m = sent_by(s) > m ? sent_by(s) : m;
    return m;
  }
  void accumulate(traffic_matrix const& o) {
    if (num_ranks == 0) *this = traffic_matrix(o.num_ranks);
    SPECMOE_EXPECTS(o.num_ranks == num_ranks, errc::shape_mismatch, "cannot add traffic of ", o.num_ranks,
                    " ranks to traffic of ", num_ranks, " ranks");
    for (std::size_t i = 0; i < per_pair.size(); ++i) per_pair[i] += o.per_pair[i];
  }
};

/// @brief Everything a layer counts, summed over the forward calls since the last reset.
///
/// "Activation" = one (token, expert) pair of the routing. "Gate rank" = where the token sat when
/// the gate ran (its home rank unless the TokenPlacement policy moved it).
struct layer_counters {
  std::int64_t forward_calls = 0;
  std::int64_t tokens = 0;                 ///< tokens seen
  std::int64_t activations = 0;            ///< non-empty top-k slots
  std::int64_t local_activations = 0;      ///< activations served by the token's gate rank (LAR numerator)
  std::int64_t home_local_activations = 0; ///< activations whose expert lives on the token's home rank
  std::int64_t tokens_moved = 0;           ///< tokens the placement moved before the gate

  traffic_matrix dispatch;  ///< token rows sent to expert ranks (after de-duplication)
  traffic_matrix combine;   ///< result rows returned to the token's rank
  traffic_matrix shuffle;   ///< rows moved by the placement (there and back)
  std::int64_t metadata_bytes = 0;  ///< routing (expert ids, weights) sent beside dispatched rows

  std::int64_t dispatch_rows = 0;                ///< rows that crossed ranks in dispatch
  std::int64_t dispatch_rows_without_dedup = 0;  ///< rows that would have crossed, one per remote activation

  std::int64_t predicted_tokens = 0;  ///< tokens the predictor named a rank or experts for
  std::int64_t rank_hits = 0;         ///< ... whose predicted rank serves the most of their activations
  std::int64_t predicted_slots = 0;   ///< actual activations of tokens with an expert prediction
  std::int64_t expert_hits = 0;       ///< ... that the prediction named (recall numerator)

  std::vector<std::int64_t> tokens_per_expert;      ///< [E] activations per expert
  std::vector<std::int64_t> activations_per_rank;   ///< [D] activations each rank served (load)

  double stall_us = 0.0;             ///< time spent waiting for expert weights (offloading)
  std::int64_t prefetch_hits = 0;    ///< experts found resident when needed
  std::int64_t prefetch_misses = 0;  ///< experts fetched on demand

  /// Local activation rate: the share of activations that needed no dispatch (1 - alpha).
  [[nodiscard]] double lar() const noexcept {
    return activations ? static_cast<double>(local_activations) / static_cast<double>(activations) : 0.0;
  }
  /// Share of predicted tokens whose predicted rank was right.
  [[nodiscard]] double rank_hit_rate() const noexcept {
    return predicted_tokens ? static_cast<double>(rank_hits) / static_cast<double>(predicted_tokens) : 0.0;
  }
  /// Share of actual activations the expert prediction named (recall).
  [[nodiscard]] double expert_hit_rate() const noexcept {
    return predicted_slots ? static_cast<double>(expert_hits) / static_cast<double>(predicted_slots) : 0.0;
  }
  /// Share of dispatch rows that de-duplication saved.
  [[nodiscard]] double dedup_saving() const noexcept {
    return dispatch_rows_without_dedup
               ? 1.0 - static_cast<double>(dispatch_rows) / static_cast<double>(dispatch_rows_without_dedup)
               : 0.0;
  }
  /// Bytes that crossed ranks for any reason.
  [[nodiscard]] std::int64_t total_bytes() const noexcept {
    return dispatch.total() + combine.total() + shuffle.total() + metadata_bytes;
  }

  void accumulate(layer_counters const& o) {
    forward_calls += o.forward_calls;
    tokens += o.tokens;
    activations += o.activations;
    local_activations += o.local_activations;
    home_local_activations += o.home_local_activations;
    tokens_moved += o.tokens_moved;
    dispatch.accumulate(o.dispatch);
    combine.accumulate(o.combine);
    shuffle.accumulate(o.shuffle);
    metadata_bytes += o.metadata_bytes;
    dispatch_rows += o.dispatch_rows;
    dispatch_rows_without_dedup += o.dispatch_rows_without_dedup;
    predicted_tokens += o.predicted_tokens;
    rank_hits += o.rank_hits;
    predicted_slots += o.predicted_slots;
    expert_hits += o.expert_hits;
    add_elementwise(tokens_per_expert, o.tokens_per_expert);
    add_elementwise(activations_per_rank, o.activations_per_rank);
    stall_us += o.stall_us;
    prefetch_hits += o.prefetch_hits;
    prefetch_misses += o.prefetch_misses;
  }

 private:
  static void add_elementwise(std::vector<std::int64_t>& a, std::vector<std::int64_t> const& b) {
    if (a.size() < b.size()) a.resize(b.size(), 0);
    for (std::size_t i = 0; i < b.size(); ++i) a[i] += b[i];
  }
};

inline std::ostream& operator<<(std::ostream& os, layer_counters const& c) {
  return os << "tokens=" << c.tokens << " activations=" << c.activations << " LAR=" << c.lar()
            << " dispatch_bytes=" << c.dispatch.total() << " combine_bytes=" << c.combine.total()
            << " shuffle_bytes=" << c.shuffle.total() << " dedup_saving=" << c.dedup_saving()
            << " rank_hit_rate=" << c.rank_hit_rate() << " expert_hit_rate=" << c.expert_hit_rate();
}

}  // namespace specmoe
