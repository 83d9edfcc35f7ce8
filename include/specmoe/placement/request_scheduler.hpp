// specmoe/placement/request_scheduler.hpp: Speculative MoE for data-parallel attention (issue 6).
//
// With data-parallel attention a token cannot move before the MoE (its KV cache lives on its
// rank), so the speculation happens once per request, when it arrives: the engine asks which DP
// rank should take it. The scheduler sums, over the prompt's tokens and the plan's layers, the
// token-affinity confidence T_p of each token's predicted rank T, and picks the rank with the most;
// a round-robin mask keeps ranks balanced (a rank more than `slack` requests, or tokens, above the
// least loaded one is not eligible), so affinity never starves a rank.
#pragma once

#include <specmoe/core/error.hpp>
#include <specmoe/grouping/speculative_plan.hpp>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

namespace specmoe {

/// @brief How the scheduler balances.
struct request_scheduler_options {
  bool balance_tokens = false;  ///< count load in tokens (prompt length) rather than requests
  std::int64_t slack = 1;       ///< how far above the least loaded rank a rank stays eligible
};

/// @brief Chooses each new request's DP rank by summed token affinity under a balance mask.
class request_scheduler {
 public:
  /// @throw specmoe::error invalid_argument on a null plan or a negative slack.
  explicit request_scheduler(std::shared_ptr<grouping::speculative_plan const> plan, request_scheduler_options options = {})
      : plan_(std::move(plan)), options_(options) {
    SPECMOE_EXPECTS(plan_ != nullptr && plan_->ranks > 0, errc::invalid_argument, "request_scheduler needs a plan with ranks");
    SPECMOE_EXPECTS(options_.slack >= 0, errc::invalid_argument, "request_scheduler: slack must be >= 0, got ", options_.slack);
    load_.assign(static_cast<std::size_t>(plan_->ranks), 0);
  }

  [[nodiscard]] int ranks() const noexcept { return plan_->ranks; }
  /// Current load per rank (requests, or tokens with balance_tokens).
  [[nodiscard]] std::span<std::int64_t const> load() const noexcept { return load_; }

  /// @brief Per rank, the summed confidence of the prompt's tokens predicted there (over layers).
  [[nodiscard]] std::vector<double> affinity(std::span<std::int32_t const> token_ids) const {
    std::vector<double> a(static_cast<std::size_t>(plan_->ranks), 0.0);
    for (auto const& L : plan_->per_layer) {
      for (auto id : token_ids) {
        auto const [r, p] = L.token(id);
        if (r >= 0) a[static_cast<std::size_t>(r)] += p;
      }
    }
    return a;
  }

  /// @brief Assigns a request: the eligible rank of highest affinity (ties: least loaded, then
  /// lowest id), and adds its load.
  /// @throw specmoe::error invalid_argument on an empty prompt.
  int assign(std::span<std::int32_t const> token_ids) {
    SPECMOE_EXPECTS(!token_ids.empty(), errc::invalid_argument, "request_scheduler::assign: the request has no tokens");
    auto const a = affinity(token_ids);
    std::int64_t const least = *std::min_element(load_.begin(), load_.end());
    std::int64_t const cost = options_.balance_tokens ? static_cast<std::int64_t>(token_ids.size()) : 1;
    int best = -1;
    for (int r = 0; r < plan_->ranks; ++r) {
      auto const R = static_cast<std::size_t>(r);
      if (load_[R] > least + options_.slack) continue;  // the round-robin mask
      if (best < 0) {
        best = r;
        continue;
      }
      auto const B = static_cast<std::size_t>(best);
      if (a[R] > a[B] || (a[R] == a[B] && load_[R] < load_[B])) best = r;
    }
    load_[static_cast<std::size_t>(best)] += cost;
    return best;
  }

  /// @brief A request on `rank` finished: removes its load (`tokens`: its prompt length when
  /// balancing tokens; ignored otherwise).
  /// @throw specmoe::error invalid_argument when the rank is out of range or holds less load.
  void finish(int rank, std::int64_t tokens = 1) {
    SPECMOE_EXPECTS(rank >= 0 && rank < plan_->ranks, errc::invalid_argument, "request_scheduler::finish: rank ", rank,
                    " outside [0, ", plan_->ranks, ")");
    std::int64_t const cost = options_.balance_tokens ? tokens : 1;
    auto& l = load_[static_cast<std::size_t>(rank)];
    SPECMOE_EXPECTS(l >= cost, errc::invalid_argument, "request_scheduler::finish: rank ", rank, " holds load ", l,
                    ", cannot remove ", cost);
    l -= cost;
  }

 private:
  std::shared_ptr<grouping::speculative_plan const> plan_;
  request_scheduler_options options_;
  std::vector<std::int64_t> load_;
};

}  // namespace specmoe
