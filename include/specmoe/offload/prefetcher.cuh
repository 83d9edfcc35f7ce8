// specmoe/offload/prefetcher.cuh: the SP-MoE runtime that moves offloaded experts into GPU slots —
// speculative prefetches on a low-priority copy stream driven by a worker thread, demand loads on a
// high-priority stream, and per-slot events so compute waits only for the experts it reads
// (issue 7; nvcc only).
//
// Three calls make the protocol:
//   prefetch(keys)          the draft phase (or any predictor) names experts verification will
//                           probably need; each one not resident gets a slot (expert_cache::admit,
//                           speculative) and a copy job in a FIFO queue. Returns at once.
//   acquire(keys, compute)  a layer is about to run its expert kernels on `compute`: every key is
//                           made resident (a queued job is stolen and issued on the demand stream; a
//                           miss is admitted and copied on the demand stream), pinned, and
//                           `compute` waits for each key's slot "arrived" event. Never a host wait
//                           on a copy.
//   release(keys, compute)  after those kernels: each slot's "released" event is recorded on
//                           `compute` and the keys are unpinned; the next copy into the slot waits
//                           for that event, so a slot is never overwritten while a kernel reads it.
//
// NOTES (the invariants that make it race-free):
//   - every cache decision (admit, use, pin, evict) and all slot bookkeeping happen under one mutex;
//     the worker issues its CUDA calls outside it, marking the slots it is issuing;
//   - no cudaStreamWaitEvent is ever enqueued on an event whose record is not yet enqueued: a key is
//     "ready" only when its slot has no queued job, no worker issuing it and no caller filling it,
//     and anyone who finds otherwise steals the job or waits on a condition variable first;
//   - a fill of slot s waits for s's previous fill ("arrived") and last reader ("released"), clears
//     the previous occupant's table entries (if they still point at s), copies, publishes the new
//     occupant, then records "arrived": all in one stream, so a table entry is non-null only once
//     its bytes are there, in that stream's order, and "arrived" covers both bytes and entry;
//   - the worker keeps at most `max_inflight_batches` batches in its stream; the rest of the queue
//     stays on the host, where a demand miss can still steal a job instead of waiting behind it.
#pragma once

#include <specmoe/core/error.hpp>
#include <specmoe/offload/detail/cuda_try.cuh>
#include <specmoe/offload/detail/expert_copies.cuh>
#include <specmoe/offload/device_expert_slots.cuh>
#include <specmoe/offload/expert_cache.hpp>
#include <specmoe/offload/host_expert_store.cuh>

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <mutex>
#include <optional>
#include <span>
#include <thread>
#include <utility>
#include <vector>

namespace specmoe::offload {

/// @brief Numbers of the prefetcher (values, compared with ==).
struct prefetcher_config {
  int slots = 0;                  ///< GPU slots, each one expert block (the byte budget / expert_bytes)
  int min_slots = 1;              ///< the most distinct experts one acquire may need (one layer's
                                  ///< verification: min(E, tokens x top_k)); fewer slots is an error
  int max_batch = 4;              ///< jobs the worker issues together (coalesced, one batch copy)
  int max_inflight_batches = 1;   ///< worker batches in the copy stream at once; the rest stays stealable
  /// Bytes one worker batch may carry (at least one expert). Issued copies cannot be overtaken: a
  /// demand load waits for what is in flight, so this bounds its wait. Measured on an H100: with 8
  /// Mixtral experts (2.8 GB) in flight, demand loads waited behind them and draft prefetch lost to
  /// plain on-demand loading.
  std::size_t max_inflight_bytes = std::size_t{64} << 20;
  bool batched_copies = true;     ///< use cudaMemcpyBatchAsync where the toolkit has it (CUDA 12.8+)

