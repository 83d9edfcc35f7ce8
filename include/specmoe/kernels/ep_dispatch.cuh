// specmoe/kernels/ep_dispatch.cuh: the device side of expert-parallel dispatch and combine, shared
// by every device CommBackend (comm/nvlink_direct.cuh, comm/nccl_alltoallv.cuh).
//
// Receive layout, the same for every backend: rank r keeps one region of `capacity` rows per
// source rank s (row s * capacity + i, i < count from s). A token crosses to a rank once however
// many of its experts live there (de-duplication); its row carries the local expert ids it needs
// there, compacted to the receiver's width, -1 after. Results come back into the same layout
// ("returned" region d row i = the sum of destination d's experts for the token sent as row i).
//
// fp8 dispatch (optional, nvlink_direct): rows cross as e4m3 with one fp32 scale per 128
// elements (the group's largest magnitude over 448) into separate fp8 regions, and the receiver
// widens them back into the bf16 receive rows before the experts run. Lossy: off by default.
//
// Flags (direct backends): a 64-bit word per (receiver, source): epoch << 32 | row count, written
// with a system-scope release after the rows; the receiver acquires it. The epoch is a device
// counter, so forwards replayed from a CUDA graph stay in step without host arguments.
#pragma once

#include <specmoe/kernels/combine.cuh>
#include <specmoe/kernels/gate.cuh>

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace specmoe::kernels {

/// Most ranks one expert-parallel group may have (one NVLink domain of 8 GPUs, with room).
inline constexpr int ep_max_ranks = 16;

/// A peer did not signal within the timeout (rows of a dispatch, or results of a combine);
/// `first_token` of the status names the (lowest such) peer rank.
inline constexpr int device_error_peer_timeout = 16;
inline constexpr int device_error_peer_timeout_combine = 32;

/// Expert placement on the device (core/expert_placement.hpp, same replica rule).
struct ep_placement_view {
  int num_ranks = 0;
  int num_experts = 0;
  std::int32_t const* owner_offset = nullptr;  ///< [E + 1] CSR offsets into owners
  std::int32_t const* owners = nullptr;        ///< owners of each expert, ascending
  std::int32_t const* local_index = nullptr;   ///< [D, E]: expert e's index on rank r, or -1
};

/// Elements per fp8 scale of the fp8 dispatch payload.
inline constexpr int ep_fp8_group = 128;

/// Where the rows of one source go, per destination d: regions of [capacity] rows (a peer's receive
/// buffer for direct backends, a local staging buffer for NCCL). `width[d]` columns of ids/weights.
/// With `x8[0]` set the rows go as fp8 into x8 / scales instead of x.
struct ep_row_targets {
  __nv_bfloat16* x[ep_max_ranks] = {};
  std::int32_t* ids[ep_max_ranks] = {};
  float* weights[ep_max_ranks] = {};
  int width[ep_max_ranks] = {};
  std::uint8_t* x8[ep_max_ranks] = {};  ///< [capacity, hidden] e4m3 rows (fp8 dispatch), else null
  float* scales[ep_max_ranks] = {};     ///< [capacity, hidden / ep_fp8_group] their scales
};

/// The fp8 dispatch's arithmetic, the same on the host (tests) and the device: a group of
/// ep_fp8_group elements with largest finite magnitude `amax` is sent as e4m3(v * inverse) (round
/// to nearest, saturating: an infinity comes back as +-amax) with `scale`, and comes back as
/// bf16_rn(float(e4m3) * scale). The inverse is capped, so a group of tiny values (448 / amax past
/// FLT_MAX) keeps its zeros zero instead of 0 * inf = NaN.
__host__ __device__ inline float ep_fp8_magnitude(float v) { return isfinite(v) ? fabsf(v) : 0.0f; }
__host__ __device__ inline float ep_fp8_scale(float amax) { return amax / 448.0f; }
__host__ __device__ inline float ep_fp8_inverse(float amax) {
  return amax > 0.0f ? fminf(448.0f / amax, 3.0e38f) : 0.0f;
}
__host__ __device__ inline __nv_fp8_storage_t ep_fp8_encode(float v, float inverse) {
  return __nv_cvt_float_to_fp8(v * inverse, __NV_SATFINITE, __NV_E4M3);
}
__host__ __device__ inline float ep_fp8_decode(__nv_fp8_storage_t q, float scale) {
  return static_cast<float>(__half(__nv_cvt_fp8_to_halfraw(q, __NV_E4M3))) * scale;
}

/// Arrival signalling of a direct backend; `flag[0] == nullptr` means none (NCCL carries counts).
struct ep_signal {
  unsigned long long* flag[ep_max_ranks] = {};  ///< peer d's flag word for this source
  unsigned int* arrivals = nullptr;             ///< local: blocks done (the last one signals)
  unsigned int const* epoch = nullptr;          ///< local epoch counter
  unsigned int epoch_add = 0;                   ///< signal epoch = *epoch + epoch_add
};

/// A bounded wait for one flag per source; `flags == nullptr` means counts are already in place.
struct ep_wait {
  unsigned long long const* flags = nullptr;  ///< [D] local flag words, one per source
  unsigned int* epoch = nullptr;              ///< local epoch counter
  unsigned int epoch_add = 0;                 ///< expected epoch = *epoch + epoch_add
  unsigned int* arrivals = nullptr;           ///< local: set to advance the epoch when all blocks are done
  long long timeout_ns = 0;
  int timeout_bit = device_error_peer_timeout;  ///< what a timeout reports
  /// Most blocks a kernel that waits may have (0: two per SM). Ranks sharing a GPU keep it small:
  /// their spinning blocks would otherwise hold the SMs the awaited peer's kernels need.
  int max_blocks = 0;
};

namespace detail {

__device__ __forceinline__ void store_release_sys(unsigned long long* p, unsigned long long v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ unsigned long long load_acquire_sys(unsigned long long const* p) {
  unsigned long long v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ unsigned long long global_timer_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ inline int ep_serving_rank(ep_placement_view const& p, int e, int home, long long t) {
  int const begin = p.owner_offset[e], count = p.owner_offset[e + 1] - begin;
  if (count == 1) return p.owners[begin];
  if (p.local_index[home * p.num_experts + e] >= 0) return home;
  return p.owners[begin + static_cast<int>(t % count)];
}

/// Thread s < D of the block waits for source s's flag (or reads counts given); the block then
/// finds the counts in `counts`. A flag that never comes is reported and counts as zero rows.
__device__ inline void ep_block_wait(ep_wait const& w, int D, std::int32_t const* given_counts, int* counts,
                                     device_status* status) {
  int const s = static_cast<int>(threadIdx.x);
  if (s < D) {
    if (w.flags == nullptr) {
      counts[s] = given_counts ? given_counts[s] : 0;
    } else {
      unsigned int const expected = *w.epoch + w.epoch_add;
      unsigned long long const start = global_timer_ns();
      unsigned long long f = load_acquire_sys(w.flags + s);
      // (at least `expected`: a peer may already be one step ahead when only dispatches repeat)
      while (static_cast<int>(static_cast<unsigned int>(f >> 32) - expected) < 0) {
        if (global_timer_ns() - start > static_cast<unsigned long long>(w.timeout_ns)) {
          report(status, w.timeout_bit, s);
          f = static_cast<unsigned long long>(expected) << 32;  // zero rows
          break;
        }
        __nanosleep(64);
        f = load_acquire_sys(w.flags + s);
      }
      counts[s] = static_cast<int>(f & 0xffffffffu);
    }
  }
  __syncthreads();
}

/// A warp copies a row of `vecs` 16-byte words, each lane loading up to 8 words before it stores
/// any: 4 KiB in flight per warp towards a (usually remote) destination, not 512 bytes, which is
/// what keeps NVLink busy on large dispatches. `src` is not written while the kernel runs.
__device__ __forceinline__ void warp_copy_row(uint4* dst, uint4 const* __restrict__ src, int vecs, int lane) {
  constexpr int unroll = 8;
  for (int base = 0; base < vecs; base += 32 * unroll) {
    uint4 words[unroll];
#pragma unroll
    for (int u = 0; u < unroll; ++u) {
      int const v = base + u * 32 + lane;
      if (v < vecs) words[u] = __ldg(src + v);
    }
#pragma unroll
    for (int u = 0; u < unroll; ++u) {
      int const v = base + u * 32 + lane;
      if (v < vecs) dst[v] = words[u];
    }
  }
}

/// fp8 dispatch: the warp encodes a row 32 x 8 elements at a time (one scale group per half-warp)
/// and writes each piece, with its scales, to every destination the token goes to.
__device__ inline void warp_send_row_fp8(uint4 const* __restrict__ src, int hidden, long long t, int D,
                                         std::int32_t const* __restrict__ send_slot, ep_row_targets const& tg, int lane) {
  int const vecs = hidden / 8, groups = hidden / ep_fp8_group;
  constexpr int unroll = 4;
  for (int base = 0; base < vecs; base += 32 * unroll) {
    uint4 raw[unroll];
#pragma unroll
    for (int u = 0; u < unroll; ++u) {
      int const v = base + u * 32 + lane;
      raw[u] = v < vecs ? __ldg(src + v) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < unroll; ++u) {
      int const v = base + u * 32 + lane;
      if (base + u * 32 >= vecs) break;  // uniform: hidden is a multiple of 128, so whole half-warps are in or out
      auto const* h = reinterpret_cast<__nv_bfloat162 const*>(&raw[u]);
      float f[8];
      float amax = 0.0f;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        float2 const p = __bfloat1622float2(h[i]);
        f[2 * i] = p.x;
        f[2 * i + 1] = p.y;
        amax = fmaxf(amax, fmaxf(ep_fp8_magnitude(p.x), ep_fp8_magnitude(p.y)));
      }
#pragma unroll
      for (int off = 8; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));  // the half-warp's group
      float const inverse = ep_fp8_inverse(amax), scale = ep_fp8_scale(amax);
      uint2 q;
      auto* qb = reinterpret_cast<__nv_fp8_storage_t*>(&q);
#pragma unroll
      for (int c = 0; c < 8; ++c) qb[c] = ep_fp8_encode(f[c], inverse);
      if (v >= vecs) continue;
      for (int d = 0; d < D; ++d) {
        int const slot = send_slot[t * D + d];
        if (slot < 0) continue;
        *reinterpret_cast<uint2*>(tg.x8[d] + static_cast<long long>(slot) * hidden + v * 8) = q;
        if ((lane & 15) == 0) tg.scales[d][static_cast<long long>(slot) * groups + v / 16] = scale;
      }
    }
  }
}

/// The last block of the grid to get here runs `last()` (after every block's writes are visible).
template <class F>
__device__ inline void ep_last_block(unsigned int* arrivals, F&& last) {
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned int const done = atomicAdd(arrivals, 1u);
    if (done == gridDim.x - 1) {
      __threadfence_system();
      last();
      *arrivals = 0;  // every block has arrived: ready for the next launch
    }
  }
}

}  // namespace detail

