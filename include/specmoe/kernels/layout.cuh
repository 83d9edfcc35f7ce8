// specmoe/kernels/layout.cuh: routing -> expert-major order (stable), per-expert offsets, and the
// inverse map the combine uses. Deterministic: a stable radix sort keyed by expert id.
//
// Three paths with identical results, chosen by slot count (tokens x top_k), measured in
// bench/kernels/routing_kernels_bench.cu:
//   single_block: one launch; a block-wide radix sort in shared memory writes the order, the
//                 offsets and the inverse map directly (decode and small prefill: up to 8192 slots;
//                 up to 64 slots a rank count replaces the sort: one pass, no radix passes).
//   counting:     two launches, any size: each block keys and counts a chunk of slots; then each
//                 block sorts its chunk in shared memory and places it after the chunks before it
//                 (a counting sort across blocks, a radix sort inside one).
//   device_sort:  keys kernel + cub::DeviceRadixSort + offsets + inverse (any size).
// All check every slot: ids outside [-1, E), an expert twice in one token, non-finite weights.
#pragma once

#include <specmoe/kernels/gate.cuh>

#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_scan.cuh>
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
enum class layout_path { automatic, single_block, device_sort, counting };

/// Most slots the single-block path sorts (1024 threads x 8 keys).
inline constexpr long long layout_single_block_max_slots = 8192;
/// Where `automatic` leaves the single block for the counting path (or the device sort where the
/// counting path does not fit): up to here one block is as fast or faster (H100, docs/benchmarks.md:
/// 256 slots 4.5 against 5.2 us; from 1024 slots the counting path wins, 7.0 against 9.3).
inline constexpr long long layout_automatic_single_block_slots = 512;

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

// ------------------------------------------------------------------------------------------
// counting path: chunks of THREADS x ITEMS slots, one block each
// ------------------------------------------------------------------------------------------

/// Pass 1: keys[s] = slot_key(s) (every check), and counts[b * (E + 1) + key] = slots of chunk b
/// with that key (key E: empty or flagged).
template <int THREADS, int ITEMS>
static __global__ void __launch_bounds__(THREADS)
    layout_count_kernel(std::int32_t const* __restrict__ ids, float const* __restrict__ weights, long long slots, int top_k,
                        int num_experts, std::int32_t* __restrict__ keys, std::int32_t* __restrict__ counts,
                        device_status* status) {
  extern __shared__ int chunk_histogram[];  // [E + 1]
  int const bins = num_experts + 1;
  for (int e = static_cast<int>(threadIdx.x); e < bins; e += THREADS) chunk_histogram[e] = 0;
  __syncthreads();
  long long const first = static_cast<long long>(blockIdx.x) * THREADS * ITEMS;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    long long const s = first + i * THREADS + threadIdx.x;  // striped: coalesced loads and stores
    if (s < slots) {
      int const key = detail::slot_key(ids, weights, s, top_k, num_experts, status);
      keys[s] = key;
      atomicAdd(&chunk_histogram[key], 1);
    }
  }
  __syncthreads();
  for (int e = static_cast<int>(threadIdx.x); e < bins; e += THREADS) {
    counts[static_cast<long long>(blockIdx.x) * bins + e] = chunk_histogram[e];
  }
}

/// Pass 2: block b finds, for every key, where its chunk's rows of that key start in expert-major
/// order (the key's offset + the same key's rows in chunks before b), sorts its chunk (stable, in
/// shared memory), and writes each row's slot and inverse. Block 0 also writes the offsets.
template <int THREADS, int ITEMS>
static __global__ void __launch_bounds__(THREADS)
    layout_place_kernel(std::int32_t const* __restrict__ keys, long long slots, int num_experts, int key_bits,
                        std::int32_t const* __restrict__ counts, int chunks, std::int32_t* __restrict__ sorted_slots,
                        std::int32_t* __restrict__ position, std::int64_t* __restrict__ offsets) {
  using sort_t = cub::BlockRadixSort<int, THREADS, ITEMS, int>;
  using scan_t = cub::BlockScan<int, THREADS>;
  __shared__ union {
    typename sort_t::TempStorage sort;
    typename scan_t::TempStorage scan[2];
  } tmp;
  extern __shared__ int row_base[];  // [E + 1]: sorted chunk position p of key e goes to row_base[e] + p
  int const bins = num_experts + 1;
  int const chunk = static_cast<int>(blockIdx.x);
  int offset_carry = 0, chunk_carry = 0;
  for (int base = 0; base < bins; base += THREADS) {
    int const e = base + static_cast<int>(threadIdx.x);
    int total = 0, before = 0, mine = 0;
    if (e < bins) {
      for (int c = 0; c < chunks; ++c) {
        int const n = counts[static_cast<long long>(c) * bins + e];
        total += n;
        if (c < chunk) before += n;
        if (c == chunk) mine = n;
      }
    }
    int offset_excl = 0, offset_sum = 0, chunk_excl = 0, chunk_sum = 0;
    scan_t(tmp.scan[0]).ExclusiveSum(total, offset_excl, offset_sum);
    scan_t(tmp.scan[1]).ExclusiveSum(mine, chunk_excl, chunk_sum);
    if (e < bins) {
      int const offset = offset_carry + offset_excl;
      row_base[e] = offset + before - (chunk_carry + chunk_excl);
      if (chunk == 0) offsets[e] = offset;
    }
    offset_carry += offset_sum;
    chunk_carry += chunk_sum;
    __syncthreads();  // the scans' storage is reused
  }
  long long const first = static_cast<long long>(chunk) * THREADS * ITEMS;
  int key[ITEMS], slot[ITEMS];
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    long long const s = first + static_cast<long long>(threadIdx.x) * ITEMS + i;  // blocked: the sort's order
    key[i] = s < slots ? keys[s] : bins;  // padding sorts after every real key
    slot[i] = static_cast<int>(s);
  }
  sort_t(tmp.sort).Sort(key, slot, 0, key_bits);
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    if (key[i] < bins) {
      int const row = row_base[key[i]] + static_cast<int>(threadIdx.x) * ITEMS + i;
      sorted_slots[row] = slot[i];
      position[slot[i]] = key[i] < num_experts ? row : -1;
    }
  }
}