  friend bool operator==(prefetcher_config const&, prefetcher_config const&) = default;
};

/// @brief What the prefetcher did (cumulative). The cache's own counters: prefetcher::cache_counters().
struct prefetch_counters {
  std::int64_t requests = 0;            ///< experts passed to prefetch()
  std::int64_t already_resident = 0;    ///< ... that were resident already (no job)
  std::int64_t refused = 0;             ///< ... that got no slot (every slot pinned or protected)
  std::int64_t speculative_copies = 0;  ///< experts copied by the worker
  std::int64_t speculative_bytes = 0;
  std::int64_t demand_copies = 0;       ///< experts copied on the demand stream (misses + stolen jobs)
  std::int64_t demand_bytes = 0;
  std::int64_t copy_operations = 0;     ///< copies after coalescing (both streams)
  std::int64_t copy_calls = 0;          ///< CUDA copy API calls (a batch call counts once)
  std::int64_t batches = 0;             ///< worker batches
  std::int64_t stolen_jobs = 0;         ///< queued prefetches a demand issued itself (late prefetches)
  std::int64_t dropped_jobs = 0;        ///< queued prefetches never issued (expert evicted first, or shutdown)
  std::int64_t acquired = 0;            ///< experts acquired
  std::int64_t ready_hits = 0;          ///< ... resident with their copy already issued (a prefetch or cache hit)
  std::int64_t misses = 0;              ///< ... not resident: demand loads

  /// Share of acquired experts whose copy had been issued before they were needed.
  [[nodiscard]] double hit_rate() const noexcept {
    return acquired ? static_cast<double>(ready_hits) / static_cast<double>(acquired) : 0.0;
  }
};

/// @brief Offloaded-expert runtime over a host_expert_store: an expert_cache<Policy> book, the GPU
/// slot pool with its residency table, a speculative and a demand copy stream and a worker thread.
///
/// @tparam Policy the cache's replacement policy (lru_replacement, lfu_replacement,
///         protect_predicted<...>).
///
/// Thread safety: prefetch, acquire, release, protect, drain and the observers may be called from
/// several threads (e.g. a draft thread prefetching while the verification thread acquires).
/// A slot read by one acquire must be released on the stream the kernels that read it ran on; if
/// two streams read one expert at once, release them in device order (the slot's "released" event
/// holds the last record only).
///
/// Errors: CUDA failures in the worker are kept and rethrown as specmoe::error{errc::cuda} by the
/// next call on a caller thread; after a CUDA failure every call throws (the copy state is unknown).
template <replacement_policy Policy = lru_replacement>
class prefetcher {
 public:
  /// @param store the pinned host experts; must outlive the prefetcher.
  /// @throw specmoe::error invalid_argument (config, or slots < min_slots: "the budget must fit at
  ///        least one layer's top_k") or cuda (allocation, streams, events).
  prefetcher(host_expert_store const& store, prefetcher_config const& config, Policy policy = {})
      : store_(store),
        config_(checked(config, store)),
        cache_(store.layers(), store.experts(), config.slots, config.min_slots, policy),
        slots_(store.layout(), config.slots),
        fills_(static_cast<std::size_t>(config.slots)),
        batch_api_(config.batched_copies) {
    SPECMOE_CUDA_TRY(cudaGetDevice(&device_));
    try {
      create_cuda_objects();
    } catch (...) {
      destroy_cuda_objects();
      throw;
    }
    worker_ = std::thread([this] { run_worker(); });
  }

  prefetcher(prefetcher const&) = delete;
  prefetcher& operator=(prefetcher const&) = delete;

  /// @brief Stops the worker, drops queued jobs that were never issued (their experts leave the
  /// cache book), waits for copies in flight, and frees everything. Never throws, never hangs on a
  /// job that was not issued.
  ~prefetcher() {
    {
      std::lock_guard lk(m_);
      stop_ = true;
      drop_queued_jobs();
    }
    work_cv_.notify_all();
    state_cv_.notify_all();
    if (worker_.joinable()) worker_.join();
    if (speculative_stream_) cudaStreamSynchronize(speculative_stream_);
    if (demand_stream_) cudaStreamSynchronize(demand_stream_);
    destroy_cuda_objects();
  }