/// One block: checks the routing, picks the serving rank of every (token, expert), numbers each
/// token's row per destination in token order (de-duplicated), counts rows per destination.
/// dest_of [n, k]: serving rank or -1; send_slot [n, D]: row in d's region or -1; send_counts [D].
static __global__ void __launch_bounds__(1024)
    ep_plan_kernel(std::int32_t const* __restrict__ ids, float const* __restrict__ weights, long long n, int k,
                   ep_placement_view p, int home, std::int32_t* __restrict__ dest_of, std::int32_t* __restrict__ send_slot,
                   std::int32_t* __restrict__ send_counts, device_status* status) {
  __shared__ int warp_base[32][ep_max_ranks];
  __shared__ int running[ep_max_ranks];
  int const D = p.num_ranks, E = p.num_experts;
  int const lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
  unsigned const lanes_below = (1u << lane) - 1u;
  if (threadIdx.x < static_cast<unsigned>(D)) running[threadIdx.x] = 0;
  __syncthreads();
  for (long long base = 0; base < n; base += blockDim.x) {
    long long const t = base + threadIdx.x;
    unsigned mask = 0;
    if (t < n) {
      for (int j = 0; j < k; ++j) {
        long long const s = t * k + j;
        int const e = ids[s];
        int dest = -1;
        if (!isfinite(weights[s])) detail::report(status, device_error_non_finite_weight, t);
        if (e < -1 || e >= E) {
          detail::report(status, device_error_expert_out_of_range, t);
        } else if (e >= 0) {
          bool twice = false;
          for (int i = 0; i < j; ++i) twice = twice || ids[t * k + i] == e;
          if (twice) {
            detail::report(status, device_error_duplicate_expert, t);
          } else {
            dest = detail::ep_serving_rank(p, e, home, t);
            mask |= 1u << dest;
          }
        }
        dest_of[s] = dest;
      }
    }
    for (int d = 0; d < D; ++d) {
      unsigned const b = __ballot_sync(0xffffffffu, (mask >> d) & 1u);
      if (lane == 0) warp_base[warp][d] = __popc(b);
    }
    __syncthreads();
    if (warp == 0) {  // exclusive scan of the per-warp counts, per destination
      int const warps = static_cast<int>(blockDim.x) / 32;
      for (int d = 0; d < D; ++d) {
        int const v = lane < warps ? warp_base[lane][d] : 0;
        int incl = v;
        for (int off = 1; off < 32; off <<= 1) {
          int const o = __shfl_up_sync(0xffffffffu, incl, off);
          if (lane >= off) incl += o;
        }
        int const total = __shfl_sync(0xffffffffu, incl, 31);
        if (lane < warps) warp_base[lane][d] = running[d] + incl - v;
        __syncwarp();
        if (lane == 0) running[d] += total;
        __syncwarp();
      }
    }
    __syncthreads();
    for (int d = 0; d < D; ++d) {
      unsigned const b = __ballot_sync(0xffffffffu, (mask >> d) & 1u);
      if (t < n) send_slot[t * D + d] = (mask >> d) & 1u ? warp_base[warp][d] + __popc(b & lanes_below) : -1;
    }
    __syncthreads();
  }
  if (threadIdx.x < static_cast<unsigned>(D)) send_counts[threadIdx.x] = running[threadIdx.x];
}