/// Threads of the counting path's blocks, and the slots a block takes: 512 up to
/// layout_counting_small_chunk_slots slots (more, shorter sorts), 2048 beyond (fewer chunks for
/// every block to sum over).
inline constexpr int layout_counting_threads = 256;
inline constexpr long long layout_counting_small_chunk_slots = 8192;

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
/// three and `sort_temp` are the device_sort path's scratch; the counting path keeps its keys in
/// keys_in and its per-chunk counts in keys_out.
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

/// Whether the counting path can take `slots`: the per-chunk counts live in keys_out (`slots`
/// entries) and a histogram of E + 1 ints in shared memory (at most 32 KiB, under the default limit).
inline bool layout_counting_fits(long long slots, int num_experts) {
  long long const chunk = slots <= layout_counting_small_chunk_slots ? layout_counting_threads * 2 : layout_counting_threads * 8;
  long long const chunks = (slots + chunk - 1) / chunk;
  return chunks * (num_experts + 1) <= slots && num_experts + 1 <= 8192 && slots < (1ll << 31);
}

namespace detail {
template <int ITEMS>
inline cudaError_t launch_counting_layout(std::int32_t const* ids, float const* weights, long long slots, int top_k,
                                          int num_experts, layout_buffers const& b, device_status* status, cudaStream_t stream) {
  constexpr int threads = layout_counting_threads;
  long long const chunks = (slots + threads * ITEMS - 1) / (threads * ITEMS);
  int const bins = num_experts + 1;
  std::size_t const smem = sizeof(int) * static_cast<std::size_t>(bins);
  layout_count_kernel<threads, ITEMS><<<static_cast<unsigned>(chunks), threads, smem, stream>>>(
      ids, weights, slots, top_k, num_experts, b.keys_in, b.keys_out, status);
  layout_place_kernel<threads, ITEMS><<<static_cast<unsigned>(chunks), threads, smem, stream>>>(
      b.keys_in, slots, num_experts, bits_for(bins), b.keys_out, static_cast<int>(chunks), b.sorted_slots, b.position,
      b.offsets);
  return cudaGetLastError();
}

}  // namespace detail

/// Routing of n tokens -> expert-major layout in `b`. No host synchronisation.
inline cudaError_t launch_layout(std::int32_t const* ids, float const* weights, long long n, int top_k, int num_experts,
                                 layout_buffers const& b, device_status* status, cudaStream_t stream,
                                 layout_path path = layout_path::automatic) {
  long long const slots = n * top_k;
  if (slots == 0) {
    return cudaMemsetAsync(b.offsets, 0, sizeof(std::int64_t) * static_cast<std::size_t>(num_experts + 1), stream);
  }
  if (path == layout_path::automatic) {
    path = slots <= layout_automatic_single_block_slots  ? layout_path::single_block
           : layout_counting_fits(slots, num_experts) ? layout_path::counting
                                                              : layout_path::device_sort;
  }
  if (path == layout_path::counting) {
    if (!layout_counting_fits(slots, num_experts)) return cudaErrorInvalidValue;
    return slots <= layout_counting_small_chunk_slots
               ? detail::launch_counting_layout<2>(ids, weights, slots, top_k, num_experts, b, status, stream)
               : detail::launch_counting_layout<8>(ids, weights, slots, top_k, num_experts, b, status, stream);
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