  /// @brief Queues speculative copies of the experts in `keys` that are not resident. An expert
  /// that gets no slot (every slot pinned, or protected under protect_predicted) is skipped and
  /// counted in `refused`. Returns without waiting for any copy.
  /// @throw specmoe::error for a key outside the store, or a stored worker failure.
  void prefetch(std::span<expert_key const> keys) {
    for (auto const k : keys) (void)store_.layout().block_index(k);  // all in range, or nothing queued
    {
      std::lock_guard lk(m_);
      rethrow_if_failed();
      for (auto const k : keys) {
        ++counters_.requests;
        if (cache_.resident(k)) {
          ++counters_.already_resident;
          continue;
        }
        auto const a = cache_.admit(k, /*speculative=*/true);
        if (!a) {
          ++counters_.refused;
          continue;
        }
        auto& f = fills_[static_cast<std::size_t>(a->slot)];
        if (f.queued) {
          ++counters_.dropped_jobs;  // the evicted expert's job was never issued: it now fills the slot with k
        } else {
          f.queued = true;
          f.ticket = ++next_ticket_;
          queue_.push_back({a->slot, f.ticket});
          ++queued_;
        }
      }
    }
    work_cv_.notify_one();
  }

  /// @brief Makes every expert in `keys` resident and pinned, and makes `compute` wait (in stream
  /// order, no host wait on copies) until each one's bytes and table entries have arrived.
  /// Duplicates are acquired once. Pair every acquire with a release of the same keys.
  /// @throw specmoe::error invalid_argument when the keys need more slots than the cache has, or no
  ///        slot can be freed (all pinned by other forwards); nothing stays pinned then. cuda on a
  ///        CUDA failure (then or earlier in the worker).
  void acquire(std::span<expert_key const> keys, cudaStream_t compute) {
    auto const need = distinct(keys);  // (throws for a key outside the store, before anything changes)
    std::unique_lock lk(m_);
    rethrow_if_failed();
    SPECMOE_EXPECTS(static_cast<int>(need.size()) <= cache_.capacity(), errc::invalid_argument, "prefetcher: one acquire needs ",
                    need.size(), " distinct experts but the cache has ", cache_.capacity(),
                    " slots (the budget must fit one layer's experts of a forward)");
    std::vector<int> slot_of(need.size(), -1);
    std::vector<detail::block_copy> fills;
    std::vector<expert_key> fill_keys, pinned;
    auto fill_now = [&](expert_key k, int s) {
      fill_of(s).caller_filling = true;
      fills.push_back({store_.layout().block_index(k), s, 1});
      fill_keys.push_back(k);
    };
    // Pass 1, the resident keys, pinned first so that pass 2's admissions cannot evict them.
    for (std::size_t i = 0; i < need.size(); ++i) {
      auto const k = need[i];
      if (!cache_.resident(k)) continue;
      ++counters_.acquired;
      cache_.use(k);
      int const s = cache_.slot_of(k);
      auto& f = fill_of(s);
      if (f.queued) {  // its prefetch is still on the host: issue it here, on the demand stream
        f.queued = false;
        --queued_;
        ++counters_.stolen_jobs;
        fill_now(k, s);
      } else {
        ++counters_.ready_hits;
      }
      cache_.pin(k);
      pinned.push_back(k);
      slot_of[i] = s;
    }
    // Pass 2, the misses: a slot each (demand admissions may evict protected experts), copied below.
    for (std::size_t i = 0; i < need.size(); ++i) {
      if (slot_of[i] >= 0) continue;
      auto const k = need[i];
      ++counters_.acquired;
      ++counters_.misses;
      cache_.use(k);
      auto const a = cache_.admit(k, /*speculative=*/false);
      if (!a) {
        roll_back(pinned, fill_keys);
        SPECMOE_FAIL(errc::invalid_argument, "prefetcher: no slot for layer ", k.layer, " expert ", k.expert, ": all ",
                     cache_.capacity(), " slots are pinned by forwards in flight (release them, or give the cache more slots)");
      }
      auto& f = fill_of(a->slot);
      if (f.queued) {  // the evicted expert's prefetch was never issued: drop it
        f.queued = false;
        --queued_;
        ++counters_.dropped_jobs;
      }
      fill_now(k, a->slot);
      cache_.pin(k);
      pinned.push_back(k);
      slot_of[i] = a->slot;
    }

    // Demand fills: wait until the worker is not issuing into those slots (the previous occupant's
    // copy must be enqueued before ours waits on its "arrived" event), then issue them now.
    state_cv_.wait(lk, [&] {
      return failed() || std::none_of(fills.begin(), fills.end(), [&](auto const& c) { return fill_of(c.slot).worker_issuing; });
    });
    if (!fills.empty()) {
      std::vector<fill_job> jobs;
      for (std::size_t i = 0; i < fills.size(); ++i) jobs.push_back(take_fill(fill_keys[i], fills[i].slot));
      issue_result const r = failed() ? issue_result{} : issue(jobs, demand_stream_);
      for (auto const& c : fills) fill_of(c.slot).caller_filling = false;
      state_cv_.notify_all();
      if (r.err != cudaSuccess) record_failure(r.err, r.what);
      rethrow_if_failed();
      counters_.demand_copies += static_cast<std::int64_t>(jobs.size());
      counters_.demand_bytes += static_cast<std::int64_t>(jobs.size() * store_.expert_bytes());
      counters_.copy_operations += r.operations;
      counters_.copy_calls += r.calls;
    }
    // Hits whose copy another thread (worker or caller) is issuing right now: wait until it is enqueued.
    state_cv_.wait(lk, [&] {
      return failed() || std::all_of(slot_of.begin(), slot_of.end(), [&](int s) {
               auto const& f = fill_of(s);
               return !f.worker_issuing && !f.caller_filling && !f.queued;
             });
    });
    rethrow_if_failed();
    for (int const s : slot_of) {
      if (cudaError_t const err = cudaStreamWaitEvent(compute, arrived_[static_cast<std::size_t>(s)], 0); err != cudaSuccess) {
        record_failure(err, "cudaStreamWaitEvent(compute, expert arrived)");
        rethrow_if_failed();
      }
    }
  }

