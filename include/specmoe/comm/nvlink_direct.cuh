// specmoe/comm/nvlink_direct.cuh: the low-latency device CommBackend (nvcc only). Kernels write
// token rows straight into the peers' receive buffers over NVLink and signal arrival with flags:
// no host synchronisation, capturable in a CUDA graph, buffers registered once.
#pragma once

#include <specmoe/comm/bootstrap.hpp>
#include <specmoe/comm/device_backend.cuh>
#include <specmoe/core/cuda_error.cuh>

#include <cuda_runtime.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

namespace specmoe {

/// @brief Options of nvlink_direct: the buffer sizes, and how long a rank waits for a peer.
struct nvlink_direct_options : ep_buffer_options {
  /// A peer that does not signal within this time ends the forward with errc::timeout on the
  /// waiting rank (`check`), never a hang. The group is then out of step: rebuild it.
  std::chrono::milliseconds timeout{10000};
};

/// @brief Direct peer writes over NVLink (or within one GPU, for ranks that share a device).
///
/// Construction is collective over `boot` (every rank of the group, same options): each rank
/// allocates one buffer (receive regions, returned rows, flags), shares it (the pointer for ranks
/// of the same process, with peer access enabled; a CUDA IPC handle for other processes) and maps
/// the peers'. Copies are cheap handles onto the same buffers: one backend serves every layer of a
/// model (layers run one after another on the stream, and each forward's combine is the handshake
/// that makes the buffers free for the next).
class nvlink_direct {
 public:
  using space_type = cuda_space;

  /// @param boot how the ranks meet (in_process_group::member, nccl_bootstrap): kept for the
  ///        setup-time exchanges of the layers built on this backend.
  /// @throw specmoe::error: options that disagree across ranks (rank_mismatch), peers that cannot
  ///        reach each other (unsupported), CUDA failures (cuda).
  nvlink_direct(std::shared_ptr<bootstrap> boot_ptr, nvlink_direct_options options) : s_(std::make_shared<state>()) {
    SPECMOE_EXPECTS(boot_ptr != nullptr, errc::invalid_argument, "nvlink_direct needs a bootstrap");
    auto& s = *s_;
    s.boot = std::move(boot_ptr);
    auto& boot = *s.boot;
    s.rank = boot.rank();
    s.D = boot.size();
    s.options = options;
    detail::validate(options, s.D);
    SPECMOE_EXPECTS(options.timeout.count() > 0, errc::invalid_argument, "nvlink_direct timeout must be positive");
    SPECMOE_CUDA_TRY(cudaGetDevice(&s.device));
    s.sms = detail::multiprocessor_count();
    detail::ep_buffer_layout const layout(options, s.D);
    s.layout = layout;
    SPECMOE_CUDA_TRY(cudaMalloc(&s.own, layout.bytes));
    SPECMOE_CUDA_TRY(cudaMalloc(&s.local, 256));
    SPECMOE_CUDA_TRY(cudaMemset(s.own, 0, layout.bytes));  // flags at epoch 0, before any peer sees the buffer
    SPECMOE_CUDA_TRY(cudaMemset(s.local, 0, 256));
    SPECMOE_CUDA_TRY(cudaDeviceSynchronize());

    record mine{};
    mine.pid = static_cast<long long>(getpid());
    mine.device = s.device;
    mine.base = reinterpret_cast<std::uintptr_t>(s.own);
    mine.max_tokens = options.max_tokens;
    mine.hidden = options.hidden;
    mine.top_k = options.top_k;
    mine.token_shuffle = options.token_shuffle ? 1 : 0;
    mine.fp8_dispatch = options.fp8_dispatch ? 1 : 0;
    mine.timeout_ms = options.timeout.count();
    // (IPC is only needed for peers in other processes; a failure matters only there)
    {
      cudaDeviceProp prop{};
      SPECMOE_CUDA_TRY(cudaGetDeviceProperties(&prop, s.device));
      mine.uuid = prop.uuid;
    }
    mine.ipc_ok = cudaIpcGetMemHandle(&mine.handle, s.own) == cudaSuccess ? 1 : 0;
    if (!mine.ipc_ok) (void)cudaGetLastError();
    std::vector<record> all(static_cast<std::size_t>(s.D));
    boot.allgather(&mine, sizeof mine, all.data());
    for (int r = 0; r < s.D; ++r) {
      auto const& o = all[static_cast<std::size_t>(r)];
      SPECMOE_EXPECTS(o.max_tokens == mine.max_tokens && o.hidden == mine.hidden && o.top_k == mine.top_k &&
                          o.timeout_ms == mine.timeout_ms && o.token_shuffle == mine.token_shuffle &&
                          o.fp8_dispatch == mine.fp8_dispatch,
                      errc::rank_mismatch, "nvlink_direct options differ: rank ", r, " has max_tokens ", o.max_tokens,
                      ", hidden ", o.hidden, ", top_k ", o.top_k, ", timeout ", o.timeout_ms, " ms, token_shuffle ",
                      o.token_shuffle, ", fp8_dispatch ", o.fp8_dispatch, "; rank ", s.rank, " has ", mine.max_tokens, ", ",
                      mine.hidden, ", ", mine.top_k, ", ", mine.timeout_ms, " ms, ", mine.token_shuffle, ", ",
                      mine.fp8_dispatch);
    }
    s.peer.assign(static_cast<std::size_t>(s.D), nullptr);
    for (int r = 0; r < s.D; ++r) {
      auto const& o = all[static_cast<std::size_t>(r)];
      if (r != s.rank && std::memcmp(&o.uuid, &mine.uuid, sizeof mine.uuid) == 0) s.wait_blocks = 8;  // a peer on this GPU
      if (r == s.rank) {
        s.peer[static_cast<std::size_t>(r)] = s.own;
      } else if (o.pid == mine.pid) {  // same process: the pointer itself, across devices by peer access
        if (o.device != s.device) enable_peer_access(s.device, o.device);
        s.peer[static_cast<std::size_t>(r)] = reinterpret_cast<std::byte*>(o.base);
      } else {
        SPECMOE_EXPECTS(o.ipc_ok, errc::unsupported, "rank ", r, " (another process) could not export its buffer ",
                        "through CUDA IPC (cudaIpcGetMemHandle failed there)");
        void* p = nullptr;
        SPECMOE_CUDA_TRY(cudaIpcOpenMemHandle(&p, o.handle, cudaIpcMemLazyEnablePeerAccess));
        s.opened.push_back(p);
        s.peer[static_cast<std::size_t>(r)] = static_cast<std::byte*>(p);
      }
    }
    // Nobody may write into a peer before every rank has mapped every buffer.
    int token = s.rank, tokens[kernels::ep_max_ranks];
    boot.allgather(&token, sizeof token, tokens);
  }

