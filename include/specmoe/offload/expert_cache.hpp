// specmoe/offload/expert_cache.hpp: which offloaded experts hold a GPU slot (SP-MoE, issue 7).
//
// The host-side book of the expert cache: a fixed pool of slots, each holding one routed expert
// (one layer's gate, up and down matrices), and a replacement policy that picks the victim when a
// new expert needs a slot. It moves no bytes: the prefetcher copies, the device residency table
// publishes, and this book decides. Used alike by the GPU runtime and the host simulator, so the
// simulated and the real cache make the same choices.
//
// Invariants (tests/offload): never more experts than slots; an expert is in at most one slot; a
// pinned slot (a kernel may still read it) is never chosen as a victim; a protected expert
// (predicted for the current verification and not yet used by it) is evicted only when nothing
// else can be.
#pragma once

#include <specmoe/core/error.hpp>

#include <algorithm>
#include <concepts>
#include <cstdint>
#include <limits>
#include <optional>
#include <span>
#include <vector>

namespace specmoe::offload {

/// @brief One routed expert of one layer.
struct expert_key {
  int layer = 0;
  int expert = 0;
  friend bool operator==(expert_key, expert_key) = default;
};

/// @brief What a replacement policy sees of each slot when it chooses a victim.
struct slot_state {
  expert_key key{};
  bool occupied = false;
  int pins = 0;                  ///< > 0: a kernel may read the slot; never a victim
  bool is_protected = false;     ///< predicted for the current verification, not yet used by it
  bool speculative = false;      ///< filled by a prefetch and not used since
  std::uint64_t last_use = 0;    ///< tick of the last use (or of the fill)
  std::uint64_t uses = 0;        ///< uses since the fill (LFU counts these)
  std::uint64_t filled_at = 0;   ///< tick of the fill
  std::uint64_t key_uses = 0;    ///< uses of this expert since the cache began, misses included (kept across evictions)
};

/// @brief ReplacementPolicy: ranks evictable slots; the cache evicts the lowest `score`.
///
/// `P::protects` true: protected slots are passed over while any unprotected one is evictable.
template <class P>
concept replacement_policy = std::default_initializable<P> && requires(P const& p, slot_state const& s) {
  { P::protects } -> std::convertible_to<bool>;
  { p.score(s) } -> std::convertible_to<double>;
};

/// @brief Least recently used: the slot whose last use is oldest goes first.
struct lru_replacement {
  static constexpr bool protects = false;
  [[nodiscard]] double score(slot_state const& s) const noexcept { return static_cast<double>(s.last_use); }
};

/// @brief Least frequently used (since the fill), ties broken by recency.
struct lfu_replacement {
  static constexpr bool protects = false;
  [[nodiscard]] double score(slot_state const& s) const noexcept {
    return static_cast<double>(s.uses) * 1e12 + static_cast<double>(s.last_use);
  }
};

/// @brief Base's order, but experts predicted for the current verification are kept while any
/// other slot can go (so a prefetch for layer l+3 never evicts what layer l+1 is about to read).
/// LFU by default: under LRU the walk over the layers evicts first what the next step needs first
/// (in simulation no faster than on-demand LRU; LFU 1.1-1.8x, docs/benchmarks.md, issue 7).
template <replacement_policy Base = lfu_replacement>
struct protect_predicted {
  static constexpr bool protects = true;
  Base base{};
  [[nodiscard]] double score(slot_state const& s) const noexcept { return base.score(s); }
};

/// @brief Least frequently used over the whole run (`key_uses`: counted across evictions, misses
/// included), ties broken by recency. Keeps the experts that are hot over many steps, and lets a
/// cold expert's demand load take the slot of the last cold one. `lfu_replacement` counts only
/// since the fill, so a hot expert evicted once starts again at zero: on a synthetic
/// DeepSeek-V2-Lite trace with a quarter of the experts resident, hit rate 0.28 there against
/// 0.44 here without prefetch (Belady's offline bound: 0.62; docs/benchmarks.md, issue 7).
struct frequency_replacement {
  static constexpr bool protects = false;
  [[nodiscard]] double score(slot_state const& s) const noexcept {
    return static_cast<double>(s.key_uses) * 1e12 + static_cast<double>(s.last_use);
  }
};

static_assert(replacement_policy<lru_replacement> && replacement_policy<lfu_replacement> &&
              replacement_policy<frequency_replacement> && replacement_policy<protect_predicted<>>);

/// @brief What the cache counted.
struct cache_counters {
  std::int64_t hits = 0;                ///< uses that found the expert resident
  std::int64_t misses = 0;              ///< uses that did not (demand loads)
  std::int64_t prefetch_fills = 0;      ///< slots filled by a prefetch
  std::int64_t useful_prefetches = 0;   ///< prefetched experts used before their eviction
  std::int64_t wasted_prefetches = 0;   ///< prefetched experts evicted unused
  std::int64_t evictions = 0;
  std::int64_t refused = 0;             ///< admissions refused: every slot pinned (or protected, for prefetches)
  [[nodiscard]] double hit_rate() const noexcept {
    return hits + misses ? static_cast<double>(hits) / static_cast<double>(hits + misses) : 0.0;
  }
};

/// @brief The slot book for `layers` x `experts` routed experts in `slots` GPU slots.
template <replacement_policy Policy = lru_replacement>
class expert_cache {
 public:
  /// What `admit` did: the slot now reserved for the key, and the expert it displaced.
  struct admission {
    int slot = -1;
    std::optional<expert_key> evicted;
  };