  /// @brief After the kernels that read `keys` were enqueued on `compute`: records each slot's
  /// "released" event there and unpins the keys (the same keys as the acquire).
  /// @throw specmoe::error invalid_argument for a key that is not acquired, cuda on failure.
  void release(std::span<expert_key const> keys, cudaStream_t compute) {
    auto const need = distinct(keys);
    std::lock_guard lk(m_);
    for (auto const k : need) {  // all acquired, or nothing released
      int const s = cache_.slot_of(k);
      SPECMOE_EXPECTS(s >= 0 && cache_.slot(s).pins > 0, errc::invalid_argument, "prefetcher: release of layer ", k.layer,
                      " expert ", k.expert, " that is not acquired");
    }
    for (auto const k : need) {
      int const s = cache_.slot_of(k);
      cudaError_t const err = cudaEventRecord(released_[static_cast<std::size_t>(s)], compute);
      cache_.unpin(k);
      if (err != cudaSuccess) record_failure(err, "cudaEventRecord(compute, expert released)");
    }
    rethrow_if_failed();
  }

  /// @brief The experts predicted for the current verification (protect_predicted keeps them
  /// while any other slot can go). Replaces the previous set.
  void protect(std::span<expert_key const> keys) {
    std::lock_guard lk(m_);
    cache_.protect(keys);
  }

  /// @brief Earlier traffic for the cache's use counts (expert_cache::seed_uses).
  void seed_uses(std::span<std::uint64_t const> uses) {
    std::lock_guard lk(m_);
    cache_.seed_uses(uses);
  }

  /// @brief Waits until every queued speculative copy has been issued and has arrived.
  /// @throw specmoe::error cuda on a worker failure.
  void drain() {
    {
      std::unique_lock lk(m_);
      state_cv_.wait(lk, [&] { return failed() || (queued_ == 0 && !worker_busy_); });
      rethrow_if_failed();
    }
    SPECMOE_CUDA_TRY(cudaStreamSynchronize(speculative_stream_));
  }

  [[nodiscard]] prefetch_counters counters() const {
    std::lock_guard lk(m_);
    return counters_;
  }
  [[nodiscard]] offload::cache_counters cache_counters() const {
    std::lock_guard lk(m_);
    return cache_.counters();
  }
  /// The slot holding `k`, or -1 (a snapshot: may change as soon as the lock is gone).
  [[nodiscard]] int slot_of(expert_key k) const {
    std::lock_guard lk(m_);
    return cache_.slot_of(k);
  }
  /// @brief Calls `f(cache)` with the cache book under the prefetcher's lock (tests, statistics).
  template <class F>
  decltype(auto) inspect(F&& f) const {
    std::lock_guard lk(m_);
    return std::forward<F>(f)(static_cast<expert_cache<Policy> const&>(cache_));
  }