/// A warp per token: copies the token's row (16-byte accesses; e4m3 and scales with `FP8`) and its
/// compacted local routing to every destination region it goes to; the last block then signals
/// each destination. (FP8 is a template argument: the bf16 path keeps its registers.)
template <bool FP8>
static __global__ void __launch_bounds__(256)
    ep_send_rows_kernel(__nv_bfloat16 const* __restrict__ x, long long n, int hidden, int k,
                        std::int32_t const* __restrict__ ids, float const* __restrict__ weights,
                        std::int32_t const* __restrict__ dest_of, std::int32_t const* __restrict__ send_slot,
                        std::int32_t const* __restrict__ send_counts, ep_placement_view p, ep_row_targets tg,
                        ep_signal sig) {
  int const D = p.num_ranks, E = p.num_experts;
  int const lane = static_cast<int>(threadIdx.x) % 32;
  int const vecs = hidden / 8;
  long long const warps = static_cast<long long>(gridDim.x) * (blockDim.x / 32);
  constexpr bool fp8 = FP8;
  for (long long t = static_cast<long long>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; t < n; t += warps) {
    auto const* src = reinterpret_cast<uint4 const*>(x + t * hidden);
    if constexpr (fp8) detail::warp_send_row_fp8(src, hidden, t, D, send_slot, tg, lane);
    for (int d = 0; d < D; ++d) {
      int const slot = send_slot[t * D + d];
      if (slot < 0) continue;
      if constexpr (!fp8) detail::warp_copy_row(reinterpret_cast<uint4*>(tg.x[d] + static_cast<long long>(slot) * hidden), src, vecs, lane);
      int const width = tg.width[d];
      bool const here = lane < k && dest_of[t * k + lane] == d;
      unsigned const b = __ballot_sync(0xffffffffu, here);
      int const pos = __popc(b & ((1u << lane) - 1u));
      if (here && pos < width) {
        tg.ids[d][static_cast<long long>(slot) * width + pos] = p.local_index[d * E + ids[t * k + lane]];
        tg.weights[d][static_cast<long long>(slot) * width + pos] = weights[t * k + lane];
      }
      int const used = __popc(b);
      if (lane >= used && lane < width) {
        tg.ids[d][static_cast<long long>(slot) * width + lane] = -1;
        tg.weights[d][static_cast<long long>(slot) * width + lane] = 0.0f;
      }
    }
  }
  if (sig.flag[0] == nullptr) return;
  detail::ep_last_block(sig.arrivals, [&] {
    unsigned long long const epoch = *sig.epoch + sig.epoch_add;
    for (int d = 0; d < D; ++d)
      detail::store_release_sys(sig.flag[d], epoch << 32 | static_cast<unsigned int>(send_counts[d]));
  });
}

