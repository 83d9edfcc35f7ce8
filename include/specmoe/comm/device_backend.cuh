// specmoe/comm/device_backend.cuh: what the multi-rank cuda layer asks of a device CommBackend
// (nvcc only). Backends: nvlink_direct (comm/nvlink_direct.cuh), nccl_alltoallv (comm/nccl_alltoallv.cuh).
#pragma once

#include <specmoe/comm/concepts.hpp>
#include <specmoe/kernels/ep_dispatch.cuh>
#include <specmoe/kernels/token_shuffle.cuh>
#include <specmoe/placement/tp_shuffle.hpp>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <array>
#include <concepts>
#include <cstddef>
#include <cstdint>

namespace specmoe {

/// @brief Sizes a device backend's buffers once (they are registered with the peers once).
struct ep_buffer_options {
  std::int64_t max_tokens = 4096;  ///< most tokens one rank sends in one forward (its batch)
  int hidden = 0;                  ///< row width in bf16 elements (multiple of 8)
  int top_k = 0;                   ///< routing columns a row carries at most
  /// Also reserve the buffers of the shuffled reduce-scatter and all-gather (the layer's
  /// forward_tp_async, attention in tensor parallelism): 2 x ranks x max_tokens rows more (and one
  /// int a row for the all-gather's per-token tags).
  bool token_shuffle = false;
  /// Dispatch rows as fp8 (e4m3, one fp32 scale per 128 elements; kernels/ep_dispatch.cuh), about
  /// half the bytes on the links. Lossy: the experts see the rows rounded to fp8 (the gate and the
  /// shared experts do not), so the layer's output is no longer the plain layer's. nvlink_direct
  /// only; needs hidden % 128 == 0. Combine stays bf16. Memory: the fp8 receive rows and scales
  /// come on top of the bf16 ones they are widened into (about hidden x 1.03 bytes a row more).
  /// An infinite input saturates to its group's largest finite magnitude.
  bool fp8_dispatch = false;
};

/// @brief One dispatch, as the layer hands it to the backend (device pointers; see
/// kernels/ep_dispatch.cuh for the layout).
struct ep_dispatch_args {
  __nv_bfloat16 const* x = nullptr;  ///< [n, hidden] this rank's tokens
  long long n = 0;
  /// Rows between regions (the layer's max_tokens, the same on every rank, at most the buffers'
  /// max_tokens): the receiver's work scales with it, so small-batch layers stay small.
  long long region_rows = 0;
  int top_k = 0;
  std::int32_t const* ids = nullptr;      ///< [n, top_k] global expert ids
  float const* weights = nullptr;         ///< [n, top_k]
  std::int32_t const* dest_of = nullptr;  ///< [n, top_k] serving rank per slot (-1: none)
  std::int32_t const* send_slot = nullptr;  ///< [n, D] row in each destination's region (-1: not sent)
  std::int32_t const* send_counts = nullptr;  ///< [D] rows to each destination
  kernels::ep_placement_view placement{};
  std::array<int, kernels::ep_max_ranks> width{};  ///< routing columns each destination receives
  kernels::device_status* status = nullptr;
};

/// @brief What a rank received: [D * region_rows] rows (region per source), device memory.
struct ep_received {
  __nv_bfloat16* x = nullptr;     ///< [D * region_rows, hidden]
  std::int32_t* ids = nullptr;    ///< [D * region_rows, width] local expert ids, -1 past each count
  float* weights = nullptr;       ///< [D * region_rows, width]
  std::int32_t* counts = nullptr;  ///< [D] rows from each source
};

/// @brief A device CommBackend: moves rows between the ranks of an expert-parallel group, each
/// rank calling from its own thread or process with its own stream (`dispatch_async`, then the
/// expert step on `received()`, then `combine_async`, then a reduce that first honours
/// `combine_wait()`), and gathers small host blobs at setup (`allgather`).
template <class C>
concept device_comm_backend =
    comm_backend<C> && std::same_as<typename C::space_type, cuda_space> &&
    requires(C& c, C const& cc, ep_dispatch_args const& args, __nv_bfloat16 const* results, long long region_rows,
             cudaStream_t stream, void const* mine, void* all, std::size_t bytes) {
      { cc.rank() } -> std::convertible_to<int>;
      { cc.num_ranks() } -> std::convertible_to<int>;
      { cc.options() } -> std::convertible_to<ep_buffer_options>;
      c.allgather(mine, bytes, all);
      c.dispatch_async(args, stream);
      { cc.received() } -> std::same_as<ep_received>;
      c.combine_async(results, region_rows, stream);
      { cc.returned() } -> std::convertible_to<__nv_bfloat16 const*>;
      { cc.combine_wait() } -> std::same_as<kernels::ep_wait>;
    };

/// @brief A shuffled reduce-scatter (Speculative MoE, attention in tensor parallelism): every rank
/// holds a partial of all T tokens; rank d receives the sums of the tokens at slots d*S.. of
/// `order` (kernels/token_shuffle.cuh), in that order.
struct shuffle_scatter_args {
  __nv_bfloat16 const* partial = nullptr;  ///< [T, hidden] this rank's partial, row stride below
  long long partial_stride = 0;
  long long tokens = 0;                    ///< T, the same on every rank
  long long shard_rows = 0;                ///< S = ceil(T / D)
  std::int32_t const* order = nullptr;     ///< [D * S] token per slot (-1: none), the same on every rank
  __nv_bfloat16* shard = nullptr;          ///< [tp_shard_count(T, D, rank), hidden] out
  kernels::device_status* status = nullptr;
};

/// @brief The shuffled all-gather that undoes it: every rank's shard rows back to every rank, in
/// token order.
struct shuffle_gather_args {
  __nv_bfloat16 const* shard = nullptr;  ///< [S, hidden] (rows past this rank's count unused)
  long long tokens = 0;
  long long shard_rows = 0;
  std::int32_t const* order = nullptr;
  __nv_bfloat16* out = nullptr;          ///< [T, hidden] row stride below; untouched when any rank flagged bad input
  long long out_stride = 0;
  kernels::device_status* status = nullptr;  ///< this rank's flags (read: bad input of its shard; written: timeouts)
  /// Optional: one int per shard row [S] carried with the rows (the rank that served each token,
  /// for the inter-layer predictor), written to tags_out [T] in token order; both or neither.
  std::int32_t const* shard_tags = nullptr;
  std::int32_t* tags_out = nullptr;
};

/// @brief A device backend that also carries the token shuffle of forward_tp_async (buffers
/// reserved with ep_buffer_options::token_shuffle).
template <class C>
concept token_shuffle_backend =
    device_comm_backend<C> && requires(C& c, shuffle_scatter_args const& s, shuffle_gather_args const& g, cudaStream_t stream) {
      c.reduce_scatter_async(s, stream);
      c.all_gather_async(g, stream);
    };

namespace detail {

/// Checks a shuffle against the buffers (host side, before anything is enqueued).
inline void validate_shuffle(long long tokens, long long shard_rows, int num_ranks, ep_buffer_options const& o,
                             bool tags_paired = true) {
  SPECMOE_EXPECTS(tags_paired, errc::invalid_argument,
                  "shuffle_gather_args: shard_tags and tags_out are given together or not at all");
  SPECMOE_EXPECTS(o.token_shuffle, errc::invalid_argument,
                  "the backend has no token-shuffle buffers: build it with ep_buffer_options::token_shuffle = true");
  SPECMOE_EXPECTS(tokens >= 0 && shard_rows == tp_shard_rows(tokens, num_ranks) && shard_rows <= o.max_tokens,
                  errc::invalid_argument, "a shuffle of ", tokens, " tokens over ", num_ranks, " ranks needs shards of ",
                  tp_shard_rows(tokens, num_ranks), " rows; the buffers hold ", o.max_tokens, " per rank");
}

/// Checks buffer options once, naming what is wrong.
inline void validate(ep_buffer_options const& o, int num_ranks) {
  SPECMOE_EXPECTS(num_ranks > 0 && num_ranks <= kernels::ep_max_ranks, errc::unsupported, "expert-parallel groups of 1 to ",
                  kernels::ep_max_ranks, " ranks are supported, got ", num_ranks);
  SPECMOE_EXPECTS(o.max_tokens > 0 && o.max_tokens < (1ll << 31) / num_ranks, errc::invalid_argument,
                  "ep_buffer_options::max_tokens must be positive (and fit 32-bit row numbers), got ", o.max_tokens);
  SPECMOE_EXPECTS(o.hidden > 0 && o.hidden % 8 == 0, errc::invalid_argument,
                  "ep_buffer_options::hidden must be a positive multiple of 8, got ", o.hidden);
  SPECMOE_EXPECTS(o.top_k > 0 && o.top_k <= 32, errc::invalid_argument, "ep_buffer_options::top_k must be in [1, 32], got ",
                  o.top_k);
  SPECMOE_EXPECTS(!o.fp8_dispatch || o.hidden % kernels::ep_fp8_group == 0, errc::unsupported,
                  "fp8 dispatch needs hidden to be a multiple of ", kernels::ep_fp8_group, " (one scale per ",
                  kernels::ep_fp8_group, " elements), got ", o.hidden);
}

/// Checks that a dispatch fits the buffers (host side, before anything is enqueued).
inline void validate(ep_dispatch_args const& a, ep_buffer_options const& o) {
  SPECMOE_EXPECTS(a.n >= 0 && a.n <= a.region_rows && a.region_rows <= o.max_tokens && a.top_k <= o.top_k,
                  errc::invalid_argument, "dispatch of ", a.n, " tokens in regions of ", a.region_rows, " rows (top-k ",
                  a.top_k, ") does not fit buffers sized for ", o.max_tokens, " tokens, top-k ", o.top_k);
}

/// Buffers laid out identically on every rank, so one base pointer per peer finds them all.
struct ep_buffer_layout {
  std::size_t recv_x = 0, recv_ids = 0, recv_weights = 0, returned = 0, dispatch_flags = 0, combine_flags = 0, bytes = 0;
  std::size_t shuffle_partials = 0, shuffle_outputs = 0, shuffle_tags = 0, scatter_flags = 0, gather_flags = 0;  // token_shuffle
  std::size_t recv_x8 = 0, recv_scales = 0;                                                 // fp8_dispatch only

