// specmoe/layer/cuda_ep_layer.cuh: moe_layer on cuda_space across ranks — expert parallelism with a
// device CommBackend (nvcc only). One rank per GPU (or several ranks on one GPU, for tests), each
// calling forward on its own stream; no host synchronisation with nvlink_direct.
#pragma once

#include <specmoe/comm/device_backend.cuh>
#include <specmoe/core/expert_placement.hpp>
#include <specmoe/detail/scoped_stream.cuh>
#include <specmoe/kernels/ep_dispatch.cuh>
#include <specmoe/kernels/token_shuffle.cuh>
#include <specmoe/layer/cuda_moe_layer.cuh>
#include <specmoe/placement/tp_shuffle.hpp>

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

namespace specmoe {

/// @brief Options of the multi-rank cuda layer.
struct cuda_ep_layer_options {
  /// Most tokens one forward carries on a rank; 0 takes the backend's max_tokens. The receive side
  /// works over [ranks x max_tokens] rows, so a decode layer should say how small its batches are.
  std::int64_t max_tokens = 0;
};

/// @brief One forward with attention in tensor parallelism (forward_tp_async): every rank holds a
/// partial of every token (its attention output before the all-reduce), device memory.
struct cuda_tp_batch {
  matrix_view<bf16 const> partial;  ///< [T, hidden] this rank's partial; T the same on every rank
  std::int32_t const* token_ids = nullptr;  ///< [T] vocabulary ids (device predictors read them)
  /// [T] the engine's own guess of each token's rank (-1: none), used instead of the predictor;
  /// the same on every rank.
  std::int32_t const* predicted_rank = nullptr;
  float const* predicted_confidence = nullptr;  ///< [T] or null (every guess fully confident)
  std::optional<routing_view> routing{};        ///< [T, top_k] engine routing of every token (skips the gate)
};

/// A RouterPredictor that also guesses on the device (router/device_token_affinity.cuh).
template <class P>
concept device_router_predictor =
    router_predictor<P> && requires(P const& p, std::int32_t const* ids, std::int64_t n, std::int32_t* rank, float* conf,
                                    cudaStream_t stream) { p.predict_async(ids, n, rank, conf, stream); };

/// A predictor that learns from the layers before (router/device_layer_affinity.cuh): the layer
/// writes each token's serving rank where `served_ranks_target(T)` says, through its all-gather.
template <class P>
concept records_served_ranks = requires(P& p, std::int64_t n) {
  { p.served_ranks_target(n) } -> std::same_as<std::int32_t*>;
  { p.layer() } -> std::convertible_to<int>;
  { p.ranks() } -> std::convertible_to<int>;
};

/// @brief The expert-parallel layer: each rank holds the router, the shared experts, and the
/// routed experts the grouping places on it; tokens cross to the ranks that hold their experts.
///
/// Per forward on rank r (DESIGN.md's steps): gate (or the engine's routing), plan (serving rank
/// per token and expert, one row per destination however many of its experts live there),
/// dispatch (Comm), the local experts over the received rows (the single-GPU layer's kernels, each
/// row's experts summed at the expert rank), the shared experts at home, combine (Comm returns one
/// row per token and destination), and the reduce into `out` in token order.
///
/// Construction is collective: every rank builds the layer with the same config and grouping; a
/// rank that disagrees makes every rank throw `errc::rank_mismatch` naming the rank and field, and
/// a local check that fails on one rank (weights of the wrong shape, a predictor for another layer,
/// an allocation) makes every rank throw with that rank's code and message: no rank is left
/// waiting for a peer that gave up.
/// Bad input (expert id out of range, NaN logits or weights) is flagged on the device; `check`
/// raises it on the rank that had it, whose `out` stays untouched; the other ranks finish normally.
template <router_predictor Predictor, token_placement Placement, expert_grouping Grouping, prefetch_depth Prefetch,
          device_comm_backend Comm>
class moe_layer<cuda_space, Predictor, Placement, Grouping, Prefetch, Comm> {
  static_assert(!Predictor::predicts || device_router_predictor<Predictor>,
                "moe_layer<cuda_space, ..., device backend>: predictors run on the device here (device_token_affinity), "
                "or the engine passes its guesses in cuda_tp_batch::predicted_rank (with no_prediction)");
  static_assert(std::is_same_v<Placement, stay> || std::is_same_v<Placement, tp_balanced_shuffle>,
                "moe_layer<cuda_space, ..., device backend>: token placement is stay (plain) or tp_balanced_shuffle (the "
                "shuffled reduce-scatter of forward_tp_async)");
  static_assert(!Prefetch::offloads, "moe_layer<cuda_space, ..., device backend> keeps every expert resident");
  using local_layer = moe_layer<cuda_space>;  // the single-GPU layer runs this rank's experts
  static_assert(std::is_trivially_copyable_v<moe_config>);

 public:
  using space_type = cuda_space;
  using policies_type = layer_policies<Predictor, Placement, Grouping, Prefetch, Comm>;