/// The receiver's side of dispatch: waits for every source (direct backends), publishes the row
/// counts, and marks the rows past each count as routed nowhere (ids -1) so the expert step can
/// run over the whole receive buffer. With `w.arrivals`, the last block advances the epoch.
static __global__ void __launch_bounds__(256)
    ep_dispatch_wait_kernel(ep_wait w, int D, int capacity, int width, std::int32_t* __restrict__ recv_counts,
                            std::int32_t* __restrict__ recv_ids, float* __restrict__ recv_weights, device_status* status) {
  __shared__ int counts[ep_max_ranks];
  detail::ep_block_wait(w, D, recv_counts, counts, status);
  if (blockIdx.x == 0 && threadIdx.x < static_cast<unsigned>(D)) recv_counts[threadIdx.x] = counts[threadIdx.x];
  long long const total = static_cast<long long>(D) * capacity * width;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    long long const row = i / width;
    if (row % capacity >= counts[row / capacity]) {
      recv_ids[i] = -1;
      recv_weights[i] = 0.0f;
    }
  }
  if (w.arrivals) detail::ep_last_block(w.arrivals, [&] { *w.epoch = *w.epoch + 1; });
}

/// fp8 dispatch, receiver: a warp per row widens rows i < count of each source region from e4m3
/// (x8, scales) back to bf16 (x), after ep_dispatch_wait_kernel has published the counts.
static __global__ void __launch_bounds__(256)
    ep_fp8_widen_kernel(std::uint8_t const* __restrict__ x8, float const* __restrict__ scales, std::int32_t const* __restrict__ counts,
                        int D, long long capacity, int hidden, __nv_bfloat16* __restrict__ x) {
  int const lane = static_cast<int>(threadIdx.x) % 32;
  int const vecs = hidden / 8, groups = hidden / ep_fp8_group;
  long long const rows = static_cast<long long>(D) * capacity;
  long long const warps = static_cast<long long>(gridDim.x) * (blockDim.x / 32);
  for (long long r = static_cast<long long>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; r < rows; r += warps) {
    if (r % capacity >= counts[r / capacity]) continue;
    for (int v = lane; v < vecs; v += 32) {
      uint2 const q = *reinterpret_cast<uint2 const*>(x8 + r * hidden + v * 8);
      float const scale = scales[r * groups + v / 16];
      auto const* qb = reinterpret_cast<__nv_fp8_storage_t const*>(&q);
      float f[8];
#pragma unroll
      for (int c = 0; c < 8; ++c) f[c] = ep_fp8_decode(qb[c], scale);
      detail::store8(x + r * hidden + v * 8, f);
    }
  }
}

