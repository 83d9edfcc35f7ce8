// specmoe/offload/detail/expert_copies.cuh: host-to-device copies of expert blocks, coalesced and
// batched (internal to the prefetcher).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <vector>

namespace specmoe::offload::detail {

/// One block (or run of blocks) to copy: store block `block` (layer-major index) into `slot`.
struct block_copy {
  std::size_t block = 0;
  int slot = 0;
  int count = 1;  ///< blocks in the run (after coalescing)
};

/// @brief Sorts `copies` by store position and merges runs whose store blocks and slots are both
/// consecutive: one DMA descriptor instead of several, and fewer calls on the host.
inline void coalesce(std::vector<block_copy>& copies) {
  std::sort(copies.begin(), copies.end(), [](block_copy const& a, block_copy const& b) { return a.block < b.block; });
  std::size_t out = 0;
  for (std::size_t i = 0; i < copies.size(); ++i) {
    if (out > 0) {
      auto& last = copies[out - 1];
      if (copies[i].block == last.block + static_cast<std::size_t>(last.count) && copies[i].slot == last.slot + last.count) {
        last.count += copies[i].count;
        continue;
      }
    }
    copies[out++] = copies[i];
  }
  copies.resize(out);
}

/// @brief Enqueues the copies on `stream`: one cudaMemcpyBatchAsync where the toolkit has it
/// (CUDA 12.8+) and `batch_api` is still true, else one cudaMemcpyAsync each. A refused batch call
/// (old driver, unsupported platform) clears `batch_api` and falls back for good.
/// @return the first failure, or cudaSuccess; `calls` counts API calls made.
inline cudaError_t enqueue_block_copies(std::vector<block_copy> const& copies, std::byte* pool, std::byte const* store,
                                        std::size_t block_bytes, cudaStream_t stream, std::atomic<bool>& batch_api,
                                        int device, long long& calls) {
  if (copies.empty()) return cudaSuccess;
  std::vector<void*> dsts(copies.size()), srcs(copies.size());
  std::vector<std::size_t> sizes(copies.size());
  for (std::size_t i = 0; i < copies.size(); ++i) {
    dsts[i] = pool + static_cast<std::size_t>(copies[i].slot) * block_bytes;
    srcs[i] = const_cast<std::byte*>(store + copies[i].block * block_bytes);  // the 12.8 signature takes void**
    sizes[i] = static_cast<std::size_t>(copies[i].count) * block_bytes;
  }
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12080
  if (batch_api.load(std::memory_order_relaxed)) {
    cudaMemcpyAttributes attr{};
    attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;  // the host blocks are read in stream order
    attr.srcLocHint.type = cudaMemLocationTypeHost;
    attr.dstLocHint.type = cudaMemLocationTypeDevice;
    attr.dstLocHint.id = device;
    attr.flags = cudaMemcpyFlagPreferOverlapWithCompute;
    std::size_t attr_index = 0;
#if CUDART_VERSION >= 13000
    cudaError_t const err = cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), copies.size(), &attr, &attr_index, 1, stream);
#else
    std::size_t fail_index = 0;
    cudaError_t const err =
        cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), copies.size(), &attr, &attr_index, 1, &fail_index, stream);
#endif
    ++calls;
    if (err == cudaSuccess) return cudaSuccess;
    (void)cudaGetLastError();  // not sticky: fall back to one copy per run
    batch_api.store(false, std::memory_order_relaxed);
  }
#else
  (void)device;
  (void)batch_api;
#endif
  for (std::size_t i = 0; i < copies.size(); ++i) {
    ++calls;
    if (cudaError_t const err = cudaMemcpyAsync(dsts[i], srcs[i], sizes[i], cudaMemcpyHostToDevice, stream); err != cudaSuccess) {
      return err;
    }
  }
  return cudaSuccess;
}

}  // namespace specmoe::offload::detail
