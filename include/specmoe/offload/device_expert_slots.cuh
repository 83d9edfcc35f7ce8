// specmoe/offload/device_expert_slots.cuh: the GPU side of the expert cache — a pool of slots, each
// holding one expert block, and the device residency table the expert kernels read (SP-MoE,
// issue 7; nvcc only).
//
// The residency table is what lets the grouped expert GEMMs find an offloaded expert without a host
// round trip: per layer, three device arrays [E] of bf16 pointers (gate, up, down), exactly the
// per-expert pointer tables kernels/grouped_gemm.cuh takes. Entry e points into the slot holding
// expert e, or is null when e is not resident. The prefetcher writes entries in stream order on
// the stream that copied the expert (publish after the copy, clear before the slot is refilled),
// so an entry is never non-null before its bytes have arrived in that stream's order.
#pragma once

#include <specmoe/core/error.hpp>
#include <specmoe/offload/detail/cuda_try.cuh>
#include <specmoe/offload/detail/residency_kernels.cuh>
#include <specmoe/offload/expert_cache.hpp>
#include <specmoe/offload/expert_layout.hpp>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <utility>

namespace specmoe::offload {

/// @brief One change of the residency table: expert `key` now lives in `slot` (publish), or left
/// it (retire: the entries are cleared only if they still point at `slot`).
struct residency_update {
  expert_key key{};
  int slot = -1;
  bool retire = false;
};

/// @brief `slots` GPU slots of `layout.block_bytes()` each (one cudaMalloc) and the device
/// residency table of `layout.layers` x `layout.experts` routed experts (all null at start).
///
/// The pool moves no bytes and keeps no book: the prefetcher decides (expert_cache) and copies; this
/// class owns the memory and enqueues table writes.
class device_expert_slots {
 public:
  /// @throw specmoe::error invalid_argument (bad layout, slots < 1) or cuda (cudaMalloc: the budget
  ///        does not fit in device memory).
  device_expert_slots(expert_layout const& layout, int slots) : layout_(layout), slots_(slots) {
    layout_.validate();
    SPECMOE_EXPECTS(slots > 0, errc::invalid_argument, "device_expert_slots: slots must be positive, got ", slots);
    SPECMOE_CUDA_TRY(cudaMalloc(&pool_, pool_bytes()));
    std::size_t const table_bytes = table_entries() * sizeof(void*);
    if (cudaError_t const err = cudaMalloc(&tables_, table_bytes); err != cudaSuccess) {
      cudaFree(pool_);
      detail::throw_cuda(err, "cudaMalloc(residency table)");
    }
    // Synchronised: a device memset does not block the host, and the copy streams (non-blocking)
    // would not wait for it before their first table writes.
    cudaError_t err = cudaMemsetAsync(tables_, 0, table_bytes, nullptr);
    if (err == cudaSuccess) err = cudaStreamSynchronize(nullptr);
    if (err != cudaSuccess) {
      release();
      detail::throw_cuda(err, "cudaMemsetAsync(residency table)");
    }
  }
  device_expert_slots(device_expert_slots const&) = delete;
  device_expert_slots& operator=(device_expert_slots const&) = delete;
  ~device_expert_slots() { release(); }

  [[nodiscard]] expert_layout const& layout() const noexcept { return layout_; }
  [[nodiscard]] int slots() const noexcept { return slots_; }
  /// Bytes of one slot (one expert block).
  [[nodiscard]] std::size_t slot_bytes() const noexcept { return layout_.block_bytes(); }
  /// Device bytes of the pool (not counting the table).
  [[nodiscard]] std::size_t pool_bytes() const noexcept { return static_cast<std::size_t>(slots_) * slot_bytes(); }

  /// Device address of slot `s` (256-byte aligned). Slots are adjacent: slot s + 1 follows s.
  [[nodiscard]] std::byte* slot_ptr(int s) const {
    SPECMOE_EXPECTS(s >= 0 && s < slots_, errc::invalid_argument, "device_expert_slots: slot ", s, " outside [0, ", slots_, ")");
    return pool_ + static_cast<std::size_t>(s) * slot_bytes();
  }