/// A warp per received row: returns region s's result rows (i < count from s) into rank s's
/// "returned" region for this rank; the last block signals every source.
static __global__ void __launch_bounds__(256)
    ep_return_rows_kernel(__nv_bfloat16 const* __restrict__ results, std::int32_t const* __restrict__ recv_counts, int D,
                          int capacity, int hidden, ep_row_targets tg, ep_signal sig) {
  int const lane = static_cast<int>(threadIdx.x) % 32;
  int const vecs = hidden / 8;
  long long const rows = static_cast<long long>(D) * capacity;
  long long const warps = static_cast<long long>(gridDim.x) * (blockDim.x / 32);
  for (long long r = static_cast<long long>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; r < rows; r += warps) {
    int const s = static_cast<int>(r / capacity);
    long long const i = r % capacity;
    if (i >= recv_counts[s]) continue;
    auto const* src = reinterpret_cast<uint4 const*>(results + r * hidden);
    auto* dst = reinterpret_cast<uint4*>(tg.x[s] + i * hidden);
    detail::warp_copy_row(dst, src, vecs, lane);
  }
  detail::ep_last_block(sig.arrivals, [&] {
    unsigned long long const epoch = *sig.epoch + sig.epoch_add;
    for (int s = 0; s < D; ++s)
      detail::store_release_sys(sig.flag[s], epoch << 32 | static_cast<unsigned int>(recv_counts[s]));
  });
}

