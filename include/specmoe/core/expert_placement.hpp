// specmoe/core/expert_placement.hpp: which rank(s) hold each expert.
#pragma once

#include <specmoe/core/error.hpp>

#include <algorithm>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace specmoe {

/// @brief Expert -> owner ranks (one or more: replicas allowed), and rank -> local experts.
///
/// Built by an ExpertGrouping policy once per layer. Immutable after construction; every rank of
/// a group must hold an equal placement (checked by the layers).
///
/// NOTES: when an expert has several owners, the token's own rank serves it if it is one of them;
/// otherwise owner `local_token_index % num_owners` does. The rule needs nothing but the token's
/// index on its rank, so every rank (and the GPU kernels) resolve replicas identically.
class expert_placement {
 public:
  expert_placement() = default;

  /// @param owners owners[e] lists the ranks holding expert e (any order; sorted here).
  /// @throw specmoe::error `unowned_expert` if an expert has no owner; `invalid_argument` for an
  ///        owner outside [0, num_ranks) or listed twice.
  expert_placement(int num_ranks, std::vector<std::vector<int>> owners) : num_ranks_(num_ranks) {
    SPECMOE_EXPECTS(num_ranks > 0, errc::invalid_argument, "num_ranks must be positive, got ", num_ranks);
    SPECMOE_EXPECTS(!owners.empty(), errc::invalid_argument, "an expert placement needs at least one expert");
    auto const num_experts = static_cast<int>(owners.size());
    owner_offset_.reserve(owners.size() + 1);
    owner_offset_.push_back(0);
    std::vector<std::vector<int>> local(static_cast<std::size_t>(num_ranks));
    for (int e = 0; e < num_experts; ++e) {
      auto& list = owners[static_cast<std::size_t>(e)];
      SPECMOE_EXPECTS(!list.empty(), errc::unowned_expert, "expert ", e, " has no owner rank");
      std::sort(list.begin(), list.end());
      for (std::size_t i = 0; i < list.size(); ++i) {
        SPECMOE_EXPECTS(list[i] >= 0 && list[i] < num_ranks, errc::invalid_argument, "expert ", e,
                        " is placed on rank ", list[i], ", outside [0, ", num_ranks, ")");
        SPECMOE_EXPECTS(i == 0 || list[i] != list[i - 1], errc::invalid_argument, "expert ", e,
                        " lists rank ", list[i], " twice");
        owners_.push_back(list[i]);
        local[static_cast<std::size_t>(list[i])].push_back(e);
      }
      owner_offset_.push_back(static_cast<std::int32_t>(owners_.size()));
    }
    local_offset_.push_back(0);
    local_index_.assign(static_cast<std::size_t>(num_ranks) * static_cast<std::size_t>(num_experts), -1);
    for (int r = 0; r < num_ranks; ++r) {
      for (std::size_t i = 0; i < local[static_cast<std::size_t>(r)].size(); ++i) {
        auto const e = local[static_cast<std::size_t>(r)][i];
        local_index_[static_cast<std::size_t>(r) * static_cast<std::size_t>(num_experts) +
                     static_cast<std::size_t>(e)] = static_cast<std::int32_t>(i);
        local_.push_back(e);
      }
      local_offset_.push_back(static_cast<std::int32_t>(local_.size()));
    }
  }

  /// One owner per expert: `owner[e]` is the rank holding expert e.
  static expert_placement from_owners(int num_ranks, std::span<int const> owner) {
    std::vector<std::vector<int>> owners(owner.size());
    for (std::size_t e = 0; e < owner.size(); ++e) owners[e] = {owner[e]};
    return expert_placement(num_ranks, std::move(owners));
  }

  [[nodiscard]] int num_ranks() const noexcept { return num_ranks_; }
  [[nodiscard]] int num_experts() const noexcept { return static_cast<int>(owner_offset_.size()) - 1; }

  /// Ranks holding expert e, ascending.
  [[nodiscard]] std::span<int const> owners(int e) const noexcept {
    return {owners_.data() + owner_offset_[static_cast<std::size_t>(e)],
            static_cast<std::size_t>(owner_offset_[static_cast<std::size_t>(e) + 1] -
                                     owner_offset_[static_cast<std::size_t>(e)])};
  }
  /// Experts held by rank r, ascending; position i is the expert's local index on r.
  [[nodiscard]] std::span<int const> local_experts(int r) const noexcept {
    return {local_.data() + local_offset_[static_cast<std::size_t>(r)],
            static_cast<std::size_t>(local_offset_[static_cast<std::size_t>(r) + 1] -
                                     local_offset_[static_cast<std::size_t>(r)])};
  }
  /// Local index of expert e on rank r, or -1 when r does not hold e.
  [[nodiscard]] int local_index(int r, int e) const noexcept {
    return local_index_[static_cast<std::size_t>(r) * static_cast<std::size_t>(num_experts()) +
                        static_cast<std::size_t>(e)];
  }
  [[nodiscard]] bool owns(int r, int e) const noexcept { return local_index(r, e) >= 0; }
  /// True when some expert has more than one owner.
  [[nodiscard]] bool replicated() const noexcept { return owners_.size() > static_cast<std::size_t>(num_experts()); }

  /// The rank that serves expert e for the token at index `local_token` on rank `token_rank`.
  [[nodiscard]] int serving_rank(int e, int token_rank, std::int64_t local_token) const noexcept {
    auto const o = owners(e);
    if (o.size() == 1) return o[0];
    if (owns(token_rank, e)) return token_rank;
    return o[static_cast<std::size_t>(local_token % static_cast<std::int64_t>(o.size()))];
  }

  friend bool operator==(expert_placement const& a, expert_placement const& b) {
    return a.num_ranks_ == b.num_ranks_ && a.owner_offset_ == b.owner_offset_ && a.owners_ == b.owners_;
  }

  /// Names the first expert whose owners differ ("" when equal), for rank-mismatch messages.
  [[nodiscard]] std::string describe_difference(expert_placement const& other) const {
    if (num_ranks_ != other.num_ranks_) return detail::concat("num_ranks ", num_ranks_, " vs ", other.num_ranks_);
    if (num_experts() != other.num_experts())
      return detail::concat("num_experts ", num_experts(), " vs ", other.num_experts());
    auto list = [](std::span<int const> s) {
      std::string out = "{";
      for (std::size_t i = 0; i < s.size(); ++i) {
        if (i) out += ',';
        out += std::to_string(s[i]);
      }
      out += '}';
      return out;
    };
    for (int e = 0; e < num_experts(); ++e) {
      auto const a = owners(e);
      auto const b = other.owners(e);
      if (!std::equal(a.begin(), a.end(), b.begin(), b.end()))
        return detail::concat("expert ", e, " is held by ranks ", list(a), " vs ", list(b));
    }
    return {};
  }

 private:
  int num_ranks_ = 0;
  std::vector<std::int32_t> owner_offset_;  // [E + 1]
  std::vector<int> owners_;                 // CSR: owners of each expert, ascending
  std::vector<std::int32_t> local_offset_;  // [D + 1]
  std::vector<int> local_;                  // CSR: experts of each rank, ascending
  std::vector<std::int32_t> local_index_;   // [D, E]
};

}  // namespace specmoe