  /// @name The residency table of `layer`: device arrays [E] of device pointers, the weight tables
  /// of kernels::launch_grouped_gate_up_swiglu (gate, up; row stride gate_up_ld()) and
  /// launch_grouped_down (down; row stride down_ld()). Null entries: expert not resident.
  /// @{
  [[nodiscard]] __nv_bfloat16 const* const* gate_table(int layer) const { return table(layer, 0); }
  [[nodiscard]] __nv_bfloat16 const* const* up_table(int layer) const { return table(layer, 1); }
  [[nodiscard]] __nv_bfloat16 const* const* down_table(int layer) const { return table(layer, 2); }
  /// @}
  /// Row strides (elements) of the matrices inside a slot: H for gate/up, F for down.
  [[nodiscard]] std::int64_t gate_up_ld() const noexcept { return layout_.hidden; }
  [[nodiscard]] std::int64_t down_ld() const noexcept { return layout_.ffn; }

  /// @brief Enqueues table writes on `stream` (one tiny kernel per 32 updates, parameters by
  /// value): each publish makes `key`'s three entries point into `slot`; each retire clears them if
  /// they still point into `slot`. Returns the launch status (no throw: the prefetcher's worker
  /// calls it).
  cudaError_t enqueue_updates(std::span<residency_update const> updates, cudaStream_t stream) const noexcept {
    while (!updates.empty()) {
      detail::table_write_batch batch{};
      auto const n = std::min<std::size_t>(updates.size(), detail::table_writes_per_launch);
      for (std::size_t i = 0; i < n; ++i) {
        auto const& u = updates[i];
        if (u.slot < 0 || u.slot >= slots_ || u.key.layer < 0 || u.key.layer >= layout_.layers || u.key.expert < 0 ||
            u.key.expert >= layout_.experts) {
          return cudaErrorInvalidValue;
        }
        batch.writes[i] = {gate_entry(u.key), reinterpret_cast<unsigned long long>(pool_ + static_cast<std::size_t>(u.slot) * slot_bytes()),
                           u.retire ? 1 : 0};
      }
      batch.count = static_cast<int>(n);
      detail::write_residency_table<<<1, detail::table_writes_per_launch, 0, stream>>>(
          reinterpret_cast<unsigned long long*>(tables_), layout_.experts, layout_.up_offset(), layout_.down_offset(), batch);
      if (cudaError_t const err = cudaGetLastError(); err != cudaSuccess) return err;
      updates = updates.subspan(n);
    }
    return cudaSuccess;
  }

  /// Throwing forms of enqueue_updates for one expert. @throw specmoe::error cuda.
  void publish(expert_key key, int slot, cudaStream_t stream) const { enqueue_or_throw({key, slot, false}, stream); }
  void retire(expert_key key, int slot, cudaStream_t stream) const { enqueue_or_throw({key, slot, true}, stream); }

 private:
  [[nodiscard]] std::size_t table_entries() const noexcept { return static_cast<std::size_t>(layout_.layers) * 3 * layout_.experts; }
  [[nodiscard]] std::int64_t gate_entry(expert_key k) const noexcept {
    return static_cast<std::int64_t>(k.layer) * 3 * layout_.experts + k.expert;
  }
  [[nodiscard]] __nv_bfloat16 const* const* table(int layer, int matrix) const {
    SPECMOE_EXPECTS(layer >= 0 && layer < layout_.layers, errc::invalid_argument, "device_expert_slots: layer ", layer,
                    " outside [0, ", layout_.layers, ")");
    return tables_ + (static_cast<std::size_t>(layer) * 3 + static_cast<std::size_t>(matrix)) * static_cast<std::size_t>(layout_.experts);
  }
  void enqueue_or_throw(residency_update u, cudaStream_t stream) const {
    if (cudaError_t const err = enqueue_updates({&u, 1}, stream); err != cudaSuccess) detail::throw_cuda(err, "residency table update");
  }
  void release() noexcept {
    if (tables_) cudaFree(tables_);
    if (pool_) cudaFree(pool_);
    tables_ = nullptr;
    pool_ = nullptr;
  }

  expert_layout layout_;
  int slots_ = 0;
  std::byte* pool_ = nullptr;
  __nv_bfloat16 const** tables_ = nullptr;  // [layers][3][E]
};

}  // namespace specmoe::offload