/// The token's rank after combine: out[t] = sum over destinations d (ascending) of the returned
/// row, plus the shared experts' row, fp32, then rounded once. Waits for the returns (direct
/// backends) and leaves `out` unwritten when bad input was flagged. Thread = 8 columns.
static __global__ void __launch_bounds__(256)
    ep_combine_reduce_kernel(ep_wait w, __nv_bfloat16 const* __restrict__ returned, std::int32_t const* __restrict__ send_slot,
                             long long n, int D, int capacity, int hidden, __nv_bfloat16 const* __restrict__ shared,
                             __nv_bfloat16* __restrict__ out, long long out_stride, device_status* status) {
  __shared__ int counts[ep_max_ranks];
  detail::ep_block_wait(w, D, nullptr, counts, status);  // (counts unused: the slots say where each row is)
  if (*reinterpret_cast<int volatile*>(&status->bits) != 0) return;
  int const vecs = hidden / 8;
  for (long long idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n * vecs;
       idx += static_cast<long long>(gridDim.x) * blockDim.x) {
    long long const t = idx / vecs;
    int const v = static_cast<int>(idx % vecs);
    float acc[8] = {};
    float part[8];
    for (int d = 0; d < D; ++d) {
      int const slot = send_slot[t * D + d];
      if (slot < 0) continue;
      detail::load8(returned + (static_cast<long long>(d) * capacity + slot) * hidden + v * 8, part);
#pragma unroll
      for (int c = 0; c < 8; ++c) acc[c] = __fadd_rn(acc[c], part[c]);
    }
    if (shared) {
      detail::load8(shared + t * hidden + v * 8, part);
#pragma unroll
      for (int c = 0; c < 8; ++c) acc[c] = __fadd_rn(acc[c], part[c]);
    }
    detail::store8(out + t * out_stride + v * 8, acc);
  }
}

// ---- host launchers -------------------------------------------------------------------------

inline cudaError_t launch_ep_plan(std::int32_t const* ids, float const* weights, long long n, int k, ep_placement_view p,
                                  int home, std::int32_t* dest_of, std::int32_t* send_slot, std::int32_t* send_counts,
                                  device_status* status, cudaStream_t stream) {
  // (n == 0 still runs: the counts must be written)
  int const threads = n >= 1024 ? 1024 : static_cast<int>((n + 31) / 32 * 32 > 0 ? (n + 31) / 32 * 32 : 32);
  ep_plan_kernel<<<1, threads, 0, stream>>>(ids, weights, n, k, p, home, dest_of, send_slot, send_counts, status);
  return cudaGetLastError();
}