  [[nodiscard]] device_expert_slots const& slots() const noexcept { return slots_; }
  [[nodiscard]] host_expert_store const& store() const noexcept { return store_; }
  [[nodiscard]] prefetcher_config const& config() const noexcept { return config_; }
  /// The copy streams (speculative: lowest priority; demand: highest), for tests and timelines.
  [[nodiscard]] cudaStream_t speculative_stream() const noexcept { return speculative_stream_; }
  [[nodiscard]] cudaStream_t demand_stream() const noexcept { return demand_stream_; }

 private:
  /// Where a slot's next fill stands.
  struct slot_fill {
    bool queued = false;          // a speculative job for the slot's occupant waits in queue_
    std::uint64_t ticket = 0;     // matches the queue entry of that job (older entries are stale)
    bool worker_issuing = false;  // the worker is enqueuing the slot's fill right now
    bool caller_filling = false;  // an acquire admitted or stole it and is about to enqueue the fill
    std::optional<expert_key> published;  // the last expert whose table entries were pointed at the slot
  };
  struct fill_job {
    expert_key key;
    int slot = 0;
    std::optional<expert_key> retire;  // entries to clear first (if they still point at the slot)
  };
  struct issue_result {
    cudaError_t err = cudaSuccess;
    char const* what = "";
    long long operations = 0;
    long long calls = 0;
  };

  static prefetcher_config checked(prefetcher_config const& c, host_expert_store const& store) {
    SPECMOE_EXPECTS(c.max_batch >= 1 && c.max_inflight_batches >= 1, errc::invalid_argument,
                    "prefetcher_config: max_batch (", c.max_batch, ") and max_inflight_batches (", c.max_inflight_batches,
                    ") must be >= 1");
    SPECMOE_EXPECTS(c.slots > 0, errc::invalid_argument, "prefetcher_config: slots must be positive, got ", c.slots);
    SPECMOE_EXPECTS(store.data() != nullptr, errc::invalid_argument, "prefetcher: the host store holds no memory (moved from?)");
    return c;
  }

  slot_fill& fill_of(int s) { return fills_[static_cast<std::size_t>(s)]; }
  [[nodiscard]] bool failed() const noexcept { return static_cast<bool>(error_); }
  void rethrow_if_failed() const {
    if (error_) std::rethrow_exception(error_);
  }
  void record_failure(cudaError_t err, char const* what) {
    if (error_) return;
    try {
      detail::throw_cuda(err, what);
    } catch (...) {
      error_ = std::current_exception();
    }
  }

  /// The keys once each, in order; throws for a key outside the store.
  std::vector<expert_key> distinct(std::span<expert_key const> keys) const {
    std::vector<expert_key> out;
    out.reserve(keys.size());
    for (auto const k : keys) {
      (void)store_.layout().block_index(k);
      if (std::find(out.begin(), out.end(), k) == out.end()) out.push_back(k);
    }
    return out;
  }

  /// Undoes a refused acquire: unpins what it pinned; experts it admitted or stole hold no bytes
  /// yet, so they leave the book.
  void roll_back(std::span<expert_key const> pinned, std::vector<expert_key> const& unfilled) noexcept {
    for (auto const k : pinned) {
      try {
        cache_.unpin(k);
      } catch (...) {
      }
    }
    for (auto const k : unfilled) {
      int const s = cache_.slot_of(k);
      if (s >= 0) fill_of(s).caller_filling = false;
      try {
        cache_.evict(k);
      } catch (...) {
      }
    }
    state_cv_.notify_all();
  }

  /// The fill of `slot` with `key`, taking the slot's last published expert to retire.
  fill_job take_fill(expert_key key, int slot) {
    auto& f = fill_of(slot);
    fill_job j{key, slot, f.published};
    f.published = key;
    return j;
  }