  /// @param weights device views (kept, not copied): the router [E, H] (and score bias), the shared
  ///        experts, and only this rank's routed experts, in the order of
  ///        `placement().local_experts(rank)` (ascending expert id); experts.count is that number.
  /// @param policies `.comm` is the backend (built collectively before); config.num_ranks must be
  ///        its number of ranks.
  moe_layer(moe_config const& config, moe_weights<bf16> const& weights, policies_type policies,
            cuda_ep_layer_options options = {})
      : config_(config), weights_(weights), policies_(std::move(policies)) {
    auto& comm = policies_.comm;
    rank_ = comm.rank();
    D_ = comm.num_ranks();
    sms_ = detail::multiprocessor_count();
    auto const buffers = comm.options();
    max_tokens_ = options.max_tokens > 0 ? options.max_tokens : buffers.max_tokens;
    check_agreement();  // every rank throws alike when any rank disagrees (before any local check)
    // A local check that fails on one rank must not leave its peers waiting at the next exchange:
    // each stage's failure is shared, and every rank throws (the failing one its own error).
    std::exception_ptr failed;
    try {
      config_.validate();
      SPECMOE_EXPECTS(config_.num_ranks == D_, errc::invalid_argument, "config.num_ranks is ", config_.num_ranks,
                      " but the backend connects ", D_, " ranks");
      SPECMOE_EXPECTS(max_tokens_ <= buffers.max_tokens && config_.hidden_size == buffers.hidden &&
                          config_.top_k <= buffers.top_k,
                      errc::invalid_argument, "the layer (max_tokens ", max_tokens_, ", hidden ", config_.hidden_size,
                      ", top_k ", config_.top_k, ") does not fit the backend's buffers (max_tokens ", buffers.max_tokens,
                      ", hidden ", buffers.hidden, ", top_k ", buffers.top_k, ")");
      SPECMOE_EXPECTS(config_.hidden_size % 8 == 0, errc::unsupported, "hidden must be a multiple of 8, got ",
                      config_.hidden_size);
      placement_ = policies_.grouping.place(config_, rank_);
      SPECMOE_EXPECTS(placement_.num_experts() == config_.num_experts && placement_.num_ranks() == D_,
                      errc::shape_mismatch, "the grouping placed ", placement_.num_experts(), " experts on ",
                      placement_.num_ranks(), " ranks; the layer has ", config_.num_experts, " on ", D_);
    } catch (...) {
      failed = std::current_exception();
    }
    throw_together(failed);
    check_same_placement();
    try {
      if constexpr (records_served_ranks<Predictor>)
        SPECMOE_EXPECTS(policies_.predictor.layer() == config_.layer && policies_.predictor.ranks() == D_, errc::invalid_argument,
                        "the predictor is for layer ", policies_.predictor.layer(), " of a plan over ",
                        policies_.predictor.ranks(), " ranks; this is layer ", config_.layer, " over ", D_);
      local_experts_ = static_cast<int>(placement_.local_experts(rank_).size());
      validate_local_weights();
      allocate();
      load_router_kernels();
    } catch (...) {
      failed = std::current_exception();
      release();  // (a throwing constructor runs no destructor)
    }
    // Construction ends together (this exchange is also the barrier): no rank starts a forward
    // (whose kernels wait on peers) while a peer still allocates; ranks that share a GPU would
    // otherwise stall its allocations.
    throw_together(failed);
  }

  moe_layer(moe_layer const&) = delete;
  moe_layer& operator=(moe_layer const&) = delete;
  ~moe_layer() { release(); }

  [[nodiscard]] moe_config const& config() const noexcept { return config_; }
  [[nodiscard]] int rank() const noexcept { return rank_; }
  [[nodiscard]] expert_placement const& placement() const noexcept { return placement_; }
  [[nodiscard]] std::int64_t max_tokens() const noexcept { return max_tokens_; }
  [[nodiscard]] Comm& comm() noexcept { return policies_.comm; }

  /// @brief Enqueues out[t] = MoE(x[t]) for this rank's tokens on `stream` (every rank calls it for
  /// the same layer, in the same order). Host checks throw before anything is enqueued.
  void forward_async(cuda_batch const& batch, matrix_view<bf16> out, cudaStream_t stream,
                     cuda_routing_output routing_out = {}) {
    detail::check_cuda_forward<bf16>(batch.x, out, batch.routing, config_.hidden_size, config_.top_k, max_tokens_);
    SPECMOE_CUDA_TRY(cudaMemcpyAsync(status_, clean_status_, sizeof(kernels::device_status), cudaMemcpyDeviceToDevice,
                                     stream));
    last_tp_tokens_ = 0;
    enqueue_forward(batch, out, stream, routing_out);
  }

