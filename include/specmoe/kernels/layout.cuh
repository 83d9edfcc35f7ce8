// specmoe/kernels/layout.cuh: routing -> expert-major order (stable), per-expert offsets, and the
// inverse map the combine uses. Deterministic: a stable radix sort keyed by expert id.
//
// Two paths with identical results, chosen by slot count (tokens x top_k), measured in
// bench/kernels/routing_kernels_bench.cu:
//   single_block: one launch; a block-wide radix sort in shared memory writes the order, the
//                 offsets and the inverse map directly (decode and small prefill: up to 8192 slots;
//                 up to 64 slots a rank count replaces the sort: one pass, no radix passes).
//   device_sort:  keys kernel + cub::DeviceRadixSort + offsets + inverse (any size).
// Both check every slot: ids outside [-1, E), an expert twice in one token, non-finite weights.
#pragma once

#include <specmoe/kernels/gate.cuh>

#include <cub/block/block_radix_sort.cuh>
#include <cub/device/device_radix_sort.cuh>
#include <cuda_runtime.h>

#include <cstdint>

namespace specmoe::kernels {

namespace detail {
inline int bits_for(int value) {
  int b = 1;
  while ((1 << b) <= value) ++b;
  return b;
}

/// Sort key of slot s: its expert, or E for an empty slot (-1) and for a flagged one.
__device__ inline int slot_key(std::int32_t const* __restrict__ ids, float const* __restrict__ weights, long long s,
                               int top_k, int num_experts, device_status* status) {
  int const e = ids[s];
  long long const token = s / top_k;
  if (weights && !isfinite(weights[s])) report(status, device_error_non_finite_weight, token);
  if (e < -1 || e >= num_experts) {
    report(status, device_error_expert_out_of_range, token);
    return num_experts;
  }
  if (e >= 0) {
    for (long long j = token * top_k; j < s; ++j) {
      if (ids[j] == e) {
        report(status, device_error_duplicate_expert, token);
        break;
      }
    }
  }
  return e < 0 ? num_experts : e;
}

/// The same key for slot s with its token's ids staged in shared memory (`staged[j]` = ids[j]):
/// out-of-range ids and an expert twice in one token flagged, empty and flagged slots keyed E.
__device__ inline int staged_slot_key(int const* staged, int s, int top_k, int num_experts, device_status* status) {
  int const e = staged[s];
  if (e < -1 || e >= num_experts) {
    report(status, device_error_expert_out_of_range, s / top_k);
    return num_experts;
  }
  if (e >= 0) {
    bool twice = false;
    for (int j = s - s % top_k; j < s; ++j) twice |= staged[j] == e;
    if (twice) report(status, device_error_duplicate_expert, s / top_k);
  }
  return e < 0 ? num_experts : e;
}
}  // namespace detail

/// Which layout kernel runs: `automatic` picks by slot count; the others force one (tests, benches).
enum class layout_path { automatic, single_block, device_sort };

/// Most slots the single-block path sorts (1024 threads x 8 keys).
inline constexpr long long layout_single_block_max_slots = 8192;
/// Where `automatic` switches to the device sort: up to here one block is as fast or faster
/// (H100, docs/benchmarks.md); beyond, the 1024-thread block is no faster than CUB's sort.
inline constexpr long long layout_automatic_single_block_slots = 2048;

/// keys[s] = slot_key(s), vals[s] = s.
static __global__ void routing_keys_kernel(std::int32_t const* __restrict__ ids, float const* __restrict__ weights,
                                           long long slots, int top_k, int num_experts, std::int32_t* __restrict__ keys,
                                           std::int32_t* __restrict__ vals, device_status* status) {
  long long const s = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s >= slots) return;
  keys[s] = detail::slot_key(ids, weights, s, top_k, num_experts, status);
  vals[s] = static_cast<std::int32_t>(s);
}

/// offsets[e] = first sorted position of expert e, e in [0, E]; offsets[E] = rows that run.
static __global__ void expert_offsets_kernel(std::int32_t const* __restrict__ sorted_keys, long long slots, int num_experts,
                                             std::int64_t* __restrict__ offsets) {
  int const e = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (e > num_experts) return;
  long long lo = 0, hi = slots;
  while (lo < hi) {
    long long const mid = (lo + hi) / 2;
    if (sorted_keys[mid] < e) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  offsets[e] = lo;
}

/// position[slot] = row of the slot in expert-major order, -1 for empty slots.
static __global__ void inverse_positions_kernel(std::int32_t const* __restrict__ sorted_vals, long long slots,
                                                std::int64_t const* __restrict__ offsets, int num_experts,
                                                std::int32_t* __restrict__ position) {
  long long const i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= slots) return;
  position[sorted_vals[i]] = i < offsets[num_experts] ? static_cast<std::int32_t>(i) : -1;
}