  ep_buffer_layout(ep_buffer_options const& o, int D) {
    auto const rows = static_cast<std::size_t>(D) * static_cast<std::size_t>(o.max_tokens);
    auto take = [this](std::size_t n) {
      auto const at = bytes;
      bytes += (n + 255) / 256 * 256;
      return at;
    };
    recv_x = take(rows * static_cast<std::size_t>(o.hidden) * 2);
    recv_ids = take(rows * static_cast<std::size_t>(o.top_k) * 4);
    recv_weights = take(rows * static_cast<std::size_t>(o.top_k) * 4);
    returned = take(rows * static_cast<std::size_t>(o.hidden) * 2);
    dispatch_flags = take(static_cast<std::size_t>(D) * 8);
    combine_flags = take(static_cast<std::size_t>(D) * 8);
    if (o.token_shuffle) {  // separate from the dispatch buffers: a peer may run one step ahead
      shuffle_partials = take(rows * static_cast<std::size_t>(o.hidden) * 2);
      shuffle_outputs = take(rows * static_cast<std::size_t>(o.hidden) * 2);
      shuffle_tags = take(rows * 4);
      scatter_flags = take(static_cast<std::size_t>(D) * 8);
      gather_flags = take(static_cast<std::size_t>(D) * 8);
    }
    if (o.fp8_dispatch) {
      recv_x8 = take(rows * static_cast<std::size_t>(o.hidden));
      recv_scales = take(rows * static_cast<std::size_t>(o.hidden / kernels::ep_fp8_group) * 4);
    }
  }
};

inline int multiprocessor_count() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
    return 80;
  return sms;
}

}  // namespace detail

}  // namespace specmoe