/// Blocks of 256 threads for a kernel that first waits for peers: at most two per SM (or the
/// wait's own cap), so peer kernels on the same GPU keep room to run.
inline unsigned ep_wait_blocks(long long threads, int sms, ep_wait const& w) {
  long long const blocks = (threads + 255) / 256;
  long long const cap = w.flags && w.max_blocks > 0 ? w.max_blocks : 2LL * sms;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks < cap ? blocks : cap));
}

/// Blocks for the row-copy kernels: enough warps to keep the links busy, capped by the work.
inline int ep_copy_blocks(long long rows, int sms) {
  long long const by_rows = (rows + 7) / 8;  // 8 warps a block
  long long const cap = static_cast<long long>(sms) * 4;
  return static_cast<int>(by_rows < 1 ? 1 : (by_rows < cap ? by_rows : cap));
}

inline cudaError_t launch_ep_send_rows(__nv_bfloat16 const* x, long long n, int hidden, int k, std::int32_t const* ids,
                                       float const* weights, std::int32_t const* dest_of, std::int32_t const* send_slot,
                                       std::int32_t const* send_counts, ep_placement_view p, ep_row_targets const& tg,
                                       ep_signal const& sig, int sms, cudaStream_t stream) {
  auto const kernel = tg.x8[0] != nullptr ? ep_send_rows_kernel<true> : ep_send_rows_kernel<false>;
  kernel<<<ep_copy_blocks(n, sms), 256, 0, stream>>>(x, n, hidden, k, ids, weights, dest_of, send_slot, send_counts, p, tg,
                                                     sig);
  return cudaGetLastError();
}

inline cudaError_t launch_ep_dispatch_wait(ep_wait const& w, int D, int capacity, int width, std::int32_t* recv_counts,
                                           std::int32_t* recv_ids, float* recv_weights, device_status* status, int sms,
                                           cudaStream_t stream) {
  ep_dispatch_wait_kernel<<<ep_wait_blocks(static_cast<long long>(D) * capacity * width, sms, w), 256, 0, stream>>>(w, D, capacity, width, recv_counts, recv_ids, recv_weights, status);
  return cudaGetLastError();
}

inline cudaError_t launch_ep_fp8_widen(std::uint8_t const* x8, float const* scales, std::int32_t const* counts, int D, long long capacity,
                                       int hidden, __nv_bfloat16* x, int sms, cudaStream_t stream) {
  if (hidden % ep_fp8_group != 0) return cudaErrorInvalidValue;
  ep_fp8_widen_kernel<<<ep_copy_blocks(static_cast<long long>(D) * capacity, sms), 256, 0, stream>>>(x8, scales, counts, D, capacity,
                                                                                                    hidden, x);
  return cudaGetLastError();
}

inline cudaError_t launch_ep_return_rows(__nv_bfloat16 const* results, std::int32_t const* recv_counts, int D,
                                         int capacity, int hidden, ep_row_targets const& tg, ep_signal const& sig, int sms,
                                         cudaStream_t stream) {
  ep_return_rows_kernel<<<ep_copy_blocks(static_cast<long long>(D) * capacity, sms), 256, 0, stream>>>(
      results, recv_counts, D, capacity, hidden, tg, sig);
  return cudaGetLastError();
}

inline cudaError_t launch_ep_combine_reduce(ep_wait const& w, __nv_bfloat16 const* returned,
                                            std::int32_t const* send_slot, long long n, int D, int capacity, int hidden,
                                            __nv_bfloat16 const* shared, __nv_bfloat16* out, long long out_stride,
                                            device_status* status, int sms, cudaStream_t stream) {
  if (n == 0 && w.flags == nullptr) return cudaSuccess;
  ep_combine_reduce_kernel<<<ep_wait_blocks(n * (hidden / 8), sms, w), 256, 0, stream>>>(w, returned, send_slot, n, D, capacity,
                                                                                     hidden, shared, out, out_stride, status);
  return cudaGetLastError();
}

}  // namespace specmoe::kernels