  [[nodiscard]] int rank() const noexcept { return s_->rank; }
  [[nodiscard]] int num_ranks() const noexcept { return s_->D; }
  [[nodiscard]] ep_buffer_options options() const noexcept { return s_->options; }
  [[nodiscard]] std::chrono::milliseconds timeout() const noexcept { return s_->options.timeout; }

  /// Host all-gather among the ranks through the bootstrap (setup only: the layer compares
  /// configurations with it at construction).
  void allgather(void const* mine, std::size_t bytes, void* all) { s_->boot->allgather(mine, bytes, all); }

  void dispatch_async(ep_dispatch_args const& a, cudaStream_t stream) {
    auto& s = *s_;
    long long const region_rows = a.region_rows;
    detail::validate(a, s.options);
    auto const cap = region_rows;
    kernels::ep_row_targets tg{};
    kernels::ep_signal sig{};
    for (int d = 0; d < s.D; ++d) {
      auto* base = s.peer[static_cast<std::size_t>(d)];
      auto const w = a.width[static_cast<std::size_t>(d)];
      tg.x[d] = reinterpret_cast<__nv_bfloat16*>(base + s.layout.recv_x) + s.rank * cap * s.options.hidden;
      tg.ids[d] = reinterpret_cast<std::int32_t*>(base + s.layout.recv_ids) + s.rank * cap * w;
      tg.weights[d] = reinterpret_cast<float*>(base + s.layout.recv_weights) + s.rank * cap * w;
      tg.width[d] = w;
      if (s.options.fp8_dispatch) {
        tg.x8[d] = reinterpret_cast<std::uint8_t*>(base + s.layout.recv_x8) + s.rank * cap * s.options.hidden;
        tg.scales[d] = reinterpret_cast<float*>(base + s.layout.recv_scales) + s.rank * cap * (s.options.hidden / kernels::ep_fp8_group);
      }
      sig.flag[d] = reinterpret_cast<unsigned long long*>(base + s.layout.dispatch_flags) + s.rank;
    }
    sig.arrivals = arrivals(0);
    sig.epoch = epoch();
    sig.epoch_add = 1;
    SPECMOE_CUDA_TRY(kernels::launch_ep_send_rows(a.x, a.n, s.options.hidden, a.top_k, a.ids, a.weights, a.dest_of,
                                                  a.send_slot, a.send_counts, a.placement, tg, sig, s.sms, stream));
    kernels::ep_wait w{flags(s.layout.dispatch_flags), epoch(), 1, arrivals(1), timeout_ns(), kernels::device_error_peer_timeout,
                       s.wait_blocks};
    auto const r = received();
    SPECMOE_CUDA_TRY(kernels::launch_ep_dispatch_wait(w, s.D, static_cast<int>(cap), a.width[static_cast<std::size_t>(s.rank)],
                                                      r.counts, r.ids, r.weights, a.status, s.sms, stream));
    if (s.options.fp8_dispatch) {  // the rows the experts read: widened back to bf16 here
      SPECMOE_CUDA_TRY(kernels::launch_ep_fp8_widen(reinterpret_cast<std::uint8_t const*>(s.own + s.layout.recv_x8),
                                                    reinterpret_cast<float const*>(s.own + s.layout.recv_scales), r.counts, s.D,
                                                    cap, s.options.hidden, r.x, s.sms, stream));
    }
  }