  /// Enqueues fills on `stream` (see the NOTES at the top). Caller: under the lock (demand path) or
  /// with the slots marked worker_issuing (worker).
  issue_result issue(std::vector<fill_job> const& jobs, cudaStream_t stream) {
    issue_result r;
    for (auto const& j : jobs) {
      auto const s = static_cast<std::size_t>(j.slot);
      if ((r.err = cudaStreamWaitEvent(stream, released_[s], 0)) != cudaSuccess) return r.what = "cudaStreamWaitEvent(released)", r;
      if ((r.err = cudaStreamWaitEvent(stream, arrived_[s], 0)) != cudaSuccess) return r.what = "cudaStreamWaitEvent(arrived)", r;
    }
    std::vector<residency_update> updates;
    for (auto const& j : jobs)
      if (j.retire) updates.push_back({*j.retire, j.slot, true});
    if ((r.err = slots_.enqueue_updates(updates, stream)) != cudaSuccess) return r.what = "residency table retire", r;
    std::vector<detail::block_copy> copies;
    for (auto const& j : jobs) copies.push_back({store_.layout().block_index(j.key), j.slot, 1});
    detail::coalesce(copies);
    r.operations = static_cast<long long>(copies.size());
    r.err = detail::enqueue_block_copies(copies, slots_.slot_ptr(0), store_.data(), store_.expert_bytes(), stream, batch_api_,
                                         device_, r.calls);
    if (r.err != cudaSuccess) return r.what = "host-to-device expert copy", r;
    updates.clear();
    for (auto const& j : jobs) updates.push_back({j.key, j.slot, false});
    if ((r.err = slots_.enqueue_updates(updates, stream)) != cudaSuccess) return r.what = "residency table publish", r;
    for (auto const& j : jobs) {
      if ((r.err = cudaEventRecord(arrived_[static_cast<std::size_t>(j.slot)], stream)) != cudaSuccess) {
        return r.what = "cudaEventRecord(arrived)", r;
      }
    }
    return r;
  }

  void run_worker() noexcept {
    if (cudaError_t const err = cudaSetDevice(device_); err != cudaSuccess) {
      std::lock_guard lk(m_);
      record_failure(err, "cudaSetDevice (prefetch worker)");
      state_cv_.notify_all();
      return;
    }
    std::vector<fill_job> batch;
    std::uint64_t batch_no = 0;
    try {
      for (;;) {
        // Throttle: batch b waits for batch b - max_inflight_batches to land, with no slot marked busy.
        cudaEvent_t const ring = batch_done_[batch_no % batch_done_.size()];
        if (cudaError_t const err = cudaEventSynchronize(ring); err != cudaSuccess) {
          std::lock_guard lk(m_);
          record_failure(err, "cudaEventSynchronize (prefetch throttle)");
          break;
        }
        {
          std::unique_lock lk(m_);
          work_cv_.wait(lk, [&] { return stop_ || failed() || queued_ > 0; });
          if (stop_ || failed()) break;
          pop_batch(batch);
        }
        if (batch.empty()) continue;
        issue_result r = issue(batch, speculative_stream_);
        if (r.err == cudaSuccess && (r.err = cudaEventRecord(ring, speculative_stream_)) != cudaSuccess) {
          r.what = "cudaEventRecord (prefetch batch done)";
        }
        {
          std::lock_guard lk(m_);
          for (auto const& j : batch) fill_of(j.slot).worker_issuing = false;
          worker_busy_ = false;
          if (r.err != cudaSuccess) {
            record_failure(r.err, r.what);
          } else {
            ++counters_.batches;
            counters_.speculative_copies += static_cast<std::int64_t>(batch.size());
            counters_.speculative_bytes += static_cast<std::int64_t>(batch.size() * store_.expert_bytes());
            counters_.copy_operations += r.operations;
            counters_.copy_calls += r.calls;
          }
        }
        state_cv_.notify_all();
        if (r.err != cudaSuccess) break;
        ++batch_no;
      }
    } catch (...) {  // bad_alloc and the like: keep it for the caller thread, never terminate
      std::lock_guard lk(m_);
      for (auto& f : fills_) f.worker_issuing = false;
      worker_busy_ = false;
      if (!error_) error_ = std::current_exception();
    }
    state_cv_.notify_all();
  }