  /// @brief Enqueues the MoE block of a model whose attention runs in tensor parallelism, on
  /// `stream`: out[t] = MoE(sum over ranks of partial[t]) for all T tokens, on every rank (every
  /// rank calls it for the same layer, in the same order, with the same T).
  ///
  /// The all-reduce after attention becomes a reduce-scatter whose shards are chosen by the
  /// placement: `stay` splits the batch into contiguous shards (the plain block); with
  /// `tp_balanced_shuffle` each shard holds the tokens predicted to need this rank's experts
  /// (placement/tp_shuffle.hpp's rule), so fewer rows cross in the dispatch. Each rank then runs
  /// the expert-parallel forward on its shard, and an all-gather puts every token back in order.
  /// The same bytes as the all-reduce it replaces; the output does not depend on the guesses.
  /// Needs a token_shuffle_backend with ep_buffer_options::token_shuffle; T <= ranks x max_tokens.
  void forward_tp_async(cuda_tp_batch const& b, matrix_view<bf16> out, cudaStream_t stream)
    requires token_shuffle_backend<Comm>
  {
    auto const H = config_.hidden_size, k = config_.top_k;
    auto const T = b.partial.rows, S = tp_shard_rows(T, D_), count = tp_shard_count(T, D_, rank_);
    SPECMOE_EXPECTS(b.partial.cols == H && out.cols == H && out.rows == T, errc::shape_mismatch, "partial [", b.partial.rows,
                    ", ", b.partial.cols, "] and out [", out.rows, ", ", out.cols, "] must both be [tokens, ", H, "]");
    SPECMOE_EXPECTS(S <= max_tokens_, errc::invalid_argument, T, " tokens over ", D_, " ranks make shards of ", S,
                    " rows; the layer holds ", max_tokens_, " per rank (max_tokens)");
    SPECMOE_EXPECTS(b.partial.stride % 8 == 0 && out.stride % 8 == 0 && (T == 0 || (aligned(b.partial.data) && aligned(out.data))),
                    errc::invalid_argument, "partial and out must be 16-byte aligned device rows with strides a multiple of 8");
    SPECMOE_EXPECTS(policies_.comm.options().token_shuffle, errc::invalid_argument,
                    "forward_tp_async needs a backend built with ep_buffer_options::token_shuffle = true");
    if (b.routing)
      SPECMOE_EXPECTS(b.routing->num_tokens == T && b.routing->top_k == k &&
                          b.routing->topk_ids.size() == static_cast<std::size_t>(T * k) &&
                          b.routing->topk_weights.size() == static_cast<std::size_t>(T * k),
                      errc::shape_mismatch, "routing is [", b.routing->num_tokens, ", ", b.routing->top_k,
                      "], the batch needs [", T, ", ", k, "]");
    std::int32_t* served_out = nullptr;  // the inter-layer predictor's history: each token's serving rank
    if constexpr (records_served_ranks<Predictor>) served_out = policies_.predictor.served_ranks_target(T);  // (checks T)
    SPECMOE_CUDA_TRY(cudaMemcpyAsync(status_, clean_status_, sizeof(kernels::device_status), cudaMemcpyDeviceToDevice,
                                     stream));
    last_tp_tokens_ = T;
    if (T == 0) return;
    std::int32_t const* predicted = nullptr;
    float const* confidence = nullptr;
    if constexpr (Placement::moves_tokens) {
      if (b.predicted_rank) {
        predicted = b.predicted_rank;
        confidence = b.predicted_confidence;
      } else if constexpr (Predictor::predicts) {
        policies_.predictor.predict_async(b.token_ids, T, predicted_, confidence_, stream);
        predicted = predicted_;
        confidence = confidence_;
      }
    }
    SPECMOE_CUDA_TRY(kernels::launch_token_shuffle_plan(predicted, confidence, T, D_, S, rank_of_, order_, stream));
    auto& comm = policies_.comm;
    comm.reduce_scatter_async({reinterpret_cast<__nv_bfloat16 const*>(b.partial.data), b.partial.stride, T, S, order_,
                               shard_x_, status_},
                              stream);
    cuda_batch shard{matrix_view<bf16 const>(reinterpret_cast<bf16 const*>(shard_x_), count, H)};
    if (b.routing) {
      SPECMOE_CUDA_TRY(kernels::launch_shuffle_gather_routing(b.routing->topk_ids.data(), b.routing->topk_weights.data(), k,
                                                              order_ + rank_ * S, count, shard_ids_, shard_weights_, stream));
      shard.routing = routing_view{std::span<std::int32_t const>(shard_ids_, static_cast<std::size_t>(count * k)),
                                   std::span<float const>(shard_weights_, static_cast<std::size_t>(count * k)), count, k};
    }
    enqueue_forward(shard, matrix_view<bf16>(reinterpret_cast<bf16*>(shard_out_), count, H), stream, {});
    if (served_out)
      SPECMOE_CUDA_TRY(kernels::launch_served_ranks(b.routing ? shard_ids_ : ids_, count, k, placement_view(), served_, stream));
    comm.all_gather_async({shard_out_, T, S, order_, reinterpret_cast<__nv_bfloat16*>(out.data), out.stride, status_,
                           served_out ? served_ : nullptr, served_out},
                          stream);
  }

