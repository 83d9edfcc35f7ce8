// specmoe/offload/host_expert_store.cuh: the routed experts of a model in pinned host memory, one
// contiguous block per (layer, expert), so one expert moves to the GPU in one DMA copy (SP-MoE,
// issue 7; nvcc only).
//
// Pinned (page-locked) memory is what lets cudaMemcpyAsync run asynchronously at full link speed:
// from pageable memory the driver stages through a bounce buffer and the copy blocks the host.
#pragma once

#include <specmoe/core/bfloat16.hpp>
#include <specmoe/core/error.hpp>
#include <specmoe/core/expert_weights.hpp>
#include <specmoe/offload/detail/cuda_try.cuh>
#include <specmoe/offload/expert_layout.hpp>

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <utility>

namespace specmoe::offload {

/// @brief Routed expert weights in pinned host memory, laid out as expert_layout says: block
/// (layer, e) holds gate [F, H], up [F, H], down [H, F] (bf16, dense rows).
///
/// Two ways to get one:
///  - `host_expert_store(layout)` allocates the blocks with cudaHostAlloc (freed by the destructor);
///    fill them with `load_layer` (or write through `expert()`).
///  - `host_expert_store(layout, memory)` pins caller memory that already holds the blocks in this
///    layout (cudaHostRegister; unregistered, not freed, by the destructor). The engine's own
///    buffer is then copied from directly, with no second host copy.
///
/// @note Not thread-safe for writes; reads (the prefetcher's copies) may run on any thread once
///       the weights are loaded.
class host_expert_store {
 public:
  /// @brief Allocates `layout.total_bytes()` of pinned host memory (contents undefined).
  /// @throw specmoe::error invalid_argument for a bad layout, cuda when cudaHostAlloc fails
  ///        (typically: not enough host memory may be locked).
  explicit host_expert_store(expert_layout const& layout) : layout_(layout) {
    layout_.validate();
    void* p = nullptr;
    SPECMOE_CUDA_TRY(cudaHostAlloc(&p, layout_.total_bytes(), cudaHostAllocPortable));
    data_ = static_cast<std::byte*>(p);
  }

  /// @brief Pins `memory`, which must hold the blocks of `layout` (at least total_bytes(),
  /// 256-byte aligned, not already pinned). The caller keeps ownership and must keep it alive
  /// while the store exists.
  /// @throw specmoe::error invalid_argument (too small, misaligned) or cuda (cudaHostRegister).
  host_expert_store(expert_layout const& layout, std::span<std::byte> memory) : layout_(layout), registered_(true) {
    layout_.validate();
    SPECMOE_EXPECTS(memory.size() >= layout_.total_bytes(), errc::invalid_argument, "host_expert_store: caller memory of ",
                    memory.size(), " bytes is smaller than the ", layout_.total_bytes(), " bytes of ", layout_.total_experts(),
                    " expert blocks of ", layout_.block_bytes(), " bytes");
    SPECMOE_EXPECTS(reinterpret_cast<std::uintptr_t>(memory.data()) % expert_layout::block_alignment == 0,
                    errc::invalid_argument, "host_expert_store: caller memory must be ", expert_layout::block_alignment,
                    "-byte aligned");
    SPECMOE_CUDA_TRY(cudaHostRegister(memory.data(), layout_.total_bytes(), cudaHostRegisterPortable));
    data_ = memory.data();
  }

  host_expert_store(host_expert_store const&) = delete;
  host_expert_store& operator=(host_expert_store const&) = delete;
  host_expert_store(host_expert_store&& o) noexcept
      : layout_(o.layout_), data_(std::exchange(o.data_, nullptr)), registered_(o.registered_) {}
  host_expert_store& operator=(host_expert_store&& o) noexcept {
    if (this != &o) {
      release();
      layout_ = o.layout_;
      data_ = std::exchange(o.data_, nullptr);
      registered_ = o.registered_;
    }
    return *this;
  }
  ~host_expert_store() { release(); }