  /// @param min_slots the fewest slots the caller's forward needs at once (one layer's distinct
  ///        experts of a verification batch, at least top_k): fewer is an error, as the layer
  ///        could never hold what one forward reads.
  /// @throw specmoe::error invalid_argument when the sizes are not positive or slots < min_slots.
  expert_cache(int layers, int experts, int slots, int min_slots = 1, Policy policy = {})
      : layers_(layers), experts_(experts), policy_(policy) {
    SPECMOE_EXPECTS(layers > 0 && experts > 0, errc::invalid_argument, "expert_cache: layers (", layers, ") and experts (",
                    experts, ") must be positive");
    SPECMOE_EXPECTS(min_slots > 0 && slots >= min_slots, errc::invalid_argument, "expert_cache: ", slots,
                    " GPU slots cannot hold one layer's ", min_slots,
                    " experts of a forward (the budget must fit at least one layer's top_k)");
    slots_.resize(static_cast<std::size_t>(slots));
    where_.assign(static_cast<std::size_t>(layers) * static_cast<std::size_t>(experts), -1);
    key_uses_.assign(where_.size(), 0);
    protected_key_.assign(where_.size(), 0);
    free_.reserve(static_cast<std::size_t>(slots));
    for (int s = slots - 1; s >= 0; --s) free_.push_back(s);
  }

  [[nodiscard]] int capacity() const noexcept { return static_cast<int>(slots_.size()); }
  [[nodiscard]] int occupied() const noexcept { return capacity() - static_cast<int>(free_.size()); }
  [[nodiscard]] int layers() const noexcept { return layers_; }
  [[nodiscard]] int experts() const noexcept { return experts_; }
  [[nodiscard]] cache_counters const& counters() const noexcept { return counters_; }
  [[nodiscard]] slot_state const& slot(int s) const { return slots_.at(static_cast<std::size_t>(s)); }

  /// The slot holding `k`, or -1.
  [[nodiscard]] int slot_of(expert_key k) const { return where_[index(k)]; }
  [[nodiscard]] bool resident(expert_key k) const { return slot_of(k) >= 0; }

  /// @brief Records a use of `k` by a forward: a hit when resident (the policy's order is updated),
  /// else a miss the caller must serve with a demand load (`admit`).
  bool use(expert_key k) {
    ++tick_;
    auto const uses_of_key = ++key_uses_[index(k)];
    int const s = slot_of(k);
    // a verification uses each layer's experts once: the protection has done its job (kept, it
    // would hold the step's cold experts over hot ones until the step ends)
    protected_key_[index(k)] = 0;
    if (s < 0) {
      ++counters_.misses;
      return false;
    }
    ++counters_.hits;
    auto& st = slots_[static_cast<std::size_t>(s)];
    st.is_protected = false;
    if (st.speculative) {
      ++counters_.useful_prefetches;
      st.speculative = false;
    }
    st.last_use = tick_;
    ++st.uses;
    st.key_uses = uses_of_key;
    return true;
  }

  /// @brief Reserves a slot for `k` (already resident: its slot, nothing evicted). A free slot goes
  /// first; else the policy's lowest-scored slot that is not pinned (and, for a policy that
  /// protects, not protected unless nothing else can go; a prefetch never evicts a protected one).
  /// @return nullopt when no slot can be taken (every one pinned, or protected for a prefetch).
  std::optional<admission> admit(expert_key k, bool speculative) {
    ++tick_;
    if (int const s = slot_of(k); s >= 0) return admission{s, std::nullopt};
    admission a;
    if (!free_.empty()) {
      a.slot = free_.back();
      free_.pop_back();
    } else {
      a.slot = victim(/*allow_protected=*/!speculative);
      if (a.slot < 0) {
        ++counters_.refused;
        return std::nullopt;
      }
      auto& old = slots_[static_cast<std::size_t>(a.slot)];
      a.evicted = old.key;
      if (old.speculative) ++counters_.wasted_prefetches;
      where_[index(old.key)] = -1;
      ++counters_.evictions;
    }
    auto& st = slots_[static_cast<std::size_t>(a.slot)];
    st = slot_state{k, true, 0, false, speculative, tick_, 0, tick_, key_uses_[index(k)]};
    if (is_in_protected(k)) {
      st.is_protected = true;
      protected_slots_.push_back(a.slot);
    }
    where_[index(k)] = a.slot;
    if (speculative) ++counters_.prefetch_fills;
    return a;
  }