  /// Under the lock: the next live jobs, up to max_batch, marked worker_issuing.
  void pop_batch(std::vector<fill_job>& batch) {
    batch.clear();
    std::size_t const by_bytes = std::max<std::size_t>(1, config_.max_inflight_bytes / store_.expert_bytes());
    int const limit = static_cast<int>(std::min<std::size_t>(static_cast<std::size_t>(config_.max_batch), by_bytes));
    while (static_cast<int>(batch.size()) < limit && !queue_.empty()) {
      auto const [s, ticket] = queue_.front();
      queue_.pop_front();
      auto& f = fill_of(s);
      if (!f.queued || f.ticket != ticket) continue;  // stolen or dropped since
      f.queued = false;
      --queued_;
      f.worker_issuing = true;
      batch.push_back(take_fill(cache_.slot(s).key, s));
    }
    worker_busy_ = !batch.empty();
  }

  /// Under the lock, at shutdown: jobs never issued are dropped and their experts leave the book
  /// (they hold no bytes).
  void drop_queued_jobs() noexcept {
    for (std::size_t s = 0; s < fills_.size(); ++s) {
      auto& f = fills_[s];
      if (!f.queued) continue;
      f.queued = false;
      --queued_;
      ++counters_.dropped_jobs;
      try {
        cache_.evict(cache_.slot(static_cast<int>(s)).key);
      } catch (...) {
      }
    }
    queue_.clear();
  }

  void create_cuda_objects() {
    int least = 0, greatest = 0;
    SPECMOE_CUDA_TRY(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    SPECMOE_CUDA_TRY(cudaStreamCreateWithPriority(&speculative_stream_, cudaStreamNonBlocking, least));
    SPECMOE_CUDA_TRY(cudaStreamCreateWithPriority(&demand_stream_, cudaStreamNonBlocking, greatest));
    auto make_events = [](std::vector<cudaEvent_t>& v, std::size_t n) {
      v.assign(n, nullptr);
      for (auto& e : v) SPECMOE_CUDA_TRY(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    };
    make_events(arrived_, fills_.size());
    make_events(released_, fills_.size());
    make_events(batch_done_, static_cast<std::size_t>(config_.max_inflight_batches));
  }

  void destroy_cuda_objects() noexcept {
    for (auto* v : {&arrived_, &released_, &batch_done_}) {
      for (auto e : *v)
        if (e) cudaEventDestroy(e);
      v->clear();
    }
    if (speculative_stream_) cudaStreamDestroy(speculative_stream_);
    if (demand_stream_) cudaStreamDestroy(demand_stream_);
    speculative_stream_ = demand_stream_ = nullptr;
  }

  host_expert_store const& store_;
  prefetcher_config config_;
  int device_ = 0;

  mutable std::mutex m_;
  std::condition_variable work_cv_;   // worker: jobs queued, or stop
  std::condition_variable state_cv_;  // callers: a slot's fill was enqueued, a batch finished, a failure
  expert_cache<Policy> cache_;
  device_expert_slots slots_;
  std::vector<slot_fill> fills_;                      // [slots]
  std::deque<std::pair<int, std::uint64_t>> queue_;   // FIFO of (slot, ticket); stale entries skipped
  int queued_ = 0;                                    // live jobs in queue_
  std::uint64_t next_ticket_ = 0;
  bool worker_busy_ = false;
  bool stop_ = false;
  std::exception_ptr error_;
  prefetch_counters counters_;

  std::atomic<bool> batch_api_;
  cudaStream_t speculative_stream_ = nullptr;
  cudaStream_t demand_stream_ = nullptr;
  std::vector<cudaEvent_t> arrived_;     // [slots] the slot's last fill (bytes + table entries) landed
  std::vector<cudaEvent_t> released_;    // [slots] the slot's last reader finished
  std::vector<cudaEvent_t> batch_done_;  // [max_inflight_batches] ring of the worker's batches
  std::thread worker_;
};

}  // namespace specmoe::offload