  /// @brief forward_tp_async, then check.
  void forward_tp(cuda_tp_batch const& b, matrix_view<bf16> out, cudaStream_t stream = nullptr)
    requires token_shuffle_backend<Comm>
  {
    forward_tp_async(b, out, stream);
    check(stream);
  }

  /// The rank each token of the last forward_tp sat on (waits for `stream`): the shuffle plan.
  [[nodiscard]] std::vector<int> token_ranks(cudaStream_t stream) const {
    SPECMOE_CUDA_TRY(cudaStreamSynchronize(stream));
    std::vector<int> ranks(static_cast<std::size_t>(last_tp_tokens_));
    if (!ranks.empty())
      SPECMOE_CUDA_TRY(cudaMemcpyAsync(ranks.data(), rank_of_, ranks.size() * 4, cudaMemcpyDeviceToHost, stream));
    return ranks;
  }

 private:
  /// The expert-parallel forward of `batch` (status already reset by the caller).
  void enqueue_forward(cuda_batch const& batch, matrix_view<bf16> out, cudaStream_t stream, cuda_routing_output routing_out) {
    auto const H = config_.hidden_size, k = config_.top_k;
    auto const n = batch.x.rows;
    auto const* x = reinterpret_cast<__nv_bfloat16 const*>(batch.x.data);
    std::int32_t const* ids = ids_;
    float const* weights = weights_out_;
    if (batch.routing) {
      ids = batch.routing->topk_ids.data();
      weights = batch.routing->topk_weights.data();
    } else if (n > 0) {
      auto* out_ids = routing_out.topk_ids ? routing_out.topk_ids : ids_;
      auto* out_weights = routing_out.topk_weights ? routing_out.topk_weights : weights_out_;
      enqueue_gate(x, n, out_ids, out_weights, stream);
      ids = out_ids;
      weights = out_weights;
    }
    auto& comm = policies_.comm;
    auto const view = placement_view();
    SPECMOE_CUDA_TRY(kernels::launch_ep_plan(ids, weights, n, k, view, rank_, dest_of_, send_slot_, send_counts_, status_,
                                             stream));
    ep_dispatch_args args{x,  n,         max_tokens_, k,    ids,     weights, dest_of_, send_slot_, send_counts_,
                          view, widths_, status_};
    comm.dispatch_async(args, stream);
    auto const received = comm.received();
    auto const rows = static_cast<std::int64_t>(D_) * max_tokens_;
    if (local_) {  // this rank's experts over every received row (rows past the counts route nowhere)
      auto const width = widths_[static_cast<std::size_t>(rank_)];
      routing_view const r{std::span<std::int32_t const>(received.ids, static_cast<std::size_t>(rows * width)),
                           std::span<float const>(received.weights, static_cast<std::size_t>(rows * width)), rows, width};
      local_->forward_async(cuda_batch{matrix_view<bf16 const>(reinterpret_cast<bf16 const*>(received.x), rows, H), r},
                            matrix_view<bf16>(reinterpret_cast<bf16*>(results_), rows, H), stream);
    }
    if (shared_ && n > 0) {  // shared experts at home: an MoE whose every token takes all of them, weight 1
      auto const S = config_.num_shared_experts;
      routing_view const r{std::span<std::int32_t const>(shared_ids_, static_cast<std::size_t>(n * S)),
                           std::span<float const>(shared_weights_, static_cast<std::size_t>(n * S)), n, S};
      shared_->forward_async(cuda_batch{batch.x, r}, matrix_view<bf16>(reinterpret_cast<bf16*>(shared_out_), n, H), stream);
    }
    comm.combine_async(results_, max_tokens_, stream);
    SPECMOE_CUDA_TRY(kernels::launch_ep_combine_reduce(comm.combine_wait(), comm.returned(), send_slot_, n, D_,
                                                       static_cast<int>(max_tokens_), H, shared_ && n > 0 ? shared_out_ : nullptr,
                                                       reinterpret_cast<__nv_bfloat16*>(out.data), out.stride, status_,
                                                       sms_, stream));
  }

 public:
  /// @brief Enqueues only the gate on `stream` (the same kernels as inside forward_async): top-k ids
  /// and weights of x's tokens into `routing_out` (device [tokens, top_k], both required). Local to
  /// this rank: no peer takes part. NaN logits are flagged for `check`.
  void route_async(matrix_view<bf16 const> x, cuda_routing_output routing_out, cudaStream_t stream) {
    auto const n = x.rows;
    SPECMOE_EXPECTS(x.cols == config_.hidden_size && x.stride == config_.hidden_size && n <= max_tokens_,
                    errc::shape_mismatch, "x [", x.rows, ", ", x.cols, "] must be dense [tokens <= ", max_tokens_, ", ",
                    config_.hidden_size, "]");
    SPECMOE_EXPECTS(routing_out.topk_ids && routing_out.topk_weights, errc::invalid_argument,
                    "route_async needs routing_out.topk_ids and routing_out.topk_weights");
    SPECMOE_EXPECTS(n == 0 || aligned(x.data), errc::invalid_argument, "x must be 16-byte aligned device memory");
    SPECMOE_CUDA_TRY(cudaMemcpyAsync(status_, clean_status_, sizeof(kernels::device_status), cudaMemcpyDeviceToDevice,
                                     stream));
    if (n > 0)
      enqueue_gate(reinterpret_cast<__nv_bfloat16 const*>(x.data), n, routing_out.topk_ids, routing_out.topk_weights,
                   stream);
  }