  [[nodiscard]] ep_received received() const noexcept {
    auto& s = *s_;
    return {reinterpret_cast<__nv_bfloat16*>(s.own + s.layout.recv_x), reinterpret_cast<std::int32_t*>(s.own + s.layout.recv_ids),
            reinterpret_cast<float*>(s.own + s.layout.recv_weights), reinterpret_cast<std::int32_t*>(s.local + 64)};
  }

  /// Sends result row i of region s back to rank s (i < rows received from s), then signals.
  void combine_async(__nv_bfloat16 const* results, long long region_rows, cudaStream_t stream) {
    auto& s = *s_;
    auto const cap = region_rows;
    kernels::ep_row_targets tg{};
    kernels::ep_signal sig{};
    for (int d = 0; d < s.D; ++d) {
      auto* base = s.peer[static_cast<std::size_t>(d)];
      tg.x[d] = reinterpret_cast<__nv_bfloat16*>(base + s.layout.returned) + s.rank * cap * s.options.hidden;
      sig.flag[d] = reinterpret_cast<unsigned long long*>(base + s.layout.combine_flags) + s.rank;
    }
    sig.arrivals = arrivals(2);
    sig.epoch = epoch();
    sig.epoch_add = 0;
    SPECMOE_CUDA_TRY(kernels::launch_ep_return_rows(results, received().counts, s.D, static_cast<int>(cap), s.options.hidden,
                                                    tg, sig, s.sms, stream));
  }

  /// [D * capacity, hidden]: region d holds destination d's summed results for this rank's rows.
  [[nodiscard]] __nv_bfloat16 const* returned() const noexcept {
    return reinterpret_cast<__nv_bfloat16 const*>(s_->own + s_->layout.returned);
  }
  /// The wait the reduce after combine_async must do first (the returns of this forward).
  [[nodiscard]] kernels::ep_wait combine_wait() const noexcept {
    return {flags(s_->layout.combine_flags), epoch(), 0, nullptr, timeout_ns(), kernels::device_error_peer_timeout_combine,
            s_->wait_blocks};
  }

  /// Shuffled reduce-scatter: this rank's partial rows go straight into their shard owner's
  /// region for this rank; the owner waits for every rank and sums. Comes before the dispatch of
  /// the same forward (it signals the epoch the dispatch will open).
  void reduce_scatter_async(shuffle_scatter_args const& a, cudaStream_t stream) {
    auto& s = *s_;
    auto const H = s.options.hidden;
    detail::validate_shuffle(a.tokens, a.shard_rows, s.D, s.options);
    auto const [tg, sig] = shuffle_push(s.layout.shuffle_partials, s.layout.scatter_flags, a.shard_rows, 3, 1);
    SPECMOE_CUDA_TRY(kernels::launch_shuffle_push_partials(a.partial, a.partial_stride, H, a.order, s.D, a.shard_rows, tg, sig,
                                                           s.sms, stream));
    kernels::ep_wait const w{flags(s.layout.scatter_flags), epoch(), 1, nullptr, timeout_ns(),
                             kernels::device_error_peer_timeout_shuffle, s.wait_blocks};
    SPECMOE_CUDA_TRY(kernels::launch_shuffle_reduce(
        w, reinterpret_cast<__nv_bfloat16 const*>(s.own + s.layout.shuffle_partials), s.D, a.shard_rows,
        tp_shard_count(a.tokens, s.D, s.rank), H, a.shard, a.status, s.sms, stream));
  }

