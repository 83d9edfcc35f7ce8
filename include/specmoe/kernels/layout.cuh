// specmoe/kernels/layout.cuh: routing -> expert-major order (stable), per-expert offsets, and the
// inverse map the combine uses. Deterministic: a stable radix sort keyed by expert id.
#pragma once

#include <specmoe/kernels/gate.cuh>

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
}  // namespace detail

/// keys[s] = expert of slot s (num_experts for an empty slot, -1), vals[s] = s. Ids outside
/// [-1, E) and non-finite weights are flagged (and sorted last, as empty).
static __global__ void routing_keys_kernel(std::int32_t const* __restrict__ ids, float const* __restrict__ weights,
                                    long long slots, int top_k, int num_experts, std::int32_t* __restrict__ keys,
                                    std::int32_t* __restrict__ vals, device_status* status) {
  long long const s = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s >= slots) return;
  int e = ids[s];
  if (e < -1 || e >= num_experts) {
    detail::report(status, device_error_expert_out_of_range, s / top_k);
    e = -1;
  }
  if (weights && !isfinite(weights[s])) detail::report(status, device_error_non_finite_weight, s / top_k);
  keys[s] = e < 0 ? num_experts : e;
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

/// Device buffers of the layout step, for up to `max_slots` slots (tokens x top_k).
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
                                 layout_buffers const& b, device_status* status, cudaStream_t stream) {
  long long const slots = n * top_k;
  if (slots == 0) {
    return cudaMemsetAsync(b.offsets, 0, sizeof(std::int64_t) * static_cast<std::size_t>(num_experts + 1), stream);
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