  /// @brief Waits for `stream` and raises what the device flagged during the last forward: bad
  /// input of this rank (expert_out_of_range, non_finite), or a peer that never signalled (timeout).
  void check(cudaStream_t stream) {
    SPECMOE_CUDA_TRY(cudaStreamSynchronize(stream));
    kernels::device_status s{};  // read on `stream`: the legacy stream could wait for a peer's collective
    SPECMOE_CUDA_TRY(cudaMemcpyAsync(&s, status_, sizeof s, cudaMemcpyDeviceToHost, stream));
    constexpr int timeouts = kernels::device_error_peer_timeout | kernels::device_error_peer_timeout_combine |
                             kernels::device_error_peer_timeout_shuffle;
    SPECMOE_EXPECTS(!(s.bits & timeouts), errc::timeout, "rank ", rank_, ": rank ", s.first_token, " did not signal its ",
                    s.bits & kernels::device_error_peer_timeout_shuffle ? "shuffled rows (reduce-scatter or all-gather)"
                    : s.bits & kernels::device_error_peer_timeout       ? "dispatched rows"
                                                                        : "combined results",
                    " within the backend's timeout; the expert-parallel group is out of step and must be rebuilt (did "
                    "every rank call forward for this layer, with the same token count?)");
    if (last_tp_tokens_ > 0 && (s.bits & kernels::device_error_peer_bad_input) == 0 && s.bits != 0 &&
        s.first_token >= 0 && s.first_token < max_tokens_) {  // name the batch's token, not the shard row
      std::int32_t token = -1;
      auto const slot = rank_ * tp_shard_rows(last_tp_tokens_, D_) + s.first_token;
      SPECMOE_CUDA_TRY(cudaMemcpyAsync(&token, order_ + slot, sizeof token, cudaMemcpyDeviceToHost, stream));
      s.first_token = token;
    }
    detail::raise_flagged_input(s, config_.num_experts, detail::concat("rank ", rank_, ": "));
    SPECMOE_EXPECTS(!(s.bits & kernels::device_error_peer_bad_input), errc::invalid_argument, "rank ", rank_, ": rank ",
                    s.first_token, " flagged bad input in the shard it computed (its check names it); out was not written");
    if (local_) local_->check(stream);
    if (shared_) shared_->check(stream);
  }

  /// @brief forward_async, then check.
  void forward(cuda_batch const& batch, matrix_view<bf16> out, cudaStream_t stream = nullptr,
               cuda_routing_output routing_out = {}) {
    forward_async(batch, out, stream, routing_out);
    check(stream);
  }

  /// Rows this rank sent to each rank in the last forward (waits for `stream`; self included).
  [[nodiscard]] std::vector<std::int32_t> sent_rows(cudaStream_t stream) const {
    SPECMOE_CUDA_TRY(cudaStreamSynchronize(stream));
    std::vector<std::int32_t> counts(static_cast<std::size_t>(D_));
    SPECMOE_CUDA_TRY(cudaMemcpyAsync(counts.data(), send_counts_, counts.size() * 4, cudaMemcpyDeviceToHost, stream));
    return counts;
  }

