// specmoe/offload/offloaded_moe_stack.cuh: the verification path of SP-MoE — L MoE layers of one
// model whose routed experts live in pinned host memory and reach the GPU through the prefetcher
// (issue 7; nvcc only).
//
// One layer's forward of a verification batch (gamma draft tokens + 1):
//   1. route   the layer's own gate (cuBLAS logits + fused top-k; or the engine's routing);
//   2. learn   the top-k ids on the host (one small device-to-host copy and a stream sync: the
//              round trip every offloading runtime makes, since the host decides what to copy);
//   3. acquire the distinct experts: hits wait for their copies in stream order, misses are copied
//              on the high-priority demand stream;
//   4. compute moe_layer<cuda_space>::forward_async with that routing, its routed-expert tables
//              being the slot pool's residency table of this layer;
//   5. release the experts after the kernels (their slots may be refilled once these finish).
// The kernels and weights are the all-resident layer's; only the pointers differ. So the output is
// bit for bit the all-resident layer's whenever both take the same kernel path (always at decode
// sizes: the resident layer's wgmma path needs more than ~2 rows per expert, and is off here).
//
// While the draft model runs, `speculate(layer, experts)` passes its predictions to the prefetcher
// (the draft's layer-l router output predicts the target's layer l), so that verification finds
// them resident.
#pragma once

#include <specmoe/core/bfloat16.hpp>
#include <specmoe/core/error.hpp>
#include <specmoe/core/expert_weights.hpp>
#include <specmoe/core/routing.hpp>
#include <specmoe/layer/cuda_moe_layer.cuh>
#include <specmoe/offload/detail/cuda_try.cuh>
#include <specmoe/offload/expert_cache.hpp>
#include <specmoe/offload/expert_uses.hpp>
#include <specmoe/offload/host_expert_store.cuh>
#include <specmoe/offload/prefetcher.cuh>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

namespace specmoe::offload {

/// @brief Sizes and cache budget of an offloaded stack.
struct offloaded_stack_options {
  std::int64_t max_tokens = 8;  ///< the most tokens one layer forward carries (gamma + 1)
  /// The prefetcher's numbers. `slots` is the budget (experts over all layers); `min_slots` is
  /// raised to one layer's worst case, min(E, max_tokens x top_k), so a budget that cannot hold
  /// one forward's experts is refused at construction.
  prefetcher_config prefetch{};
};

/// @brief L MoE layers (one moe_config shape) on one GPU with offloaded routed experts.
///
/// @tparam Policy the expert cache's replacement policy. With a policy that protects
///         (protect_predicted), what `speculate` named since the last `new_step` is kept from
///         eviction by later prefetches until its layer's forward_layer has run. The default,
///         frequency_replacement, was 1.27-1.64x faster than LRU on demand on an H100
///         (DeepSeek-V2-Lite shape; decoding walks the layers in a loop longer than the cache,
///         LRU's worst case; docs/benchmarks.md). Under it a cold prefetch ranks lowest, so the
///         next prefetch evicts it: for draft prefetch use protect_predicted<frequency_replacement>
///         with the latency model's cutoff (deep prefetch then displaces the hot set: the cutoff
///         is what bounds it).
template <replacement_policy Policy = frequency_replacement>
class offloaded_moe_stack {
 public:
  /// @param config the shape of every layer (its `layer` field is set per layer).
  /// @param resident_parts per layer: the router (and score bias) and shared experts, device
  ///        views kept (not copied); their routed experts may be empty views (they come from `store`).
  /// @param store the routed experts of all layers (store.layers() == resident_parts.size()); it
  ///        must outlive the stack.
  /// @throw specmoe::error shape_mismatch (store vs config), invalid_argument (budget smaller than
  ///        one layer's forward), cuda.
  offloaded_moe_stack(moe_config const& config, std::span<moe_weights<bf16> const> resident_parts, host_expert_store const& store,
                      offloaded_stack_options const& options = {}, Policy policy = {})
      : config_(config),
        options_(options),
        prefetcher_(store, checked_prefetch(config, resident_parts, store, options), policy) {
    auto const& slots = prefetcher_.slots();
    for (int l = 0; l < store.layers(); ++l) {
      auto cfg = config_;
      cfg.layer = l;
      cuda_layer_options lo{.max_tokens = options_.max_tokens};
      lo.expert_tables = cuda_expert_tables{slots.gate_table(l), slots.up_table(l), slots.down_table(l), slots.gate_up_ld(),
                                            slots.down_ld()};
      layers_.push_back(std::make_unique<moe_layer<cuda_space>>(cfg, resident_parts[static_cast<std::size_t>(l)],
                                                                typename moe_layer<cuda_space>::policies_type{}, lo));
    }
    std::size_t const slots_per_forward = static_cast<std::size_t>(options_.max_tokens) * static_cast<std::size_t>(config_.top_k);
    SPECMOE_CUDA_TRY(cudaMalloc(&device_routing_, slots_per_forward * (sizeof(std::int32_t) + sizeof(float))));
    if (cudaError_t const err = cudaHostAlloc(&host_ids_, slots_per_forward * sizeof(std::int32_t), cudaHostAllocDefault);
        err != cudaSuccess) {
      cudaFree(device_routing_);
      detail::throw_cuda(err, "cudaHostAlloc(routing ids)");
    }
  }
  offloaded_moe_stack(offloaded_moe_stack const&) = delete;
  offloaded_moe_stack& operator=(offloaded_moe_stack const&) = delete;
  ~offloaded_moe_stack() {
    if (host_ids_) cudaFreeHost(host_ids_);
    if (device_routing_) cudaFree(device_routing_);
  }

