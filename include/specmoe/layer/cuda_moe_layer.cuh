// specmoe/layer/cuda_moe_layer.cuh: moe_layer on cuda_space — one GPU, the caller's stream, no
// host synchronisation and no allocation inside forward_async (nvcc only).
#pragma once

#include <specmoe/core/bfloat16.hpp>
#include <specmoe/core/cuda_error.cuh>
#include <specmoe/core/error.hpp>
#include <specmoe/core/expert_weights.hpp>
#include <specmoe/kernels/combine.cuh>
#include <specmoe/kernels/decode_expert_ffn.cuh>
#include <specmoe/kernels/decode_routing.cuh>
#include <specmoe/kernels/gate.cuh>
#include <specmoe/kernels/grouped_gemm.cuh>
#include <specmoe/kernels/layout.cuh>
#include <specmoe/kernels/permute.cuh>
#include <specmoe/kernels/router_logits.cuh>
#include <specmoe/layer/moe_layer.hpp>

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

/// Throws specmoe::error{errc::cuda} naming the call when a cuBLAS call fails.
#define SPECMOE_CUBLAS_TRY(call)                                                                       \
  do {                                                                                                 \
    cublasStatus_t const specmoe_st_ = (call);                                                         \
    SPECMOE_EXPECTS(specmoe_st_ == CUBLAS_STATUS_SUCCESS, ::specmoe::errc::cuda, #call, " failed: ",   \
                    cublasGetStatusName(specmoe_st_));                                                 \
  } while (0)