 private:
  static bool aligned(void const* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

  kernels::ep_placement_view placement_view() const {
    return {D_, config_.num_experts, owner_offset_, owners_, local_index_};
  }

  void release() noexcept {
    if (cublas_) cublasDestroy(cublas_);
    if (workspace_) cudaFree(workspace_);
    cublas_ = nullptr;
    workspace_ = nullptr;
  }

  /// Every rank learns whether any rank's construction stage failed, and then every rank throws:
  /// the failing rank its own error, the others one that names it and carries its message.
  void throw_together(std::exception_ptr const& failed) {
    struct outcome {
      std::int32_t failed = 0;
      std::int32_t code = 0;
      char what[240] = {};
    } mine;
    if (failed) {
      mine.failed = 1;
      std::string text;
      try {
        std::rethrow_exception(failed);
      } catch (specmoe::error const& e) {
        mine.code = static_cast<std::int32_t>(e.code());
        text = e.what();
      } catch (std::exception const& e) {
        mine.code = static_cast<std::int32_t>(errc::internal);
        text = e.what();
      } catch (...) {
        mine.code = static_cast<std::int32_t>(errc::internal);
        text = "an exception that is not a std::exception";
      }
      text.copy(mine.what, sizeof mine.what - 1);
    }
    std::vector<outcome> all(static_cast<std::size_t>(D_));
    policies_.comm.allgather(&mine, sizeof mine, all.data());
    if (failed) std::rethrow_exception(failed);
    for (int r = 0; r < D_; ++r) {
      auto const& o = all[static_cast<std::size_t>(r)];
      if (o.failed) {
        release();
        SPECMOE_FAIL(static_cast<errc>(o.code), "rank ", r, " could not build the layer, so neither can rank ", rank_, ": ",
                     std::string(o.what, strnlen(o.what, sizeof o.what)));
      }
    }
  }

  /// Every rank compares its config and max_tokens with every other's: all throw alike.
  void check_agreement() {
    struct fingerprint {
      moe_config config;
      std::int64_t max_tokens;
    } const mine{config_, max_tokens_};
    std::vector<fingerprint> all(static_cast<std::size_t>(D_));
    policies_.comm.allgather(&mine, sizeof mine, all.data());
    for (int r = 0; r < D_; ++r) {
      auto const& o = all[static_cast<std::size_t>(r)];
      auto const diff = describe_difference(all[0].config, o.config);
      SPECMOE_EXPECTS(diff.empty(), errc::rank_mismatch, "rank ", r, " disagrees with rank 0 on the layer config: ", diff,
                      " (rank 0 vs rank ", r, "; seen from rank ", rank_, ")");
      SPECMOE_EXPECTS(o.max_tokens == all[0].max_tokens, errc::rank_mismatch, "rank ", r, " built the layer for max_tokens ",
                      o.max_tokens, ", rank 0 for ", all[0].max_tokens, " (seen from rank ", rank_, ")");
    }
  }

  void check_same_placement() {
    std::uint64_t h = 1469598103934665603ull;  // FNV-1a over every expert's owners
    for (int e = 0; e < config_.num_experts; ++e) {
      for (int o : placement_.owners(e)) h = (h ^ static_cast<std::uint64_t>(o + 1)) * 1099511628211ull;
      h = (h ^ 0xffu) * 1099511628211ull;
    }
    std::vector<std::uint64_t> all(static_cast<std::size_t>(D_));
    policies_.comm.allgather(&h, sizeof h, all.data());
    for (int r = 0; r < D_; ++r)
      SPECMOE_EXPECTS(all[static_cast<std::size_t>(r)] == all[0], errc::rank_mismatch, "rank ", r,
                      " got a different expert placement from its grouping than rank 0 (seen from rank ", rank_, ")");
  }

  void validate_local_weights() const {
    auto const& w = weights_;
    auto const E = config_.num_experts, H = config_.hidden_size;
    SPECMOE_EXPECTS(w.router.weight.rows == E && w.router.weight.cols == H && w.router.weight.data, errc::shape_mismatch,
                    "router weight is [", w.router.weight.rows, ", ", w.router.weight.cols, "], the config needs [", E, ", ",
                    H, "]");
    SPECMOE_EXPECTS(config_.gate.has_score_bias == !w.router.score_bias.empty() &&
                        (!config_.gate.has_score_bias || static_cast<int>(w.router.score_bias.size()) == E),
                    errc::shape_mismatch, "score bias has ", w.router.score_bias.size(), " entries; the config needs ",
                    config_.gate.has_score_bias ? E : 0);
    SPECMOE_EXPECTS(w.experts.count() == local_experts_, errc::shape_mismatch, "rank ", rank_, " holds ", local_experts_,
                    " routed experts under the placement, but its weights have ", w.experts.count(),
                    " (pass only this rank's experts, in ascending expert id)");
  }

  /// Single-GPU layer over `count` experts taken from `ffn`, fed routing by the caller (its gate
  /// never runs: a zero router of the right shape satisfies its checks).
  std::unique_ptr<local_layer> make_local(ffn_weights<bf16> const& ffn, int count, int top_k, int ffn_size,
                                          std::int64_t max_tokens) {
    moe_config c{.hidden_size = config_.hidden_size, .ffn_size = ffn_size, .num_experts = count, .top_k = top_k};
    c.gate.renormalize = false;
    moe_weights<bf16> w{};
    w.router.weight = matrix_view<bf16 const>(reinterpret_cast<bf16 const*>(zero_router_), count, config_.hidden_size);
    w.experts = ffn;
    return std::make_unique<local_layer>(c, w, typename local_layer::policies_type{},
                                         cuda_layer_options{.max_tokens = max_tokens});
  }

  void enqueue_gate(__nv_bfloat16 const* x, std::int64_t n, std::int32_t* out_ids, float* out_weights,
                    cudaStream_t stream) {
    detail::enqueue_router_logits(cublas_, weights_.router.weight, x, n, logits_, stream);
    SPECMOE_CUDA_TRY(kernels::launch_topk_gate(logits_, n, kernels::gate_params::from(config_, bias_), out_ids, out_weights,
                                               status_, stream));
  }

  /// cuBLAS loads the kernels of a GEMM shape at its first call, and a load waits for kernels
  /// running anywhere in the process. One process driving several GPUs would deadlock when a rank's
  /// first gate at some token count loads a kernel while a peer's dispatch spins waiting for that
  /// rank. So the router GEMM runs here once per token-count bucket up to max_tokens (a ladder of
  /// 1..16, then steps of about 1/8: ~60 small GEMMs), before construction's closing barrier.
  void load_router_kernels() {
    auto const H = static_cast<std::size_t>(config_.hidden_size), N = static_cast<std::size_t>(max_tokens_);
    auto* x = reinterpret_cast<__nv_bfloat16*>(results_);  // D*N*H rows of scratch, nothing live yet
    specmoe::detail::scoped_stream const setup;
    cudaStream_t const stream = setup.get();
    SPECMOE_CUDA_TRY(cudaMemsetAsync(x, 0, N * H * 2, stream));
    for (std::int64_t n = 1; n <= max_tokens_; n = n < 16 ? n + 1 : n + std::max<std::int64_t>(1, n / 8))
      detail::enqueue_router_logits(cublas_, weights_.router.weight, x, n, logits_, stream);
    detail::enqueue_router_logits(cublas_, weights_.router.weight, x, max_tokens_, logits_, stream);
    SPECMOE_CUDA_TRY(cudaStreamSynchronize(stream));
  }

  template <class T>
  static T* carve(std::byte*& cursor, std::size_t count) {
    auto* p = reinterpret_cast<T*>(cursor);
    cursor += (count * sizeof(T) + 255) / 256 * 256;
    return p;
  }

  void allocate() {
    auto const N = static_cast<std::size_t>(max_tokens_), D = static_cast<std::size_t>(D_);
    auto const E = static_cast<std::size_t>(config_.num_experts), k = static_cast<std::size_t>(config_.top_k);
    auto const H = static_cast<std::size_t>(config_.hidden_size), S = static_cast<std::size_t>(config_.num_shared_experts);
    auto const router_rows = std::max<std::size_t>(static_cast<std::size_t>(local_experts_), S);
    auto size = [](std::size_t b) { return (b + 255) / 256 * 256; };
    std::size_t const cublas_ws = 4u << 20;
    std::size_t const owners = static_cast<std::size_t>(placement_.num_experts()) * D;  // at most every rank per expert
    std::size_t const bytes = size(2 * sizeof(kernels::device_status)) + size(N * E * 4) + 4 * size(N * k * 4) +
                              size(N * D * 4) + size(D * 4) + size((E + 1) * 4) + size(owners * 4) + size(D * E * 4) +
                              size(D * N * H * 2) + size(N * H * 2) + 2 * size(N * S * 4) + size(router_rows * H * 2) +
                              size(E * 4) + cublas_ws;
    bool const tp = policies_.comm.options().token_shuffle;
    std::size_t const tp_bytes = tp ? 4 * size(D * N * 4) + 2 * size(N * H * 2) + 2 * size(N * k * 4) + size(N * 4) : 0;
    SPECMOE_CUDA_TRY(cudaMalloc(&workspace_, bytes + tp_bytes));
    auto* cursor = static_cast<std::byte*>(workspace_);
    status_ = carve<kernels::device_status>(cursor, 1);
    clean_status_ = carve<kernels::device_status>(cursor, 1);
    logits_ = carve<float>(cursor, N * E);
    ids_ = carve<std::int32_t>(cursor, N * k);
    weights_out_ = carve<float>(cursor, N * k);
    dest_of_ = carve<std::int32_t>(cursor, N * k);
    carve<std::int32_t>(cursor, N * k);  // (spare: keeps the layout simple to extend)
    send_slot_ = carve<std::int32_t>(cursor, N * D);
    send_counts_ = carve<std::int32_t>(cursor, D);
    owner_offset_ = carve<std::int32_t>(cursor, E + 1);
    owners_ = carve<std::int32_t>(cursor, owners);
    local_index_ = carve<std::int32_t>(cursor, D * E);
    results_ = carve<__nv_bfloat16>(cursor, D * N * H);
    shared_out_ = carve<__nv_bfloat16>(cursor, N * H);
    shared_ids_ = carve<std::int32_t>(cursor, N * S);
    shared_weights_ = carve<float>(cursor, N * S);
    zero_router_ = carve<__nv_bfloat16>(cursor, router_rows * H);
    bias_ = carve<float>(cursor, E);
    auto* cublas_workspace = carve<std::byte>(cursor, cublas_ws);
    if (tp) {  // forward_tp_async: guesses, shuffle plan, the shard in and out
      predicted_ = carve<std::int32_t>(cursor, D * N);
      confidence_ = carve<float>(cursor, D * N);
      rank_of_ = carve<std::int32_t>(cursor, D * N);
      order_ = carve<std::int32_t>(cursor, D * N);
      shard_x_ = carve<__nv_bfloat16>(cursor, N * H);
      shard_out_ = carve<__nv_bfloat16>(cursor, N * H);
      shard_ids_ = carve<std::int32_t>(cursor, N * k);
      shard_weights_ = carve<float>(cursor, N * k);
      served_ = carve<std::int32_t>(cursor, N);
    }

    kernels::device_status const clean = kernels::clean_device_status;
    SPECMOE_CUDA_TRY(cudaMemcpy(clean_status_, &clean, sizeof clean, cudaMemcpyHostToDevice));
    SPECMOE_CUDA_TRY(cudaMemcpy(status_, &clean, sizeof clean, cudaMemcpyHostToDevice));
    SPECMOE_CUDA_TRY(cudaMemset(zero_router_, 0, router_rows * H * 2));
    if (config_.gate.has_score_bias) {
      SPECMOE_CUDA_TRY(cudaMemcpy(bias_, weights_.router.score_bias.data(), E * 4, cudaMemcpyDefault));
    } else {
      bias_ = nullptr;
    }
    // The placement, for the plan kernel.
    std::vector<std::int32_t> offset(E + 1), owner_list, local_index(D * E);
    for (int e = 0; e < config_.num_experts; ++e) {
      offset[static_cast<std::size_t>(e)] = static_cast<std::int32_t>(owner_list.size());
      for (int o : placement_.owners(e)) owner_list.push_back(o);
    }
    offset[E] = static_cast<std::int32_t>(owner_list.size());
    for (int r = 0; r < D_; ++r) {
      for (int e = 0; e < config_.num_experts; ++e)
        local_index[static_cast<std::size_t>(r) * E + static_cast<std::size_t>(e)] = placement_.local_index(r, e);
      auto const held = static_cast<int>(placement_.local_experts(r).size());
      widths_[static_cast<std::size_t>(r)] = std::min(config_.top_k, held);
    }
    SPECMOE_CUDA_TRY(cudaMemcpy(owner_offset_, offset.data(), offset.size() * 4, cudaMemcpyHostToDevice));
    SPECMOE_CUDA_TRY(cudaMemcpy(owners_, owner_list.data(), owner_list.size() * 4, cudaMemcpyHostToDevice));
    SPECMOE_CUDA_TRY(cudaMemcpy(local_index_, local_index.data(), local_index.size() * 4, cudaMemcpyHostToDevice));
    if (S > 0) {
      std::vector<std::int32_t> sid(N * S);
      std::vector<float> sw(N * S, 1.0f);
      for (std::size_t i = 0; i < sid.size(); ++i) sid[i] = static_cast<std::int32_t>(i % S);
      SPECMOE_CUDA_TRY(cudaMemcpy(shared_ids_, sid.data(), sid.size() * 4, cudaMemcpyHostToDevice));
      SPECMOE_CUDA_TRY(cudaMemcpy(shared_weights_, sw.data(), sw.size() * 4, cudaMemcpyHostToDevice));
    }
    SPECMOE_CUBLAS_TRY(cublasCreate(&cublas_));
    SPECMOE_CUBLAS_TRY(cublasSetWorkspace(cublas_, cublas_workspace, cublas_ws));  // capturable logits GEMM
    if (local_experts_ > 0) {
      local_ = make_local(weights_.experts, local_experts_, widths_[static_cast<std::size_t>(rank_)], config_.ffn_size,
                          static_cast<std::int64_t>(D * N));
    }
    if (S > 0) {
      local_shared_weights_ = weights_.shared;
      shared_ = make_local(local_shared_weights_, config_.num_shared_experts, config_.num_shared_experts,
                           config_.shared_ffn_size, max_tokens_);
    }
  }

  moe_config config_;
  moe_weights<bf16> weights_;
  policies_type policies_;
  int rank_ = 0, D_ = 1, local_experts_ = 0, sms_ = 80;
  std::int64_t max_tokens_ = 0;
  expert_placement placement_{1, {{0}}};
  std::array<int, kernels::ep_max_ranks> widths_{};
  ffn_weights<bf16> local_shared_weights_{};
  std::unique_ptr<local_layer> local_, shared_;
  void* workspace_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  kernels::device_status* status_ = nullptr;
  kernels::device_status* clean_status_ = nullptr;
  float* logits_ = nullptr;
  std::int32_t* ids_ = nullptr;
  float* weights_out_ = nullptr;
  std::int32_t* dest_of_ = nullptr;
  std::int32_t* send_slot_ = nullptr;
  std::int32_t* send_counts_ = nullptr;
  std::int32_t* owner_offset_ = nullptr;
  std::int32_t* owners_ = nullptr;
  std::int32_t* local_index_ = nullptr;
  __nv_bfloat16* results_ = nullptr;
  __nv_bfloat16* shared_out_ = nullptr;
  std::int32_t* shared_ids_ = nullptr;
  float* shared_weights_ = nullptr;
  __nv_bfloat16* zero_router_ = nullptr;
  float* bias_ = nullptr;
  // forward_tp_async only
  std::int64_t last_tp_tokens_ = 0;
  std::int32_t* predicted_ = nullptr;
  float* confidence_ = nullptr;
  std::int32_t* rank_of_ = nullptr;
  std::int32_t* order_ = nullptr;
  __nv_bfloat16* shard_x_ = nullptr;
  __nv_bfloat16* shard_out_ = nullptr;
  std::int32_t* shard_ids_ = nullptr;
  float* shard_weights_ = nullptr;
  std::int32_t* served_ = nullptr;  // [max_tokens] serving rank of each shard token (records_served_ranks)
};

}  // namespace specmoe
