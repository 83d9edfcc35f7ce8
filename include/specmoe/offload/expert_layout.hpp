// specmoe/offload/expert_layout.hpp: where one offloaded expert's bytes lie, on the host and in a
// GPU slot (SP-MoE, issue 7).
//
// Every routed expert of every layer is one block of `block_bytes()`: gate [F, H], then up [F, H],
// then down [H, F], bf16, dense rows (row stride H for gate/up, F for down), padded to a multiple
// of 256 bytes. The host store and the GPU slots use the same block, so moving an expert is one
// copy of one block, and experts adjacent in the store (layer-major, expert-minor) that land in
// adjacent slots move as one copy.
#pragma once

#include <specmoe/core/error.hpp>
#include <specmoe/core/moe_config.hpp>
#include <specmoe/offload/expert_cache.hpp>

#include <cstddef>
#include <cstdint>

namespace specmoe::offload {

/// @brief The shape of the offloaded experts of a model and the byte layout of one expert block.
struct expert_layout {
  int layers = 0;   ///< MoE layers whose routed experts are offloaded
  int experts = 0;  ///< routed experts per layer (E)
  int hidden = 0;   ///< H
  int ffn = 0;      ///< F: intermediate width of one routed expert

  /// Block alignment: a multiple of 16 (the GEMMs' vector loads) and of the DMA-friendly 256.
  static constexpr std::size_t block_alignment = 256;

  /// The routed experts of `layers` layers shaped like `cfg`.
  static expert_layout of(moe_config const& cfg, int layers) {
    return {layers, cfg.num_experts, cfg.hidden_size, cfg.ffn_size};
  }

  /// @throw specmoe::error invalid_argument when a size is not positive, or H / F not multiples of
  ///        8 (each row must start 16-byte aligned for the expert kernels).
  void validate() const {
    SPECMOE_EXPECTS(layers > 0 && experts > 0 && hidden > 0 && ffn > 0, errc::invalid_argument,
                    "expert_layout: layers (", layers, "), experts (", experts, "), hidden (", hidden, ") and ffn (", ffn,
                    ") must be positive");
    SPECMOE_EXPECTS(hidden % 8 == 0 && ffn % 8 == 0, errc::invalid_argument, "expert_layout: hidden (", hidden,
                    ") and ffn (", ffn, ") must be multiples of 8 (16-byte rows)");
  }

  /// Elements of one matrix (F x H).
  [[nodiscard]] std::size_t matrix_elements() const noexcept {
    return static_cast<std::size_t>(ffn) * static_cast<std::size_t>(hidden);
  }
  /// Byte offsets of the three matrices inside a block.
  [[nodiscard]] std::size_t gate_offset() const noexcept { return 0; }
  [[nodiscard]] std::size_t up_offset() const noexcept { return matrix_elements() * 2; }
  [[nodiscard]] std::size_t down_offset() const noexcept { return 2 * matrix_elements() * 2; }
  /// Bytes of weights in one block (3 F H bf16).
  [[nodiscard]] std::size_t payload_bytes() const noexcept { return 3 * matrix_elements() * 2; }
  /// Bytes of one block, payload rounded up to block_alignment: what one expert copy moves.
  [[nodiscard]] std::size_t block_bytes() const noexcept {
    return (payload_bytes() + block_alignment - 1) / block_alignment * block_alignment;
  }
  /// Routed experts over all layers.
  [[nodiscard]] std::int64_t total_experts() const noexcept {
    return static_cast<std::int64_t>(layers) * static_cast<std::int64_t>(experts);
  }
  /// Bytes of all blocks (the host store's size).
  [[nodiscard]] std::size_t total_bytes() const noexcept {
    return static_cast<std::size_t>(total_experts()) * block_bytes();
  }
  /// Position of `k`'s block in the store (layer-major).
  /// @throw specmoe::error expert_out_of_range when `k` is outside the layout.
  [[nodiscard]] std::size_t block_index(expert_key k) const {
    SPECMOE_EXPECTS(k.layer >= 0 && k.layer < layers && k.expert >= 0 && k.expert < experts, errc::expert_out_of_range,
                    "expert_layout: layer ", k.layer, " expert ", k.expert, " outside [0, ", layers, ") x [0, ", experts, ")");
    return static_cast<std::size_t>(k.layer) * static_cast<std::size_t>(experts) + static_cast<std::size_t>(k.expert);
  }

  friend bool operator==(expert_layout const&, expert_layout const&) = default;
};

}  // namespace specmoe::offload