  /// @brief Layer `layer`'s MoE output for `x` (gate included), enqueued on `stream`. Synchronises
  /// `stream` once (after the gate, to read the top-k ids); returns with the expert kernels
  /// enqueued. Device-side input errors of this forward are raised by `check(layer, stream)`.
  /// @param x [n, hidden] dense bf16 device rows, n <= max_tokens; out [n, hidden] device.
  /// @throw specmoe::error (shapes, NaN logits found by the gate, cache budget, CUDA).
  void forward_layer(int layer, matrix_view<bf16 const> x, matrix_view<bf16> out, cudaStream_t stream) {
    auto& l = checked_layer(layer, x.rows);
    auto const n = x.rows;
    int const k = config_.top_k;
    auto const count = static_cast<std::size_t>(n * k);
    auto* ids = static_cast<std::int32_t*>(device_routing_);
    auto* weights = reinterpret_cast<float*>(ids + options_.max_tokens * k);
    l.route_async(x, {ids, weights}, stream);
    if (n > 0) {
      SPECMOE_CUDA_TRY(cudaMemcpyAsync(host_ids_, ids, count * sizeof(std::int32_t), cudaMemcpyDeviceToHost, stream));
    }
    l.check(stream);  // the host round trip; also raises NaN logits before any expert is loaded
    routing_view const r{std::span<std::int32_t const>(ids, count), std::span<float const>(weights, count), n, k};
    forward_layer(layer, x, r, std::span<std::int32_t const>(host_ids_, count), out, stream);
  }

  /// @brief The same with routing the engine already has: `device_routing` (device views, as
  /// cuda_batch::routing) and the same ids on the host (`host_ids`, [n, top_k], -1 = empty slot).
  /// No host synchronisation.
  void forward_layer(int layer, matrix_view<bf16 const> x, routing_view device_routing, std::span<std::int32_t const> host_ids,
                     matrix_view<bf16> out, cudaStream_t stream) {
    auto& l = checked_layer(layer, x.rows);
    SPECMOE_EXPECTS(host_ids.size() == static_cast<std::size_t>(x.rows * config_.top_k), errc::shape_mismatch, "host_ids has ",
                    host_ids.size(), " entries, the batch needs ", x.rows, " x ", config_.top_k);
    keys_.clear();
    for (auto const e : host_ids) {
      SPECMOE_EXPECTS(e >= -1 && e < config_.num_experts, errc::expert_out_of_range, "expert id ", e, " outside [-1, ",
                      config_.num_experts, ") in layer ", layer, "'s routing");
      expert_key const key{layer, static_cast<int>(e)};
      if (e >= 0 && std::find(keys_.begin(), keys_.end(), key) == keys_.end()) keys_.push_back(key);
    }
    prefetcher_.acquire(keys_, stream);
    if constexpr (Policy::protects) {  // this layer has run: its guesses, right or wrong, need no slot any more
      auto const gone = std::remove_if(predicted_.begin(), predicted_.end(), [layer](expert_key k) { return k.layer == layer; });
      if (gone != predicted_.end()) {
        predicted_.erase(gone, predicted_.end());
        prefetcher_.protect(predicted_);
      }
    }
    try {
      l.forward_async(cuda_batch{x, device_routing}, out, stream);
    } catch (...) {
      prefetcher_.release(keys_, stream);
      throw;
    }
    prefetcher_.release(keys_, stream);
  }

  /// @brief Waits for `stream` and raises what the device flagged in layer `layer`'s last forward
  /// (moe_layer::check).
  void check(int layer, cudaStream_t stream) { checked_layer(layer, 0).check(stream); }