  /// Shuffled all-gather: this rank's shard rows go into every rank's region for this rank (with a
  /// bad-input mark in the signal); each rank waits for all and puts rows back in token order.
  /// Comes after the combine of the same forward.
  void all_gather_async(shuffle_gather_args const& a, cudaStream_t stream) {
    auto& s = *s_;
    auto const H = s.options.hidden;
    detail::validate_shuffle(a.tokens, a.shard_rows, s.D, s.options, (a.shard_tags == nullptr) == (a.tags_out == nullptr));
    auto [tg, sig] = shuffle_push(s.layout.shuffle_outputs, s.layout.gather_flags, a.shard_rows, 4, 0);
    for (int d = 0; d < s.D; ++d)
      tg.ids[d] = reinterpret_cast<std::int32_t*>(s.peer[static_cast<std::size_t>(d)] + s.layout.shuffle_tags) + s.rank * a.shard_rows;
    SPECMOE_CUDA_TRY(kernels::launch_shuffle_push_outputs(a.shard, a.shard_tags, tp_shard_count(a.tokens, s.D, s.rank), H, s.D,
                                                          tg, sig, a.status, s.sms, stream));
    kernels::ep_wait const w{flags(s.layout.gather_flags), epoch(), 0, nullptr, timeout_ns(),
                             kernels::device_error_peer_timeout_shuffle, s.wait_blocks};
    SPECMOE_CUDA_TRY(kernels::launch_shuffle_unpermute(w, reinterpret_cast<__nv_bfloat16 const*>(s.own + s.layout.shuffle_outputs),
                                                       a.order, s.D, a.shard_rows, H, a.out, a.out_stride,
                                                       reinterpret_cast<std::int32_t const*>(s.own + s.layout.shuffle_tags),
                                                       a.tags_out, nullptr, a.status, s.sms, stream));
  }

 private:
  struct record {
    long long pid;
    int device;
    int top_k;
    std::uintptr_t base;
    long long max_tokens;
    long long timeout_ms;
    int hidden;
    int ipc_ok;
    int token_shuffle;
    int fp8_dispatch;
    cudaUUID_t uuid;  // which GPU, across processes
    cudaIpcMemHandle_t handle;
  };

  struct state {
    std::shared_ptr<bootstrap> boot;
    int rank = 0, D = 1, device = 0, sms = 80;
    int wait_blocks = 0;  // cap on waiting kernels' blocks: small when a peer shares this GPU
    nvlink_direct_options options{};
    detail::ep_buffer_layout layout{ep_buffer_options{1, 8, 1}, 1};
    std::byte* own = nullptr;    // the buffer peers write into
    std::byte* local = nullptr;  // epoch, arrival counters, received counts (this rank only)
    std::vector<std::byte*> peer;
    std::vector<void*> opened;   // IPC mappings to close
    ~state() {
      for (void* p : opened) cudaIpcCloseMemHandle(p);
      if (own) cudaFree(own);
      if (local) cudaFree(local);
    }
  };

  static void enable_peer_access(int from, int to) {
    int can = 0;
    SPECMOE_CUDA_TRY(cudaDeviceCanAccessPeer(&can, from, to));
    SPECMOE_EXPECTS(can, errc::unsupported, "GPU ", from, " cannot access GPU ", to,
                    " directly (no NVLink or PCIe peer path): nvlink_direct needs peer access; use nccl_alltoallv");
    cudaError_t const e = cudaDeviceEnablePeerAccess(to, 0);
    if (e == cudaErrorPeerAccessAlreadyEnabled) {
      (void)cudaGetLastError();
      return;
    }
    SPECMOE_CUDA_TRY(e);
  }

  /// Where this rank's rows of a shuffle go (its region, `rows` rows a region, in every rank's
  /// buffer at `offset`) and how it signals (flag word at `flags_offset`, arrival counter
  /// `arrival`, epoch + `epoch_add`).
  std::pair<kernels::ep_row_targets, kernels::ep_signal> shuffle_push(std::size_t offset, std::size_t flags_offset,
                                                                      long long rows, int arrival,
                                                                      unsigned epoch_add) const noexcept {
    auto const& s = *s_;
    kernels::ep_row_targets tg{};
    kernels::ep_signal sig{};
    for (int d = 0; d < s.D; ++d) {
      auto* base = s.peer[static_cast<std::size_t>(d)];
      tg.x[d] = reinterpret_cast<__nv_bfloat16*>(base + offset) + s.rank * rows * s.options.hidden;
      sig.flag[d] = reinterpret_cast<unsigned long long*>(base + flags_offset) + s.rank;
    }
    sig.arrivals = arrivals(arrival);
    sig.epoch = epoch();
    sig.epoch_add = epoch_add;
    return {tg, sig};
  }

  unsigned int* epoch() const noexcept { return reinterpret_cast<unsigned int*>(s_->local); }
  unsigned int* arrivals(int i) const noexcept { return reinterpret_cast<unsigned int*>(s_->local) + 4 + i; }
  unsigned long long const* flags(std::size_t offset) const noexcept {
    return reinterpret_cast<unsigned long long const*>(s_->own + offset);
  }
  long long timeout_ns() const noexcept { return static_cast<long long>(s_->options.timeout.count()) * 1000000; }

  std::shared_ptr<state> s_;
};

}  // namespace specmoe
