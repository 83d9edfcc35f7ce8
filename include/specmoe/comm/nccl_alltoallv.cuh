// specmoe/comm/nccl_alltoallv.cuh: the portable device CommBackend (nvcc only, SPECMOE_HAS_NCCL):
// grouped ncclSend/ncclRecv per peer over the engine's communicator.
//
// How counts reach the receiver: a small exchange first. The rows each rank sends to each peer
// (4 bytes per peer) go through one grouped send/recv; the rank then waits for its stream and
// reads the counts on the host (one host synchronisation per dispatch, as torch's
// all_to_all_single with splits), and the rows go with exact sizes. Combine needs no exchange:
// both sides know the counts from dispatch. Not capturable in a CUDA graph (the host sync);
// nvlink_direct is the graph-friendly, host-sync-free backend.
//
// That host wait is bounded: it polls the stream and NCCL's asynchronous error, so a peer that
// never joins the exchange (a rank that skipped the forward, a crashed process) ends in
// errc::timeout and an NCCL failure in errc::comm, never a hang. The communicator is then stuck
// in the unfinished exchange: the engine aborts it (ncclCommAbort) and rebuilds the group.
#pragma once

#include <specmoe/comm/device_backend.cuh>
#include <specmoe/comm/nccl_bootstrap.cuh>

#include <cuda_runtime.h>
#include <nccl.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

namespace specmoe {

/// @brief Grouped NCCL send/recv: the fallback that works wherever NCCL does.
///
/// Construction is collective (it compares options across ranks through the communicator). The
/// communicator is the engine's and is not owned: it must outlive every copy of the backend.
/// Copies are cheap handles onto the same buffers, so one backend serves every layer.
class nccl_alltoallv {
 public:
  using space_type = cuda_space;

  /// @param timeout how long dispatch's host wait for the count exchange may take (positive).
  nccl_alltoallv(ncclComm_t comm, ep_buffer_options options, std::chrono::milliseconds timeout = std::chrono::milliseconds(10000))
      : s_(std::make_shared<state>(comm)) {
    auto& s = *s_;
    SPECMOE_EXPECTS(timeout.count() > 0, errc::invalid_argument, "nccl_alltoallv timeout must be positive");
    s.timeout = timeout;
    s.rank = s.boot.rank();
    s.D = s.boot.size();
    s.options = options;
    detail::validate(options, s.D);
    s.sms = detail::multiprocessor_count();
    long long const mine[5] = {options.max_tokens, options.hidden, options.top_k, options.token_shuffle ? 1 : 0,
                               options.fp8_dispatch ? 1 : 0};
    std::vector<long long> all(static_cast<std::size_t>(5 * s.D));
    s.boot.allgather(mine, sizeof mine, all.data());
    for (int r = 0; r < s.D; ++r) {
      auto const* o = all.data() + 5 * r;
      SPECMOE_EXPECTS(o[0] == mine[0] && o[1] == mine[1] && o[2] == mine[2] && o[3] == mine[3] && o[4] == mine[4],
                      errc::rank_mismatch, "nccl_alltoallv options differ: rank ", r, " has max_tokens ", o[0], ", hidden ",
                      o[1], ", top_k ", o[2], ", token_shuffle ", o[3], ", fp8_dispatch ", o[4], "; rank ", s.rank, " has ",
                      mine[0], ", ", mine[1], ", ", mine[2], ", ", mine[3], ", ", mine[4]);
    }
    // (after the exchange: every rank refuses together, none is left waiting in it)
    SPECMOE_EXPECTS(!options.fp8_dispatch, errc::unsupported,
                    "fp8 dispatch is built for nvlink_direct only; nccl_alltoallv carries bf16 rows");
    detail::ep_buffer_layout const layout(options, s.D);
    s.layout = layout;
    // Receive side (as nvlink_direct's), then the staging of the rows this rank sends.
    auto const rows = static_cast<std::size_t>(s.D) * static_cast<std::size_t>(options.max_tokens);
    s.stage_x_offset = layout.bytes;
    s.stage_ids_offset = s.stage_x_offset + (rows * static_cast<std::size_t>(options.hidden) * 2 + 255) / 256 * 256;
    s.stage_weights_offset = s.stage_ids_offset + (rows * static_cast<std::size_t>(options.top_k) * 4 + 255) / 256 * 256;
    s.counts_offset = s.stage_weights_offset + (rows * static_cast<std::size_t>(options.top_k) * 4 + 255) / 256 * 256;
    SPECMOE_CUDA_TRY(cudaMalloc(&s.buffer, s.counts_offset + 256));  // counts [D], shuffle flags [D], own flag
    SPECMOE_CUDA_TRY(cudaMemset(s.buffer, 0, s.counts_offset + 256));
    SPECMOE_CUDA_TRY(cudaMallocHost(&s.host_counts, 2 * sizeof(std::int32_t) * static_cast<std::size_t>(s.D)));
  }