  /// @brief Predictions for layer `layer` (the draft's router, a look-ahead gate, a trace): the
  /// experts not resident are queued for speculative copies. Returns at once.
  void speculate(int layer, std::span<int const> experts) {
    SPECMOE_EXPECTS(layer >= 0 && layer < layers(), errc::invalid_argument, "speculate: layer ", layer, " outside [0, ", layers(), ")");
    std::vector<expert_key> keys;
    keys.reserve(experts.size());
    for (int const e : experts) {
      SPECMOE_EXPECTS(e >= 0 && e < config_.num_experts, errc::expert_out_of_range, "speculate: expert ", e, " outside [0, ",
                      config_.num_experts, ")");
      keys.push_back({layer, e});
    }
    if constexpr (Policy::protects) {
      predicted_.insert(predicted_.end(), keys.begin(), keys.end());
      prefetcher_.protect(predicted_);
    }
    prefetcher_.prefetch(keys);
  }

  /// @brief Starts warm: `uses` ([layers * experts], layer-major; e.g. uses_from_trace over a
  /// routing trace of earlier traffic) seeds the cache's use counts, and the most used experts are
  /// copied in until the cache is full (or every expert with a use is resident). Returns when the
  /// copies have landed. Call before the first step; any replacement policy may start so, only
  /// frequency_replacement ranks by the seeded counts afterwards.
  /// @throw specmoe::error shape_mismatch when `uses` is not layers * experts long; cuda on a copy failure.
  void warm_start(std::span<std::uint64_t const> uses) {
    prefetcher_.seed_uses(uses);
    auto const E = static_cast<std::size_t>(config_.num_experts);
    std::vector<expert_key> hot;
    for (std::size_t const i : most_used(uses, static_cast<std::size_t>(prefetcher_.config().slots))) {
      hot.push_back({static_cast<int>(i / E), static_cast<int>(i % E)});
    }
    prefetcher_.prefetch(hot);
    prefetcher_.drain();
  }

  /// @brief Starts a new decoding step: predictions of the previous one are no longer protected.
  void new_step() {
    predicted_.clear();
    if constexpr (Policy::protects) prefetcher_.protect({});
  }

  /// The distinct experts of the last forward_layer (its acquire set).
  [[nodiscard]] std::span<expert_key const> last_experts() const noexcept { return keys_; }
  [[nodiscard]] int layers() const noexcept { return static_cast<int>(layers_.size()); }
  [[nodiscard]] moe_config const& config() const noexcept { return config_; }
  [[nodiscard]] offloaded_stack_options const& options() const noexcept { return options_; }
  [[nodiscard]] offload::prefetcher<Policy>& prefetcher() noexcept { return prefetcher_; }
  [[nodiscard]] offload::prefetcher<Policy> const& prefetcher() const noexcept { return prefetcher_; }
  [[nodiscard]] moe_layer<cuda_space>& layer(int l) { return checked_layer(l, 0); }

 private:
  static prefetcher_config checked_prefetch(moe_config const& config, std::span<moe_weights<bf16> const> parts,
                                            host_expert_store const& store, offloaded_stack_options const& options) {
    config.validate();
    SPECMOE_EXPECTS(options.max_tokens > 0, errc::invalid_argument, "offloaded_moe_stack: max_tokens must be positive, got ",
                    options.max_tokens);
    SPECMOE_EXPECTS(store.layout() == expert_layout::of(config, store.layers()), errc::shape_mismatch,
                    "offloaded_moe_stack: the store holds experts of ", store.experts(), " x [", store.ffn(), ", ", store.hidden(),
                    "], the config needs ", config.num_experts, " x [", config.ffn_size, ", ", config.hidden_size, "]");
    SPECMOE_EXPECTS(static_cast<int>(parts.size()) == store.layers(), errc::shape_mismatch, "offloaded_moe_stack: ", parts.size(),
                    " layers of resident weights for a store of ", store.layers(), " layers");
    auto p = options.prefetch;
    auto const per_forward = std::min<std::int64_t>(config.num_experts, options.max_tokens * config.top_k);
    p.min_slots = std::max(p.min_slots, static_cast<int>(per_forward));
    return p;
  }
  moe_layer<cuda_space>& checked_layer(int layer, std::int64_t tokens) {
    SPECMOE_EXPECTS(layer >= 0 && layer < layers(), errc::invalid_argument, "offloaded_moe_stack: layer ", layer, " outside [0, ",
                    layers(), ")");
    SPECMOE_EXPECTS(tokens <= options_.max_tokens, errc::invalid_argument, tokens, " tokens exceed max_tokens ",
                    options_.max_tokens, " (offloaded_stack_options::max_tokens)");
    return *layers_[static_cast<std::size_t>(layer)];
  }

  moe_config config_;
  offloaded_stack_options options_;
  offload::prefetcher<Policy> prefetcher_;
  std::vector<std::unique_ptr<moe_layer<cuda_space>>> layers_;
  void* device_routing_ = nullptr;      // [max_tokens, top_k] ids, then as many weights
  std::int32_t* host_ids_ = nullptr;    // pinned [max_tokens, top_k]
  std::vector<expert_key> keys_;        // the last forward's distinct experts
  std::vector<expert_key> predicted_;   // this step's predictions (protect_predicted)
};

}  // namespace specmoe::offload