  /// @brief Copies one layer's routed experts from host views (any strides, e.g. a checkpoint's
  /// tensors or vLLM's fused w13) into the layer's blocks.
  /// @throw specmoe::error shape_mismatch when the views are not [E, F, H] / [E, H, F], or
  ///        invalid_argument for a layer outside the store or views pointing at nothing.
  void load_layer(int layer, ffn_weights<bf16> const& host_views) {
    SPECMOE_EXPECTS(layer >= 0 && layer < layout_.layers, errc::invalid_argument, "host_expert_store: layer ", layer,
                    " outside [0, ", layout_.layers, ")");
    auto const E = layout_.experts, H = layout_.hidden, F = layout_.ffn;
    specmoe::detail::check_tensor(host_views.gate, "experts.gate", E, F, H);
    specmoe::detail::check_tensor(host_views.up, "experts.up", E, F, H);
    specmoe::detail::check_tensor(host_views.down, "experts.down", E, H, F);
    for (int e = 0; e < E; ++e) {
      std::byte* const block = expert(layer, e);
      copy_matrix(host_views.gate[e], block + layout_.gate_offset());
      copy_matrix(host_views.up[e], block + layout_.up_offset());
      copy_matrix(host_views.down[e], block + layout_.down_offset());
    }
  }

  [[nodiscard]] expert_layout const& layout() const noexcept { return layout_; }
  /// Bytes of one expert block: the size of one expert's copy.
  [[nodiscard]] std::size_t expert_bytes() const noexcept { return layout_.block_bytes(); }
  [[nodiscard]] int layers() const noexcept { return layout_.layers; }
  [[nodiscard]] int experts() const noexcept { return layout_.experts; }
  [[nodiscard]] int hidden() const noexcept { return layout_.hidden; }
  [[nodiscard]] int ffn() const noexcept { return layout_.ffn; }
  /// True when the store pins caller memory (cudaHostRegister) rather than owning its own.
  [[nodiscard]] bool registered() const noexcept { return registered_; }
  /// All blocks, layer-major: block (l, e) starts at (l * E + e) * expert_bytes().
  [[nodiscard]] std::byte const* data() const noexcept { return data_; }
  [[nodiscard]] std::size_t bytes() const noexcept { return layout_.total_bytes(); }

  /// Host address of expert `e` of `layer`'s block. @throw specmoe::error out of range.
  [[nodiscard]] std::byte* expert(int layer, int e) { return data_ + layout_.block_index({layer, e}) * expert_bytes(); }
  [[nodiscard]] std::byte const* expert(int layer, int e) const {
    return data_ + layout_.block_index({layer, e}) * expert_bytes();
  }
  /// The block's matrices as typed views (dense rows): gate, up [F, H]; down [H, F].
  [[nodiscard]] matrix_view<bf16 const> gate(int layer, int e) const { return view(layer, e, layout_.gate_offset(), layout_.ffn, layout_.hidden); }
  [[nodiscard]] matrix_view<bf16 const> up(int layer, int e) const { return view(layer, e, layout_.up_offset(), layout_.ffn, layout_.hidden); }
  [[nodiscard]] matrix_view<bf16 const> down(int layer, int e) const { return view(layer, e, layout_.down_offset(), layout_.hidden, layout_.ffn); }

 private:
  [[nodiscard]] matrix_view<bf16 const> view(int layer, int e, std::size_t offset, int rows, int cols) const {
    return {reinterpret_cast<bf16 const*>(expert(layer, e) + offset), rows, cols};
  }
  static void copy_matrix(matrix_view<bf16 const> src, std::byte* dst) {
    auto const row_bytes = static_cast<std::size_t>(src.cols) * sizeof(bf16);
    if (src.stride == src.cols) {
      std::memcpy(dst, src.data, row_bytes * static_cast<std::size_t>(src.rows));
      return;
    }
    for (std::int64_t r = 0; r < src.rows; ++r) std::memcpy(dst + static_cast<std::size_t>(r) * row_bytes, src.row_ptr(r), row_bytes);
  }
  void release() noexcept {
    if (!data_) return;
    if (registered_) {
      cudaHostUnregister(data_);
    } else {
      cudaFreeHost(data_);
    }
    data_ = nullptr;
  }

  expert_layout layout_;
  std::byte* data_ = nullptr;
  bool registered_ = false;
};

}  // namespace specmoe::offload