  /// @brief Drops `k` from the cache (its slot becomes free). No-op when absent.
  /// @throw specmoe::error invalid_argument when the slot is pinned.
  void evict(expert_key k) {
    int const s = slot_of(k);
    if (s < 0) return;
    auto& st = slots_[static_cast<std::size_t>(s)];
    SPECMOE_EXPECTS(st.pins == 0, errc::invalid_argument, "expert_cache: layer ", k.layer, " expert ", k.expert,
                    " is pinned (a kernel may read it) and cannot be evicted");
    if (st.speculative) ++counters_.wasted_prefetches;
    st = slot_state{};
    where_[index(k)] = -1;
    free_.push_back(s);
    ++counters_.evictions;
  }

  /// @brief Adds earlier traffic to the use counts that `frequency_replacement` ranks by (e.g. a
  /// routing trace's activations per expert: `uses_from_trace`), so the cache starts knowing the
  /// hot experts instead of learning them over many steps.
  /// @param uses [layers * experts], layer-major.
  /// @throw specmoe::error shape_mismatch when the size differs from layers * experts.
  void seed_uses(std::span<std::uint64_t const> uses) {
    SPECMOE_EXPECTS(uses.size() == key_uses_.size(), errc::shape_mismatch, "expert_cache: ", uses.size(),
                    " use counts given for ", layers_, " layers x ", experts_, " experts (", key_uses_.size(), " expected)");
    for (std::size_t i = 0; i < uses.size(); ++i) key_uses_[i] += uses[i];
    for (auto& st : slots_) {
      if (st.occupied) st.key_uses = key_uses_[index(st.key)];
    }
  }
  /// Uses of `k` counted so far (seeded ones included).
  [[nodiscard]] std::uint64_t uses_of(expert_key k) const { return key_uses_[index(k)]; }

  /// Pins `k`'s slot while a kernel may read it (nestable). The expert must be resident.
  void pin(expert_key k) { ++pinned_slot(k).pins; }
  void unpin(expert_key k) {
    auto& st = pinned_slot(k);
    SPECMOE_EXPECTS(st.pins > 0, errc::invalid_argument, "expert_cache: unpin of layer ", k.layer, " expert ", k.expert,
                    " that is not pinned");
    --st.pins;
  }

  /// @brief The experts predicted for the current verification: a policy that protects keeps them
  /// while any other slot can go, until a `use` of each. Replaces the previous set.
  void protect(std::span<expert_key const> keys) {
    for (int s : protected_slots_) slots_[static_cast<std::size_t>(s)].is_protected = false;
    protected_slots_.clear();
    for (auto k : protected_) protected_key_[index(k)] = 0;
    protected_.assign(keys.begin(), keys.end());
    for (auto k : protected_) {
      protected_key_[index(k)] = 1;
      if (int const s = slot_of(k); s >= 0) {
        slots_[static_cast<std::size_t>(s)].is_protected = true;
        protected_slots_.push_back(s);
      }
    }
  }

 private:
  [[nodiscard]] std::size_t index(expert_key k) const {
    SPECMOE_EXPECTS(k.layer >= 0 && k.layer < layers_ && k.expert >= 0 && k.expert < experts_, errc::expert_out_of_range,
                    "expert_cache: layer ", k.layer, " expert ", k.expert, " outside [0, ", layers_, ") x [0, ", experts_, ")");
    return static_cast<std::size_t>(k.layer) * static_cast<std::size_t>(experts_) + static_cast<std::size_t>(k.expert);
  }
  slot_state& pinned_slot(expert_key k) {
    int const s = slot_of(k);
    SPECMOE_EXPECTS(s >= 0, errc::invalid_argument, "expert_cache: layer ", k.layer, " expert ", k.expert, " is not resident");
    return slots_[static_cast<std::size_t>(s)];
  }
  [[nodiscard]] bool is_in_protected(expert_key k) const { return protected_key_[index(k)] != 0; }
  /// Lowest-scored evictable slot; protected ones only when allowed and nothing else is left.
  [[nodiscard]] int victim(bool allow_protected) const {
    int best = -1, best_protected = -1;
    double best_score = std::numeric_limits<double>::infinity(), best_protected_score = best_score;
    for (std::size_t s = 0; s < slots_.size(); ++s) {
      auto const& st = slots_[s];
      if (!st.occupied || st.pins > 0) continue;
      double const score = policy_.score(st);
      if (Policy::protects && st.is_protected) {
        if (score < best_protected_score) best_protected_score = score, best_protected = static_cast<int>(s);
      } else if (score < best_score) {
        best_score = score, best = static_cast<int>(s);
      }
    }
    return best >= 0 ? best : (allow_protected ? best_protected : -1);
  }

  int layers_, experts_;
  Policy policy_;
  std::vector<slot_state> slots_;
  std::vector<int> where_;  // [layers * experts] slot or -1
  std::vector<std::uint64_t> key_uses_;  // [layers * experts] uses since the cache began
  std::vector<int> free_;
  std::vector<expert_key> protected_;    // the last protect() set (to clear its flags)
  std::vector<char> protected_key_;      // [layers * experts] 1: protected and not yet used
  std::vector<int> protected_slots_;     // slots marked is_protected (some may have been used since)
  std::uint64_t tick_ = 0;
  cache_counters counters_;
};

}  // namespace specmoe::offload