/// The whole layout in one block: ids staged in shared memory (the duplicate check reads its
/// token's neighbours there), keys in a blocked arrangement (slot order), a stable block radix
/// sort, then each sorted position writes its slot and inverse, and each expert finds its offset
/// by a binary search over the sorted keys.
template <int THREADS, int ITEMS>
static __global__ void __launch_bounds__(THREADS)
    single_block_layout_kernel(std::int32_t const* __restrict__ ids, float const* __restrict__ weights, int slots, int top_k,
                               int num_experts, int key_bits, std::int32_t* __restrict__ sorted_slots,
                               std::int32_t* __restrict__ position, std::int64_t* __restrict__ offsets,
                               device_status* status) {
  using sort_t = cub::BlockRadixSort<int, THREADS, ITEMS, int>;
  __shared__ union {
    typename sort_t::TempStorage sort;
    int keys[THREADS * ITEMS];
  } smem;
  int keys[ITEMS], vals[ITEMS];
  int const first = static_cast<int>(threadIdx.x) * ITEMS;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    int const s = first + i;
    smem.keys[s] = s < slots ? ids[s] : -1;
    if (s < slots && weights && !isfinite(weights[s])) detail::report(status, device_error_non_finite_weight, s / top_k);
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    int const s = first + i;
    // padding sorts after every real slot (real keys are <= E)
    keys[i] = s < slots ? detail::staged_slot_key(smem.keys, s, top_k, num_experts, status) : num_experts + 1;
    vals[i] = s;
  }
  __syncthreads();  // the sort reuses smem.keys
  sort_t(smem.sort).Sort(keys, vals, 0, key_bits);
  __syncthreads();
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    int const p = first + i;
    smem.keys[p] = keys[i];
    if (p < slots) {
      sorted_slots[p] = vals[i];
      position[vals[i]] = keys[i] < num_experts ? p : -1;
    }
  }
  __syncthreads();
  for (int e = static_cast<int>(threadIdx.x); e <= num_experts; e += THREADS) {
    int lo = 0, hi = slots;  // first sorted position whose key >= e
    while (lo < hi) {
      int const mid = (lo + hi) >> 1;
      if (smem.keys[mid] < e) lo = mid + 1; else hi = mid;
    }
    offsets[e] = lo;
  }
}

namespace detail {
/// The whole layout for a handful of slots (decode), for the whole block (blockDim.x >= slots,
/// slots <= THREADS): no radix sort, each slot's sorted position is the count of slots ordered
/// before it (key, then slot: the same stable order), each offset the count of keys below its
/// expert. Same checks and outputs as single_block_layout_kernel. Also run by the fused decode
/// routing (decode_routing.cuh), after the gate wrote `ids` from the same block.
template <int THREADS>
__device__ inline void tiny_layout_in_block(std::int32_t const* ids, float const* weights, int slots, int top_k, int num_experts,
                                            std::int32_t* __restrict__ sorted_slots, std::int32_t* __restrict__ position,
                                            std::int64_t* __restrict__ offsets, device_status* status) {
  __shared__ int ids_s[THREADS], keys[THREADS];
  int const s = static_cast<int>(threadIdx.x);
  if (s < slots) {
    ids_s[s] = ids[s];
    if (weights && !isfinite(weights[s])) report(status, device_error_non_finite_weight, s / top_k);
  }
  __syncthreads();
  if (s < slots) keys[s] = staged_slot_key(ids_s, s, top_k, num_experts, status);
  __syncthreads();
  if (s < slots) {
    int const key = keys[s];
    int p = 0;
    for (int j = 0; j < slots; ++j) p += keys[j] < key || (keys[j] == key && j < s);
    sorted_slots[p] = s;
    position[s] = key < num_experts ? p : -1;
  }
  for (int e = s; e <= num_experts; e += static_cast<int>(blockDim.x)) {
    int below = 0;
    for (int j = 0; j < slots; ++j) below += keys[j] < e;
    offsets[e] = below;
  }
}
}  // namespace detail

template <int THREADS>
static __global__ void __launch_bounds__(THREADS)
    tiny_layout_kernel(std::int32_t const* __restrict__ ids, float const* __restrict__ weights, int slots, int top_k, int num_experts,
                       std::int32_t* __restrict__ sorted_slots, std::int32_t* __restrict__ position,
                       std::int64_t* __restrict__ offsets, device_status* status) {
  detail::tiny_layout_in_block<THREADS>(ids, weights, slots, top_k, num_experts, sorted_slots, position, offsets, status);
}