  [[nodiscard]] int rank() const noexcept { return s_->rank; }
  [[nodiscard]] int num_ranks() const noexcept { return s_->D; }
  [[nodiscard]] ep_buffer_options options() const noexcept { return s_->options; }
  [[nodiscard]] ncclComm_t comm() const noexcept { return s_->boot.comm(); }

  void allgather(void const* mine, std::size_t bytes, void* all) { s_->boot.allgather(mine, bytes, all); }

  /// Rows into local staging (by destination), the count exchange, one host wait, the rows.
  void dispatch_async(ep_dispatch_args const& a, cudaStream_t stream) {
    auto& s = *s_;
    long long const region_rows = a.region_rows;
    detail::validate(a, s.options);
    long long const cap = region_rows, H = s.options.hidden, K = s.options.top_k;
    kernels::ep_row_targets tg{};
    for (int d = 0; d < s.D; ++d) {
      tg.x[d] = stage_x() + d * cap * H;
      tg.ids[d] = stage_ids() + d * cap * K;
      tg.weights[d] = stage_weights() + d * cap * K;
      tg.width[d] = a.width[static_cast<std::size_t>(d)];
    }
    SPECMOE_CUDA_TRY(kernels::launch_ep_send_rows(a.x, a.n, s.options.hidden, a.top_k, a.ids, a.weights, a.dest_of,
                                                  a.send_slot, a.send_counts, a.placement, tg, kernels::ep_signal{}, s.sms,
                                                  stream));
    auto const r = received();
    auto* ids_send = const_cast<std::int32_t*>(a.send_counts);
    group([&] {
      for (int p = 0; p < s.D; ++p) {
        nccl(ncclSend(ids_send + p, 1, ncclInt32, p, comm(), stream), "ncclSend(counts)");
        nccl(ncclRecv(r.counts + p, 1, ncclInt32, p, comm(), stream), "ncclRecv(counts)");
      }
    });
    SPECMOE_CUDA_TRY(cudaMemcpyAsync(s.host_counts, a.send_counts, sizeof(std::int32_t) * static_cast<std::size_t>(s.D),
                                     cudaMemcpyDeviceToHost, stream));
    SPECMOE_CUDA_TRY(cudaMemcpyAsync(s.host_counts + s.D, r.counts, sizeof(std::int32_t) * static_cast<std::size_t>(s.D),
                                     cudaMemcpyDeviceToHost, stream));
    wait_for_counts(stream);
    int const my_width = a.width[static_cast<std::size_t>(s.rank)];
    group([&] {
      for (int p = 0; p < s.D; ++p) {
        auto const out = static_cast<std::size_t>(s.host_counts[p]), in = static_cast<std::size_t>(s.host_counts[s.D + p]);
        auto const w = static_cast<std::size_t>(a.width[static_cast<std::size_t>(p)]);
        if (out > 0) {
          nccl(ncclSend(tg.x[p], out * static_cast<std::size_t>(H), ncclBfloat16, p, comm(), stream), "ncclSend(rows)");
          nccl(ncclSend(tg.ids[p], out * w, ncclInt32, p, comm(), stream), "ncclSend(ids)");
          nccl(ncclSend(tg.weights[p], out * w, ncclFloat32, p, comm(), stream), "ncclSend(weights)");
        }
        if (in > 0) {
          auto const region = static_cast<long long>(p) * cap;
          nccl(ncclRecv(r.x + region * H, in * static_cast<std::size_t>(H), ncclBfloat16, p, comm(), stream), "ncclRecv(rows)");
          nccl(ncclRecv(r.ids + region * my_width, in * static_cast<std::size_t>(my_width), ncclInt32, p, comm(), stream),
               "ncclRecv(ids)");
          nccl(ncclRecv(r.weights + region * my_width, in * static_cast<std::size_t>(my_width), ncclFloat32, p, comm(),
                        stream),
               "ncclRecv(weights)");
        }
      }
    });
    // Rows past each count: routed nowhere (the counts are already on the device).
    SPECMOE_CUDA_TRY(kernels::launch_ep_dispatch_wait(kernels::ep_wait{}, s.D, static_cast<int>(cap), my_width, r.counts,
                                                      r.ids, r.weights, a.status, s.sms, stream));
  }