namespace specmoe {

namespace detail {

/// Host checks of one forward's views, shared by the cuda layers: shapes, token budget, dense
/// 16-byte rows, engine routing of the right shape. Throws before anything is enqueued.
template <class T>
void check_cuda_forward(matrix_view<T const> x, matrix_view<T> out, std::optional<routing_view> const& routing, int hidden,
                        int top_k, std::int64_t max_tokens) {
  auto const n = x.rows;
  SPECMOE_EXPECTS(x.cols == hidden && out.cols == hidden && out.rows == n, errc::shape_mismatch, "x [", x.rows, ", ",
                  x.cols, "] and out [", out.rows, ", ", out.cols, "] must both be [tokens, ", hidden, "]");
  SPECMOE_EXPECTS(n <= max_tokens, errc::invalid_argument, n, " tokens exceed max_tokens ", max_tokens,
                  " the workspace was sized for (the layer options' max_tokens)");
  SPECMOE_EXPECTS(x.stride == hidden && out.stride % 8 == 0, errc::unsupported,
                  "x must be dense rows (stride = hidden) and out's stride a multiple of 8");
  // (fp32 rows: 8 elements are 32 bytes, so 16-byte alignment and hidden % 8 == 0 still suffice)
  auto aligned = [](void const* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; };
  SPECMOE_EXPECTS(n == 0 || (aligned(x.data) && aligned(out.data)), errc::invalid_argument,
                  "x and out must be 16-byte aligned device memory");
  if (routing) {
    SPECMOE_EXPECTS(routing->num_tokens == n && routing->top_k == top_k &&
                        routing->topk_ids.size() == static_cast<std::size_t>(n * top_k) &&
                        routing->topk_weights.size() == static_cast<std::size_t>(n * top_k),
                    errc::shape_mismatch, "routing is [", routing->num_tokens, ", ", routing->top_k, "], the batch needs [",
                    n, ", ", top_k, "]");
  }
}

/// Raises what the device flagged in a forward's status word (`who` prefixes the message).
inline void raise_flagged_input(kernels::device_status const& s, int num_experts, std::string const& who) {
  SPECMOE_EXPECTS(!(s.bits & kernels::device_error_expert_out_of_range), errc::expert_out_of_range, who,
                  "routing names an expert id outside [-1, ", num_experts, ") at token ", s.first_token,
                  " (first flagged); the output was not written");
  SPECMOE_EXPECTS(!(s.bits & kernels::device_error_duplicate_expert), errc::expert_out_of_range, who,
                  "routing names the same expert twice for token ", s.first_token,
                  " (first flagged); the output was not written");
  SPECMOE_EXPECTS(!(s.bits & kernels::device_error_non_finite_logit), errc::non_finite, who, "router logits of token ",
                  s.first_token, " (first flagged) are not finite (NaN or Inf); the output was not written");
  SPECMOE_EXPECTS(!(s.bits & kernels::device_error_non_finite_weight), errc::non_finite, who,
                  "a routing weight of token ", s.first_token, " (first flagged) is not finite; the output was not written");
}

/// logits^T [E, n] (column-major, fp32) = router [E, H] (bf16) . x^T on the handle's stream.
inline void enqueue_router_logits(cublasHandle_t cublas, matrix_view<bf16 const> router, __nv_bfloat16 const* x,
                                  std::int64_t n, float* logits, cudaStream_t stream) {
  float const one = 1.0f, zero = 0.0f;
  auto const E = static_cast<int>(router.rows), H = static_cast<int>(router.cols);
  auto const* w = reinterpret_cast<__nv_bfloat16 const*>(router.data);
  if (kernels::router_logits_supported(w, router.stride, E, H, x, n)) {  // decode: a block per expert
    SPECMOE_CUDA_TRY(kernels::launch_router_logits(w, router.stride, E, H, x, n, logits, stream));
    return;
  }
  SPECMOE_CUBLAS_TRY(cublasSetStream(cublas, stream));
  SPECMOE_CUBLAS_TRY(cublasGemmEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, E, static_cast<int>(n), H, &one, router.data,
                                  CUDA_R_16BF, static_cast<int>(router.stride), x, CUDA_R_16BF, H, &zero, logits, CUDA_R_32F,
                                  E, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

}  // namespace detail

/// @brief Routed-expert weight tables the caller keeps on the device, used instead of the layer's
/// own (offloaded experts: offload/device_expert_slots.cuh publishes one per layer, entry e pointing
/// into the GPU slot that holds expert e, or null while e is not resident).
///
/// The layer reads entry e only for experts the routing names, from inside its kernels, so the
/// entries may change between forwards (and before a forward's kernels run, in stream order).
/// Every expert a forward routes to must be resident when its kernels run: the caller's job.
/// With tables the Hopper wgmma path is off (its tensor maps are built once from fixed pointers);
/// the stream and mma paths read the tables.
struct cuda_expert_tables {
  __nv_bfloat16 const* const* gate = nullptr;  ///< device array [E] of device pointers, each [F, H] with row stride gate_up_ld
  __nv_bfloat16 const* const* up = nullptr;    ///< device array [E], each [F, H] with row stride gate_up_ld
  __nv_bfloat16 const* const* down = nullptr;  ///< device array [E], each [H, F] with row stride down_ld
  std::int64_t gate_up_ld = 0;                 ///< elements between rows of gate and up (>= hidden, multiple of 8)
  std::int64_t down_ld = 0;                    ///< elements between rows of down (>= ffn, multiple of 8)
};

/// @brief Sizes the cuda layer's workspace once, at construction.
struct cuda_layer_options {
  std::int64_t max_tokens = 8192;  ///< the most tokens one forward may carry (dropless up to here)
  /// Also size the workspace for fp32 activations (forward with cuda_batch_f32 and an fp32 output):
  /// the router runs in fp32, the expert GEMMs take bf16-rounded inputs with fp32 accumulation, and
  /// expert outputs and the combine stay fp32.
  bool fp32_activations = false;
  /// Routed experts through caller tables (offloading); moe_weights::experts may then be empty
  /// views (they are ignored). Router and shared experts still come from moe_weights.
  std::optional<cuda_expert_tables> expert_tables{};
  /// One-token steps (bf16 activations, FFN size up to 2048) run the gather, gate/up and down in
  /// one launch (kernels/decode_expert_ffn.cuh) rather than three; the same bits either way.
  /// Off by default: measured slower than the three launches on an H100 (1.06x at Qwen3-30B-A3B's
  /// one token, 1.2x at DeepSeek-V3's; docs/benchmarks.md, issue 4), kept for other GPUs and shapes.
  bool one_launch_decode_ffn = false;
};

/// @brief One forward's input on cuda_space: device views. T is bf16 (cuda_batch) or float
/// (cuda_batch_f32, needs cuda_layer_options::fp32_activations).
template <class T>
struct basic_cuda_batch {
  matrix_view<T const> x;                 ///< [num_tokens, hidden] device memory, dense rows (stride = hidden)
  std::optional<routing_view> routing{};  ///< engine routing in device memory (skips the gate)
};
using cuda_batch = basic_cuda_batch<bf16>;
using cuda_batch_f32 = basic_cuda_batch<float>;

/// @brief Where the layer may also write the routing the gate chose (device [num_tokens, top_k]).
struct cuda_routing_output {
  std::int32_t* topk_ids = nullptr;
  float* topk_weights = nullptr;
};

/// @brief The single-GPU layer: gate (cuBLAS logits + fused top-k), layout (stable radix sort),
/// permute, grouped expert GEMMs (gate/up + SwiGLU, down), shared experts, combine. A one-token
/// step (bf16, up to 256 experts) routes in one launch (kernels/decode_routing.cuh) and, with FFN
/// sizes up to 2048 and cuda_layer_options::one_launch_decode_ffn, runs its experts in one more
/// (kernels/decode_expert_ffn.cuh).
///
/// `forward_async` only enqueues work on the caller's stream (capturable in a CUDA graph); bad
/// input found on the device (NaN logits, expert ids out of range, non-finite routing weights)
/// is flagged there, the output is then left unwritten, and `check(stream)` (called by
/// `forward`) raises it as a specmoe::error naming the first token involved.
template <router_predictor Predictor, token_placement Placement, expert_grouping Grouping, prefetch_depth Prefetch,
          comm_backend Comm>
class moe_layer<cuda_space, Predictor, Placement, Grouping, Prefetch, Comm> {
  static_assert(!Predictor::predicts && !Placement::moves_tokens,
                "moe_layer<cuda_space> runs one GPU: predictors and token placement need the multi-GPU "
                "backends (use no_prediction and stay)");
  static_assert(!Prefetch::offloads, "moe_layer<cuda_space> keeps every expert resident (all_resident)");

 public:
  using space_type = cuda_space;
  using policies_type = layer_policies<Predictor, Placement, Grouping, Prefetch, Comm>;

  /// @param weights views of device memory (bf16), kept, not copied: they must outlive the layer.
  /// @throw specmoe::error on an invalid config, weight shapes that disagree with it, more than one
  ///        rank (errc::unsupported), or a CUDA failure while allocating the workspace.
  moe_layer(moe_config const& config, moe_weights<bf16> const& weights, policies_type policies = {},
            cuda_layer_options options = {})
      : config_(config), weights_(weights), policies_(std::move(policies)), options_(options) {
    config_.validate();
    SPECMOE_EXPECTS(config_.num_ranks == 1, errc::unsupported, "moe_layer<cuda_space> runs one rank; num_ranks is ",
                    config_.num_ranks, " (expert parallelism across GPUs needs a device CommBackend)");
    validate_weights(options_.expert_tables ? without_routed_experts(weights) : weights, config_, /*check_values=*/false);
    SPECMOE_EXPECTS(options_.max_tokens > 0, errc::invalid_argument, "max_tokens must be positive, got ",
                    options_.max_tokens);
    SPECMOE_EXPECTS(config_.hidden_size % 8 == 0 && config_.ffn_size % 8 == 0 &&
                        (config_.num_shared_experts == 0 || config_.shared_ffn_size % 8 == 0),
                    errc::unsupported, "hidden and FFN sizes must be multiples of 8 (16-byte rows), got ",
                    config_.hidden_size, " and ", config_.ffn_size);
    SPECMOE_EXPECTS(config_.top_k <= 32 && config_.gate.num_groups <= 32, errc::unsupported,
                    "the GPU gate handles top_k and num_groups up to 32");
    if (options_.expert_tables) {
      auto const& t = *options_.expert_tables;
      SPECMOE_EXPECTS(t.gate && t.up && t.down, errc::invalid_argument, "cuda_expert_tables: gate, up and down tables must be set");
      SPECMOE_EXPECTS(t.gate_up_ld >= config_.hidden_size && t.gate_up_ld % 8 == 0 && t.down_ld >= config_.ffn_size &&
                          t.down_ld % 8 == 0,
                      errc::unsupported, "cuda_expert_tables: row strides ", t.gate_up_ld, " (gate/up) and ", t.down_ld,
                      " (down) must be multiples of 8 and at least hidden ", config_.hidden_size, " / ffn ", config_.ffn_size);
    } else {
      check_expert_tensor(weights.experts.gate, "experts.gate");
      check_expert_tensor(weights.experts.up, "experts.up");
      check_expert_tensor(weights.experts.down, "experts.down");
    }
    allocate();
  }

  moe_layer(moe_layer const&) = delete;
  moe_layer& operator=(moe_layer const&) = delete;
  ~moe_layer() { release(); }

  /// Bytes of device memory the layer holds for max_tokens (workspace, pointer tables).
  [[nodiscard]] std::size_t workspace_bytes() const noexcept { return workspace_bytes_; }
  [[nodiscard]] moe_config const& config() const noexcept { return config_; }

  /// @brief Enqueues out[t] = MoE(x[t]) on `stream`. Host-side checks (shapes, alignment,
  /// max_tokens) throw before anything is enqueued; device-side ones are read by `check`.
  template <class T>
    requires(std::is_same_v<T, bf16> || std::is_same_v<T, float>)
  void forward_async(basic_cuda_batch<T> const& batch, matrix_view<T> out, cudaStream_t stream,
                     cuda_routing_output routing_out = {}) {
    constexpr bool fp32 = std::is_same_v<T, float>;
    SPECMOE_EXPECTS(!fp32 || options_.fp32_activations, errc::invalid_argument,
                    "fp32 activations need a layer built with cuda_layer_options::fp32_activations = true");
    auto const H = config_.hidden_size, E = config_.num_experts, k = config_.top_k;
    auto const n = batch.x.rows;
    detail::check_cuda_forward<T>(batch.x, out, batch.routing, H, k, options_.max_tokens);
    using dev_t = std::conditional_t<fp32, float, __nv_bfloat16>;
    auto const* x = reinterpret_cast<dev_t const*>(batch.x.data);
    auto const gate = kernels::gate_params::from(config_, bias_);
    auto const& router = weights_.router.weight;
    auto const* router_w = reinterpret_cast<__nv_bfloat16 const*>(router.data);
    // One token: router logits, gate and layout in one launch, which also writes the status word
    // (faster than the three launches only at one token: decode_routing.cuh).
    bool fused_routing = false;
    if constexpr (!fp32) {
      fused_routing = !batch.routing && n == 1 && kernels::decode_routing_supported(router_w, router.stride, H, x, n, gate);
    }
    if (!fused_routing) {
      SPECMOE_CUDA_TRY(cudaMemcpyAsync(status_, clean_status_, sizeof(kernels::device_status), cudaMemcpyDeviceToDevice,
                                       stream));
    }
    if (n == 0) return;
    std::int32_t const* ids = nullptr;
    float const* weights = nullptr;
    if (batch.routing) {
      ids = batch.routing->topk_ids.data();
      weights = batch.routing->topk_weights.data();
    } else {
      auto* out_ids = routing_out.topk_ids ? routing_out.topk_ids : ids_;
      auto* out_weights = routing_out.topk_weights ? routing_out.topk_weights : topk_weights_;
      if constexpr (!fp32) {
        if (fused_routing) {
          SPECMOE_CUDA_TRY(kernels::launch_decode_routing(router_w, router.stride, H, x, n, logits_, gate, out_ids, out_weights,
                                                          layout_, status_, arrivals_, stream));
        }
      }
      if (!fused_routing) enqueue_gate(x, n, out_ids, out_weights, stream);
      ids = out_ids;
      weights = out_weights;
    }
    if (!fused_routing) SPECMOE_CUDA_TRY(kernels::launch_layout(ids, weights, n, k, E, layout_, status_, stream));
    auto const rows = n * k;
    // expert outputs: bf16 for bf16 activations, fp32 for fp32 ones (combined in fp32 either way)
    auto* y = reinterpret_cast<dev_t*>(y_);
    auto* shared_y = reinterpret_cast<dev_t*>(shared_y_);
    // One token: gather, gate/up and down in one launch (kernels/decode_expert_ffn.cuh).
    bool fused_ffn = false;
    if constexpr (!fp32) {
      if (n == 1 && options_.one_launch_decode_ffn) {
        auto const a = decode_ffn_args(x, rows);
        fused_ffn = kernels::decode_expert_ffn_supported(a);
        if (fused_ffn) SPECMOE_CUDA_TRY(kernels::launch_decode_expert_ffn(a, y, ffn_sync_, stream));
      }
    }
    if (!fused_ffn) {
      // (caller tables: no tensor maps, so the automatic choice never takes the wgmma path)
      bool const own_tables = !options_.expert_tables;
      auto const* gate_up_maps = own_tables ? &gate_up_maps_ : nullptr;
      // Where gate/up runs the bulk-copy stream kernel (decode) or the wgmma kernel (Hopper), it
      // reads x's rows through the layout's slots: no gather launch and no expert-major copy of x
      // (kernels::grouped_gate_up_gather_pays).
      bool gathered_in_gemm = false;
      if constexpr (!fp32) {
        if (kernels::grouped_gate_up_gather_pays(E, rows, config_.ffn_size, gate_up_maps)) {
          SPECMOE_CUDA_TRY(kernels::launch_grouped_gate_up_swiglu_gathered(x, layout_.sorted_slots, k, layout_.offsets, E, rows,
                                                                           gate_table_, up_table_, gate_up_ld_, H,
                                                                           config_.ffn_size, h_, stream,
                                                                           kernels::grouped_gemm_path::automatic, gate_up_maps));
          gathered_in_gemm = true;
        }
      }
      if (!gathered_in_gemm) {
        SPECMOE_CUDA_TRY(kernels::launch_gather_rows(x, H, H, layout_.sorted_slots, k, layout_.offsets + E, rows, xp_, stream));
        SPECMOE_CUDA_TRY(kernels::launch_grouped_gate_up_swiglu(xp_, layout_.offsets, E, rows, gate_table_, up_table_,
                                                                gate_up_ld_, H, config_.ffn_size, h_, stream,
                                                                kernels::grouped_gemm_path::automatic, gate_up_maps));
      }
      SPECMOE_CUDA_TRY(kernels::launch_grouped_down(h_, layout_.offsets, E, rows, down_table_, down_ld_,
                                                    config_.ffn_size, H, y, stream, kernels::grouped_gemm_path::automatic,
                                                    own_tables ? &down_maps_ : nullptr));
    }
    auto const S = config_.num_shared_experts;
    if (S > 0) {
      __nv_bfloat16 const* xs = nullptr;
      if constexpr (fp32) {
        SPECMOE_CUDA_TRY(kernels::launch_rows_to_bf16(x, n, H, x_bf16_, stream));
        xs = x_bf16_;
      } else {
        xs = x;
      }
      SPECMOE_CUDA_TRY(kernels::launch_single_group_offsets(shared_offsets_, n, stream));
      for (int s = 0; s < S; ++s) {
        SPECMOE_CUDA_TRY(kernels::launch_grouped_gate_up_swiglu(xs, shared_offsets_, 1, n, shared_gate_ptrs_ + s,
                                                                shared_up_ptrs_ + s, shared_gate_up_ld_, H,
                                                                config_.shared_ffn_size, shared_h_, stream,
                                                                kernels::grouped_gemm_path::automatic,
                                                                &shared_maps_[static_cast<std::size_t>(2 * s)]));
        SPECMOE_CUDA_TRY(kernels::launch_grouped_down(shared_h_, shared_offsets_, 1, n, shared_down_ptrs_ + s,
                                                      shared_down_ld_, config_.shared_ffn_size, H,
                                                      shared_y + s * n * H, stream, kernels::grouped_gemm_path::automatic,
                                                      &shared_maps_[static_cast<std::size_t>(2 * s + 1)]));
      }
    }
    SPECMOE_CUDA_TRY(kernels::launch_combine(y, layout_.position, weights, n, k, H, shared_y, S,
                                             reinterpret_cast<dev_t*>(out.data), out.stride, status_, stream));
  }

  /// @brief Enqueues only the gate on `stream`: top-k ids and weights of x's tokens into
  /// `routing_out` (device [tokens, top_k], both required), the same kernels and results as the
  /// gate inside forward_async. An engine that must know the routing on the host before the
  /// experts run (offloading: which experts to load) routes first, then calls forward_async with
  /// that routing. NaN logits are flagged for `check`.
  void route_async(matrix_view<bf16 const> x, cuda_routing_output routing_out, cudaStream_t stream) {
    auto const n = x.rows;
    SPECMOE_EXPECTS(x.cols == config_.hidden_size && x.stride == config_.hidden_size, errc::shape_mismatch, "x [", x.rows,
                    ", ", x.cols, "] (stride ", x.stride, ") must be dense [tokens, ", config_.hidden_size, "]");
    SPECMOE_EXPECTS(n <= options_.max_tokens, errc::invalid_argument, n, " tokens exceed max_tokens ", options_.max_tokens,
                    " the workspace was sized for (cuda_layer_options::max_tokens)");
    SPECMOE_EXPECTS(routing_out.topk_ids && routing_out.topk_weights, errc::invalid_argument,
                    "route_async needs routing_out.topk_ids and routing_out.topk_weights");
    SPECMOE_EXPECTS(n == 0 || aligned(x.data), errc::invalid_argument, "x must be 16-byte aligned device memory");
    SPECMOE_CUDA_TRY(cudaMemcpyAsync(status_, clean_status_, sizeof(kernels::device_status), cudaMemcpyDeviceToDevice,
                                     stream));
    if (n == 0) return;
    enqueue_gate(reinterpret_cast<__nv_bfloat16 const*>(x.data), n, routing_out.topk_ids, routing_out.topk_weights, stream);
  }

  /// @brief Waits for `stream` and raises what the device flagged during the last forward.
  /// @throw specmoe::error `non_finite` or `expert_out_of_range` naming the first token.
  void check(cudaStream_t stream) {
    SPECMOE_CUDA_TRY(cudaStreamSynchronize(stream));
    kernels::device_status s{};
    SPECMOE_CUDA_TRY(cudaMemcpy(&s, status_, sizeof s, cudaMemcpyDeviceToHost));
    detail::raise_flagged_input(s, config_.num_experts, "");
  }

  /// @brief forward_async, then check: returns when `out` holds the result.
  template <class T>
    requires(std::is_same_v<T, bf16> || std::is_same_v<T, float>)
  void forward(basic_cuda_batch<T> const& batch, matrix_view<T> out, cudaStream_t stream = nullptr,
               cuda_routing_output routing_out = {}) {
    forward_async(batch, out, stream, routing_out);
    check(stream);
  }

 private:
  static bool aligned(void const* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

  /// The router: logits^T [E, n] (column-major) = W_router [E, H] . x^T, then the fused top-k.
  template <class X>
  void enqueue_gate(X const* x, std::int64_t n, std::int32_t* out_ids, float* out_weights, cudaStream_t stream) {
    auto const H = config_.hidden_size, E = config_.num_experts;
    float const one = 1.0f, zero = 0.0f;
    SPECMOE_CUBLAS_TRY(cublasSetStream(cublas_, stream));
    if constexpr (std::is_same_v<X, float>) {  // fp32 router (weights widened once at construction)
      SPECMOE_CUBLAS_TRY(cublasGemmEx(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, E, static_cast<int>(n), H, &one, router_f32_,
                                      CUDA_R_32F, H, x, CUDA_R_32F, H, &zero, logits_, CUDA_R_32F, E, CUBLAS_COMPUTE_32F,
                                      CUBLAS_GEMM_DEFAULT));
    } else {
      detail::enqueue_router_logits(cublas_, weights_.router.weight, x, n, logits_, stream);
    }
    SPECMOE_CUDA_TRY(kernels::launch_topk_gate(logits_, n, kernels::gate_params::from(config_, bias_), out_ids, out_weights,
                                               status_, stream));
  }

  /// The weights with routed-expert views of the right shape at a placeholder address, for shape
  /// checks when the routed experts come through cuda_expert_tables (nothing is read through them).
  moe_weights<bf16> without_routed_experts(moe_weights<bf16> w) const {
    static bf16 const placeholder{};
    w.experts = ffn_weights<bf16>::dense(&placeholder, &placeholder, &placeholder, config_.num_experts, config_.hidden_size,
                                         config_.ffn_size);
    return w;
  }

  void check_expert_tensor(expert_tensor<bf16> const& t, char const* name) const {
    SPECMOE_EXPECTS(t.row_stride % 8 == 0 && (t.count <= 1 || t.expert_stride % 8 == 0) && aligned(t.data),
                    errc::unsupported, name, " needs 16-byte aligned rows (strides multiples of 8 elements)");
  }

  /// The one-launch decode FFN over this layer's layout, tables and scratch, for `rows` slots of x.
  [[nodiscard]] kernels::decode_expert_ffn_args decode_ffn_args(__nv_bfloat16 const* x, std::int64_t rows) const noexcept {
    kernels::decode_expert_ffn_args a;
    a.x = x;
    a.slots = layout_.sorted_slots;
    a.top_k = config_.top_k;
    a.offsets = layout_.offsets;
    a.G = config_.num_experts;
    a.M_total = rows;
    a.w_gate = gate_table_;
    a.w_up = up_table_;
    a.gate_up_ld = gate_up_ld_;
    a.w_down = down_table_;
    a.down_ld = down_ld_;
    a.K = config_.hidden_size;
    a.F = config_.ffn_size;
    a.N = config_.hidden_size;
    a.h = h_;
    return a;
  }

  template <class T>
  T* carve(std::byte*& cursor, std::size_t count) {
    auto* p = reinterpret_cast<T*>(cursor);
    cursor += (count * sizeof(T) + 255) / 256 * 256;
    return p;
  }

  void allocate() {
    auto const N = static_cast<std::size_t>(options_.max_tokens);
    auto const E = static_cast<std::size_t>(config_.num_experts), k = static_cast<std::size_t>(config_.top_k);
    auto const H = static_cast<std::size_t>(config_.hidden_size), F = static_cast<std::size_t>(config_.ffn_size);
    auto const S = static_cast<std::size_t>(config_.num_shared_experts);
    auto const SF = static_cast<std::size_t>(config_.shared_ffn_size);
    auto const slots = N * k;
    bool const f32 = options_.fp32_activations;
    std::size_t const y_elem = f32 ? 4 : 2;  // expert outputs: fp32 when fp32 activations may come
    auto const sort_bytes = kernels::layout_sort_temp_bytes(static_cast<long long>(slots), config_.num_experts);
    auto size = [](std::size_t bytes) { return (bytes + 255) / 256 * 256; };
    std::size_t const cublas_ws = 4u << 20;
    std::size_t const ffn_sync_bytes = kernels::decode_expert_ffn_sync_words(config_.num_experts) * sizeof(unsigned);
    workspace_bytes_ = size(2 * sizeof(kernels::device_status)) + size(N * E * 4) + size(slots * 4) * 7 +
                       size((E + 1) * 8) + size(sort_bytes) + size(slots * H * 2) + size(slots * F * 2) +
                       size(slots * H * y_elem) + size(3 * E * sizeof(void*)) + size(3 * S * sizeof(void*)) + size(16) +
                       size(N * SF * 2) + size(S * N * H * y_elem) + size(E * 4) + size(16) + size(ffn_sync_bytes) + cublas_ws +
                       (f32 ? size(E * H * 4) + size(S > 0 ? N * H * 2 : 0) : 0);
    SPECMOE_CUDA_TRY(cudaMalloc(&workspace_, workspace_bytes_));
    auto* cursor = static_cast<std::byte*>(workspace_);
    status_ = carve<kernels::device_status>(cursor, 1);
    clean_status_ = carve<kernels::device_status>(cursor, 1);
    logits_ = carve<float>(cursor, N * E);
    ids_ = carve<std::int32_t>(cursor, slots);
    topk_weights_ = carve<float>(cursor, slots);
    layout_.keys_in = carve<std::int32_t>(cursor, slots);
    layout_.keys_out = carve<std::int32_t>(cursor, slots);
    layout_.vals_in = carve<std::int32_t>(cursor, slots);
    layout_.sorted_slots = carve<std::int32_t>(cursor, slots);
    layout_.position = carve<std::int32_t>(cursor, slots);
    layout_.offsets = carve<std::int64_t>(cursor, E + 1);
    layout_.sort_temp = carve<std::byte>(cursor, sort_bytes);
    layout_.sort_temp_bytes = sort_bytes;
    xp_ = carve<__nv_bfloat16>(cursor, slots * H);
    h_ = carve<__nv_bfloat16>(cursor, slots * F);
    y_ = carve<std::byte>(cursor, slots * H * y_elem);
    auto** tables = carve<__nv_bfloat16 const*>(cursor, 3 * E);
    gate_ptrs_ = tables;
    up_ptrs_ = tables + E;
    down_ptrs_ = tables + 2 * E;
    auto** shared_tables = carve<__nv_bfloat16 const*>(cursor, 3 * S);
    shared_gate_ptrs_ = shared_tables;
    shared_up_ptrs_ = shared_tables + S;
    shared_down_ptrs_ = shared_tables + 2 * S;
    shared_offsets_ = carve<std::int64_t>(cursor, 2);
    shared_h_ = carve<__nv_bfloat16>(cursor, N * SF);
    shared_y_ = carve<std::byte>(cursor, S * N * H * y_elem);
    bias_ = nullptr;
    if (config_.gate.has_score_bias) {
      bias_ = carve<float>(cursor, E);
      SPECMOE_CUDA_TRY(cudaMemcpy(bias_, weights_.router.score_bias.data(), E * 4, cudaMemcpyDefault));
    }
    arrivals_ = carve<unsigned>(cursor, 4);
    SPECMOE_CUDA_TRY(cudaMemset(arrivals_, 0, 16));
    ffn_sync_ = carve<unsigned>(cursor, ffn_sync_bytes / sizeof(unsigned));
    SPECMOE_CUDA_TRY(cudaMemset(ffn_sync_, 0, ffn_sync_bytes));
    cublas_workspace_ = carve<std::byte>(cursor, cublas_ws);
    if (f32) {
      router_f32_ = carve<float>(cursor, E * H);
      if (S > 0) x_bf16_ = carve<__nv_bfloat16>(cursor, N * H);
      // The fp32 router reads the bf16 router weights widened once (dense [E, H]).
      std::vector<bf16> r16(E * H);
      auto const& rw = weights_.router.weight;
      for (std::size_t e = 0; e < E; ++e) {
        SPECMOE_CUDA_TRY(cudaMemcpy(r16.data() + e * H, rw.data + static_cast<std::int64_t>(e) * rw.stride, H * sizeof(bf16),
                                    cudaMemcpyDefault));
      }
      std::vector<float> r32(r16.size());
      for (std::size_t i = 0; i < r16.size(); ++i) r32[i] = static_cast<float>(r16[i]);
      SPECMOE_CUDA_TRY(cudaMemcpy(router_f32_, r32.data(), r32.size() * 4, cudaMemcpyHostToDevice));
    }

    kernels::device_status const clean = kernels::clean_device_status;
    SPECMOE_CUDA_TRY(cudaMemcpy(clean_status_, &clean, sizeof clean, cudaMemcpyHostToDevice));
    SPECMOE_CUDA_TRY(cudaMemcpy(status_, &clean, sizeof clean, cudaMemcpyHostToDevice));
    // Per-expert weight pointers: the grouped GEMMs find expert e's matrices through them.
    auto table = [](expert_tensor<bf16> const& t, std::size_t count) {
      std::vector<__nv_bfloat16 const*> p(count);
      for (std::size_t e = 0; e < count; ++e)
        p[e] = reinterpret_cast<__nv_bfloat16 const*>(t.data + static_cast<std::int64_t>(e) * t.expert_stride);
      return p;
    };
    auto upload = [](__nv_bfloat16 const** dst, std::vector<__nv_bfloat16 const*> const& src) {
      if (!src.empty()) SPECMOE_CUDA_TRY(cudaMemcpy(dst, src.data(), src.size() * sizeof(void*), cudaMemcpyHostToDevice));
    };
    auto const Ei = static_cast<int>(E), Hi = static_cast<int>(H), Fi = static_cast<int>(F);
    if (options_.expert_tables) {  // the caller's tables (offloaded experts): read as they are at each launch
      auto const& t = *options_.expert_tables;
      gate_table_ = t.gate;
      up_table_ = t.up;
      down_table_ = t.down;
      gate_up_ld_ = t.gate_up_ld;
      down_ld_ = t.down_ld;
    } else {
      auto const gate_tab = table(weights_.experts.gate, E), up_tab = table(weights_.experts.up, E),
                 down_tab = table(weights_.experts.down, E);
      upload(gate_ptrs_, gate_tab);
      upload(up_ptrs_, up_tab);
      upload(down_ptrs_, down_tab);
      gate_table_ = gate_ptrs_;
      up_table_ = up_ptrs_;
      down_table_ = down_ptrs_;
      gate_up_ld_ = weights_.experts.gate.row_stride;
      SPECMOE_EXPECTS(weights_.experts.up.row_stride == gate_up_ld_, errc::unsupported,
                      "experts.gate and experts.up need the same row stride");
      down_ld_ = weights_.experts.down.row_stride;
      // Tensor maps of the same weights enable the Hopper wgmma path for large groups; where they
      // cannot be built (not sm_90, driver entry point missing) the launches use the other paths.
      gate_up_maps_ = kernels::grouped_weight_maps(gate_tab.data(), up_tab.data(), Ei, Fi, Hi, gate_up_ld_);
      down_maps_ = kernels::grouped_weight_maps(down_tab.data(), Ei, Hi, Fi, down_ld_);
    }
    if (S > 0) {
      auto const sg = table(weights_.shared.gate, S), su = table(weights_.shared.up, S), sd = table(weights_.shared.down, S);
      upload(shared_gate_ptrs_, sg);
      upload(shared_up_ptrs_, su);
      upload(shared_down_ptrs_, sd);
      shared_gate_up_ld_ = weights_.shared.gate.row_stride;
      shared_down_ld_ = weights_.shared.down.row_stride;
      auto const SFi = static_cast<int>(SF);
      shared_maps_.clear();
      for (std::size_t s = 0; s < S; ++s) {  // one group each: shared expert s runs as its own launch
        shared_maps_.emplace_back(sg.data() + s, su.data() + s, 1, SFi, Hi, shared_gate_up_ld_);
        shared_maps_.emplace_back(sd.data() + s, 1, Hi, SFi, shared_down_ld_);
      }
    }
    SPECMOE_CUBLAS_TRY(cublasCreate(&cublas_));
    // A fixed cuBLAS workspace keeps the logits GEMM capturable in a CUDA graph.
    SPECMOE_CUBLAS_TRY(cublasSetWorkspace(cublas_, cublas_workspace_, cublas_ws));
  }

  void release() noexcept {
    if (cublas_) cublasDestroy(cublas_);
    if (workspace_) cudaFree(workspace_);
    cublas_ = nullptr;
    workspace_ = nullptr;
  }

  moe_config config_;
  moe_weights<bf16> weights_;
  policies_type policies_;
  cuda_layer_options options_;
  std::size_t workspace_bytes_ = 0;
  void* workspace_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  kernels::device_status* status_ = nullptr;
  kernels::device_status* clean_status_ = nullptr;
  float* logits_ = nullptr;
  std::int32_t* ids_ = nullptr;
  float* topk_weights_ = nullptr;
  kernels::layout_buffers layout_{};
  __nv_bfloat16* xp_ = nullptr;
  __nv_bfloat16* h_ = nullptr;
  std::byte* y_ = nullptr;  // [max_slots, H] bf16, or fp32 with fp32_activations
  __nv_bfloat16 const** gate_ptrs_ = nullptr;
  __nv_bfloat16 const** up_ptrs_ = nullptr;
  __nv_bfloat16 const** down_ptrs_ = nullptr;
  // the routed tables the kernels read: the layer's own (above) or cuda_layer_options::expert_tables
  __nv_bfloat16 const* const* gate_table_ = nullptr;
  __nv_bfloat16 const* const* up_table_ = nullptr;
  __nv_bfloat16 const* const* down_table_ = nullptr;
  __nv_bfloat16 const** shared_gate_ptrs_ = nullptr;
  __nv_bfloat16 const** shared_up_ptrs_ = nullptr;
  __nv_bfloat16 const** shared_down_ptrs_ = nullptr;
  std::int64_t* shared_offsets_ = nullptr;
  __nv_bfloat16* shared_h_ = nullptr;
  std::byte* shared_y_ = nullptr;  // [S, max_tokens, H] bf16 or fp32, as y_
  float* router_f32_ = nullptr;    // fp32_activations: the router weights widened, [E, H]
  __nv_bfloat16* x_bf16_ = nullptr;  // fp32_activations with shared experts: x rounded to bf16
  float* bias_ = nullptr;
  unsigned* arrivals_ = nullptr;  // the fused decode routing's block counter (zero between launches)
  unsigned* ffn_sync_ = nullptr;  // the fused decode FFN's counters (zero between launches)
  std::byte* cublas_workspace_ = nullptr;
  kernels::grouped_weight_maps gate_up_maps_, down_maps_;
  std::vector<kernels::grouped_weight_maps> shared_maps_;  // per shared expert: gate_up, down
  std::int64_t gate_up_ld_ = 0, down_ld_ = 0, shared_gate_up_ld_ = 0, shared_down_ld_ = 0;
};

}  // namespace specmoe