/// Most slots the tiny layout takes (one thread a slot).
inline constexpr long long layout_tiny_max_slots = 64;

/// Device buffers of the layout step, for up to `max_slots` slots (tokens x top_k). The first
/// three and `sort_temp` are the device_sort path's scratch.
struct layout_buffers {
  std::int32_t* keys_in = nullptr;
  std::int32_t* keys_out = nullptr;
  std::int32_t* vals_in = nullptr;
  std::int32_t* sorted_slots = nullptr;  // [max_slots] slot of each expert-major row
  std::int32_t* position = nullptr;      // [max_slots] expert-major row of each slot (-1: empty)
  std::int64_t* offsets = nullptr;       // [E + 1]
  void* sort_temp = nullptr;
  std::size_t sort_temp_bytes = 0;
};

/// Scratch bytes cub's sort needs for `max_slots` keys of experts below `num_experts`.
inline std::size_t layout_sort_temp_bytes(long long max_slots, int num_experts) {
  std::size_t bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<std::int32_t const*>(nullptr),
                                  static_cast<std::int32_t*>(nullptr), static_cast<std::int32_t const*>(nullptr),
                                  static_cast<std::int32_t*>(nullptr), static_cast<int>(max_slots), 0,
                                  detail::bits_for(num_experts), nullptr);
  return bytes;
}

/// Routing of n tokens -> expert-major layout in `b`. No host synchronisation.
inline cudaError_t launch_layout(std::int32_t const* ids, float const* weights, long long n, int top_k, int num_experts,
                                 layout_buffers const& b, device_status* status, cudaStream_t stream,
                                 layout_path path = layout_path::automatic) {
  long long const slots = n * top_k;
  if (slots == 0) {
    return cudaMemsetAsync(b.offsets, 0, sizeof(std::int64_t) * static_cast<std::size_t>(num_experts + 1), stream);
  }
  if (path == layout_path::automatic) {
    path = slots <= layout_automatic_single_block_slots ? layout_path::single_block : layout_path::device_sort;
  }
  if (path == layout_path::single_block) {
    if (slots > layout_single_block_max_slots) return cudaErrorInvalidValue;
    int const bits = detail::bits_for(num_experts + 1);
    auto const s = static_cast<int>(slots);
    if (slots <= layout_tiny_max_slots) {
      tiny_layout_kernel<64><<<1, 64, 0, stream>>>(ids, weights, s, top_k, num_experts, b.sorted_slots, b.position, b.offsets, status);
    } else if (slots <= 512) {
      single_block_layout_kernel<128, 4><<<1, 128, 0, stream>>>(ids, weights, s, top_k, num_experts, bits, b.sorted_slots,
                                                                 b.position, b.offsets, status);
    } else if (slots <= 2048) {
      single_block_layout_kernel<256, 8><<<1, 256, 0, stream>>>(ids, weights, s, top_k, num_experts, bits, b.sorted_slots,
                                                                 b.position, b.offsets, status);
    } else {
      single_block_layout_kernel<1024, 8><<<1, 1024, 0, stream>>>(ids, weights, s, top_k, num_experts, bits,
                                                                   b.sorted_slots, b.position, b.offsets, status);
    }
    return cudaGetLastError();
  }
  unsigned const threads = 256;
  auto const blocks = static_cast<unsigned>((slots + threads - 1) / threads);
  routing_keys_kernel<<<blocks, threads, 0, stream>>>(ids, weights, slots, top_k, num_experts, b.keys_in, b.vals_in,
                                                      status);
  std::size_t temp = b.sort_temp_bytes;
  auto err = cub::DeviceRadixSort::SortPairs(b.sort_temp, temp, b.keys_in, b.keys_out, b.vals_in, b.sorted_slots,
                                             static_cast<int>(slots), 0, detail::bits_for(num_experts), stream);
  if (err != cudaSuccess) return err;
  expert_offsets_kernel<<<static_cast<unsigned>((num_experts + 1 + 255) / 256), 256, 0, stream>>>(
      b.keys_out, slots, num_experts, b.offsets);
  inverse_positions_kernel<<<blocks, threads, 0, stream>>>(b.sorted_slots, slots, b.offsets, num_experts, b.position);
  return cudaGetLastError();
}

static __global__ void single_group_offsets_kernel(std::int64_t* offsets, long long n) {
  offsets[0] = 0;
  offsets[1] = n;
}

/// offsets = {0, n} on the device (one group of n rows: shared experts), without a host copy.
inline cudaError_t launch_single_group_offsets(std::int64_t* offsets, long long n, cudaStream_t stream) {
  single_group_offsets_kernel<<<1, 1, 0, stream>>>(offsets, n);
  return cudaGetLastError();
}

}  // namespace specmoe::kernels