  [[nodiscard]] ep_received received() const noexcept {
    auto& s = *s_;
    return {reinterpret_cast<__nv_bfloat16*>(s.buffer + s.layout.recv_x),
            reinterpret_cast<std::int32_t*>(s.buffer + s.layout.recv_ids),
            reinterpret_cast<float*>(s.buffer + s.layout.recv_weights),
            reinterpret_cast<std::int32_t*>(s.buffer + s.counts_offset)};
  }

  /// Result rows of region p go back to rank p; this rank's rows come back into region p of
  /// `returned()` (sizes from the counts of the last dispatch).
  void combine_async(__nv_bfloat16 const* results, long long region_rows, cudaStream_t stream) {
    auto& s = *s_;
    long long const cap = region_rows, H = s.options.hidden;
    auto* ret = const_cast<__nv_bfloat16*>(returned());
    group([&] {
      for (int p = 0; p < s.D; ++p) {
        auto const back = static_cast<std::size_t>(s.host_counts[s.D + p]), mine = static_cast<std::size_t>(s.host_counts[p]);
        if (back > 0)
          nccl(ncclSend(results + p * cap * H, back * static_cast<std::size_t>(H), ncclBfloat16, p, comm(), stream),
               "ncclSend(results)");
        if (mine > 0)
          nccl(ncclRecv(ret + p * cap * H, mine * static_cast<std::size_t>(H), ncclBfloat16, p, comm(), stream),
               "ncclRecv(results)");
      }
    });
  }

  [[nodiscard]] __nv_bfloat16 const* returned() const noexcept {
    return reinterpret_cast<__nv_bfloat16 const*>(s_->buffer + s_->layout.returned);
  }
  /// Nothing to wait for on the device: NCCL's kernels order the returns on the stream.
  [[nodiscard]] kernels::ep_wait combine_wait() const noexcept { return {}; }

  /// Shuffled reduce-scatter: the partial rows in slot order into local staging (one region of S
  /// rows per shard), then ncclReduceScatter (NCCL's bf16 sum: its order, not fp32-once).
  void reduce_scatter_async(shuffle_scatter_args const& a, cudaStream_t stream) {
    auto& s = *s_;
    auto const H = s.options.hidden;
    detail::validate_shuffle(a.tokens, a.shard_rows, s.D, s.options);
    if (a.shard_rows == 0) return;
    auto* stage = reinterpret_cast<__nv_bfloat16*>(s.buffer + s.layout.shuffle_partials);
    kernels::ep_row_targets tg{};
    for (int d = 0; d < s.D; ++d) tg.x[d] = stage + d * a.shard_rows * H;
    SPECMOE_CUDA_TRY(kernels::launch_shuffle_push_partials(a.partial, a.partial_stride, H, a.order, s.D, a.shard_rows, tg,
                                                           kernels::ep_signal{}, s.sms, stream));
    auto const count = tp_shard_count(a.tokens, s.D, s.rank);
    auto* reduced = reinterpret_cast<__nv_bfloat16*>(s.buffer + s.layout.shuffle_outputs);
    nccl(ncclReduceScatter(stage, reduced, static_cast<std::size_t>(a.shard_rows * H), ncclBfloat16, ncclSum, comm(), stream),
         "ncclReduceScatter(partials)");
    if (count > 0)
      SPECMOE_CUDA_TRY(cudaMemcpyAsync(a.shard, reduced, static_cast<std::size_t>(count * H) * 2, cudaMemcpyDeviceToDevice,
                                       stream));
  }

