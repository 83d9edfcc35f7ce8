// specmoe/comm/bootstrap.hpp: how the ranks of an expert-parallel group meet once, at setup (host
// side, never on the hot path): exchange buffer handles and check that configurations agree.
#pragma once

#include <specmoe/core/error.hpp>

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

namespace specmoe {

/// @brief A collective all-gather of small host blobs among the ranks of one group.
///
/// Implementations: in_process_group (ranks are threads of one process), nccl_bootstrap
/// (comm/nccl_bootstrap.cuh: over the engine's ncclComm_t, any number of processes).
class bootstrap {
 public:
  virtual ~bootstrap() = default;
  [[nodiscard]] virtual int rank() const = 0;
  [[nodiscard]] virtual int size() const = 0;
  /// Every rank passes `bytes` bytes (the same count everywhere); `all` receives size() * bytes,
  /// rank order. Collective: every rank must call it, in the same order.
  virtual void allgather(void const* mine, std::size_t bytes, void* all) = 0;
};

/// @brief Ranks that are threads of one process: one process driving several GPUs (tests, simple
/// hosts). Make one group, then `member(r)` per rank thread; members share the group.
class in_process_group : public std::enable_shared_from_this<in_process_group> {
  struct private_tag {};

 public:
  /// @param timeout how long a rank waits for the others at each exchange before errc::timeout.
  static std::shared_ptr<in_process_group> create(int size, std::chrono::milliseconds timeout = std::chrono::seconds(60)) {
    SPECMOE_EXPECTS(size > 0, errc::invalid_argument, "an in-process group needs at least one rank, got ", size);
    return std::make_shared<in_process_group>(private_tag{}, size, timeout);
  }
  in_process_group(private_tag, int size, std::chrono::milliseconds timeout)
      : size_(size), timeout_(timeout), slots_(static_cast<std::size_t>(size)) {}

  class member final : public bootstrap {
   public:
    member(std::shared_ptr<in_process_group> group, int rank) : group_(std::move(group)), rank_(rank) {}
    [[nodiscard]] int rank() const override { return rank_; }
    [[nodiscard]] int size() const override { return group_->size_; }
    void allgather(void const* mine, std::size_t bytes, void* all) override { group_->allgather(rank_, mine, bytes, all); }

   private:
    std::shared_ptr<in_process_group> group_;
    int rank_;
  };

  /// The bootstrap of rank `r` (one per rank thread).
  [[nodiscard]] member join(int r) {
    SPECMOE_EXPECTS(r >= 0 && r < size_, errc::invalid_argument, "rank ", r, " outside the group of ", size_);
    return member(shared_from_this(), r);
  }

 private:
  void allgather(int rank, void const* mine, std::size_t bytes, void* all) {
    std::unique_lock lock(mutex_);
    // A rank that runs ahead waits until the previous exchange has been read by everyone.
    SPECMOE_EXPECTS(cv_.wait_for(lock, timeout_, [&] { return !draining_; }), errc::timeout, "rank ", rank,
                    " waited ", timeout_.count(), " ms for the previous in-process exchange to finish");
    auto const generation = generation_;
    auto const* p = static_cast<std::byte const*>(mine);
    slots_[static_cast<std::size_t>(rank)].assign(p, p + bytes);
    if (++arrived_ == size_) {
      draining_ = true;
      cv_.notify_all();
    } else {
      bool const all_came = cv_.wait_for(lock, timeout_, [&] { return draining_ && generation_ == generation; });
      if (!all_came) {
        --arrived_;
        SPECMOE_FAIL(errc::timeout, "rank ", rank, " waited ", timeout_.count(), " ms for the other ", size_ - 1,
                     " ranks of its in-process group (", arrived_, " others arrived): a rank did not construct the "
                     "same layers or backends in the same order");
      }
    }
    int mismatch = -1;
    for (std::size_t r = 0; r < slots_.size(); ++r) {
      if (slots_[r].size() != bytes) {
        mismatch = static_cast<int>(r);
      } else if (bytes) {
        std::memcpy(static_cast<std::byte*>(all) + r * bytes, slots_[r].data(), bytes);
      }
    }
    std::size_t const theirs = mismatch >= 0 ? slots_[static_cast<std::size_t>(mismatch)].size() : 0;
    if (++departed_ == size_) {
      arrived_ = departed_ = 0;
      draining_ = false;
      ++generation_;
      cv_.notify_all();
    }
    SPECMOE_EXPECTS(mismatch < 0, errc::rank_mismatch, "rank ", mismatch, " exchanged ", theirs, " bytes at setup, rank ",
                    rank, " ", bytes, ": the ranks are not constructing the same thing");
  }

  int size_;
  std::chrono::milliseconds timeout_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::vector<std::vector<std::byte>> slots_;
  int arrived_ = 0, departed_ = 0;
  bool draining_ = false;
  unsigned long long generation_ = 0;
};

}  // namespace specmoe