  /// Shuffled all-gather: ncclAllGather of every shard (and of each rank's bad-input flag), then
  /// the rows back in token order.
  void all_gather_async(shuffle_gather_args const& a, cudaStream_t stream) {
    auto& s = *s_;
    auto const H = s.options.hidden;
    detail::validate_shuffle(a.tokens, a.shard_rows, s.D, s.options, (a.shard_tags == nullptr) == (a.tags_out == nullptr));
    if (a.shard_rows == 0) return;
    auto* gathered = reinterpret_cast<__nv_bfloat16*>(s.buffer + s.layout.shuffle_outputs);
    auto* tags = reinterpret_cast<std::int32_t*>(s.buffer + s.layout.shuffle_tags);
    auto* bad = reinterpret_cast<std::int32_t*>(s.buffer + s.counts_offset + 64);  // [D]
    auto* my_bad = bad + kernels::ep_max_ranks;
    SPECMOE_CUDA_TRY(cudaMemcpyAsync(my_bad, &a.status->bits, sizeof(std::int32_t), cudaMemcpyDeviceToDevice, stream));
    group([&] {
      nccl(ncclAllGather(a.shard, gathered, static_cast<std::size_t>(a.shard_rows * H), ncclBfloat16, comm(), stream),
           "ncclAllGather(outputs)");
      nccl(ncclAllGather(my_bad, bad, 1, ncclInt32, comm(), stream), "ncclAllGather(flags)");
      if (a.shard_tags)
        nccl(ncclAllGather(a.shard_tags, tags, static_cast<std::size_t>(a.shard_rows), ncclInt32, comm(), stream),
             "ncclAllGather(tags)");
    });
    SPECMOE_CUDA_TRY(kernels::launch_shuffle_unpermute(kernels::ep_wait{}, gathered, a.order, s.D, a.shard_rows, H, a.out,
                                                       a.out_stride, tags, a.tags_out, bad, a.status, s.sms, stream));
  }

 private:
  struct state {
    explicit state(ncclComm_t comm) : boot(comm) {}
    nccl_bootstrap boot;
    int rank = 0, D = 1, sms = 80;
    ep_buffer_options options{};
    detail::ep_buffer_layout layout{ep_buffer_options{1, 8, 1}, 1};
    std::size_t stage_x_offset = 0, stage_ids_offset = 0, stage_weights_offset = 0, counts_offset = 0;
    std::byte* buffer = nullptr;
    std::int32_t* host_counts = nullptr;  // pinned [2D]: rows sent to, rows received from each peer
    std::chrono::milliseconds timeout{10000};
    state(state const&) = delete;
    state& operator=(state const&) = delete;
    ~state() {
      if (buffer) cudaFree(buffer);
      if (host_counts) cudaFreeHost(host_counts);
    }
  };

  void nccl(ncclResult_t r, char const* what) const {
    SPECMOE_EXPECTS(r == ncclSuccess, errc::comm, what, " on rank ", s_->rank, " failed: ", ncclGetErrorString(r), " (",
                    ncclGetLastError(comm()), ")");
  }
  /// The host wait of dispatch (the count exchange on `stream`), bounded by the timeout and cut
  /// short by an NCCL asynchronous error.
  void wait_for_counts(cudaStream_t stream) const {
    auto const start = std::chrono::steady_clock::now();
    for (unsigned polls = 0;; ++polls) {
      cudaError_t const q = cudaStreamQuery(stream);
      if (q == cudaSuccess) return;
      if (q != cudaErrorNotReady) SPECMOE_CUDA_TRY(q);
      if (polls % 64 != 63) continue;  // the clock and NCCL's state now and then; the stream as often as it can be asked
      ncclResult_t async = ncclSuccess;
      nccl(ncclCommGetAsyncError(comm(), &async), "ncclCommGetAsyncError");
      SPECMOE_EXPECTS(async == ncclSuccess, errc::comm, "dispatch's count exchange on rank ", s_->rank, ": NCCL reported ",
                      ncclGetErrorString(async), " (", ncclGetLastError(comm()), "); abort the communicator (ncclCommAbort)");
      auto const waited = std::chrono::steady_clock::now() - start;
      SPECMOE_EXPECTS(waited < s_->timeout, errc::timeout, "dispatch's count exchange on rank ", s_->rank,
                      ": a peer did not join within ", s_->timeout.count(),
                      " ms (a rank that skipped this forward, or a crashed process); the communicator is stuck in the "
                      "exchange: abort it (ncclCommAbort) and rebuild the group");
      if (waited > std::chrono::milliseconds(1)) std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  }

  /// ncclGroupStart/End around `f`, ending the group even when `f` throws.
  template <class F>
  void group(F&& f) const {
    SPECMOE_NCCL_TRY(ncclGroupStart());
    try {
      f();
    } catch (...) {
      ncclGroupEnd();
      throw;
    }
    nccl(ncclGroupEnd(), "ncclGroupEnd");
  }

  __nv_bfloat16* stage_x() const noexcept { return reinterpret_cast<__nv_bfloat16*>(s_->buffer + s_->stage_x_offset); }
  std::int32_t* stage_ids() const noexcept { return reinterpret_cast<std::int32_t*>(s_->buffer + s_->stage_ids_offset); }
  float* stage_weights() const noexcept { return reinterpret_cast<float*>(s_->buffer + s_->stage_weights_offset); }

  std::shared_ptr<state> s_;
};

}  // namespace specmoe
