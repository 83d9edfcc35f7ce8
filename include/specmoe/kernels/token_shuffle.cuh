// specmoe/kernels/token_shuffle.cuh: the device side of Speculative MoE's token shuffle with
// tensor-parallel attention — the shuffle plan (placement/tp_shuffle.hpp's rule, slot for slot),
// the shuffled reduce-scatter (each rank pushes its partial rows to the rank whose shard holds the
// token, the owner sums them) and the shuffled all-gather (each rank pushes its shard's outputs to
// every rank, which puts them back in token order).
//
// Shards: S rows per rank; slot d*S + i is row i of rank d's shard; `order[slot]` is the token
// there, -1 past the shard's count. The reduce sums the D partials of a row in ascending source
// rank, in fp32, rounding once, so a token's reduced row does not depend on where it was placed.
#pragma once

#include <specmoe/kernels/ep_dispatch.cuh>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace specmoe::kernels {

/// A rank reported bad input in the shard it computed (`first_token` names it): the gathered
/// rows are incomplete, so this rank's output stays unwritten too.
inline constexpr int device_error_peer_bad_input = 64;
/// A peer did not signal its partials (reduce-scatter) or outputs (all-gather) in time.
inline constexpr int device_error_peer_timeout_shuffle = 128;

/// Confidence levels of the shuffle rule (placement/tp_shuffle.hpp: tp_shuffle_levels).
inline constexpr int token_shuffle_levels = 256;

namespace detail {

/// Position of each thread's item among the block's items of the same bin, in thread order,
/// continuing from `running[bin]` (block-shared; advanced by this call). bin < 0: none (-1).
/// Every thread of the block calls it; bins <= MaxBins; blockDim a multiple of 32.
template <int MaxBins>
__device__ inline int block_ordered_position(int bin, int bins, int (*warp_base)[MaxBins], int* running) {
  int const lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
  int const warps = static_cast<int>(blockDim.x) / 32;
  unsigned const below = (1u << lane) - 1u;
  int mine = 0;
  for (int b = 0; b < bins; ++b) {
    unsigned const m = __ballot_sync(0xffffffffu, bin == b);
    if (lane == 0) warp_base[warp][b] = __popc(m);
    if (bin == b) mine = __popc(m & below);
  }
  __syncthreads();
  if (warp == 0) {  // exclusive scan of the per-warp counts, per bin, after the running totals
    for (int b = 0; b < bins; ++b) {
      int const v = lane < warps ? warp_base[lane][b] : 0;
      int incl = v;
      for (int off = 1; off < 32; off <<= 1) {
        int const o = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += o;
      }
      int const total = __shfl_sync(0xffffffffu, incl, 31);
      if (lane < warps) warp_base[lane][b] = running[b] + incl - v;
      __syncwarp();
      if (lane == 0) running[b] += total;
      __syncwarp();
    }
  }
  __syncthreads();
  int const pos = bin >= 0 ? warp_base[warp][bin] + mine : -1;
  __syncthreads();  // (warp_base is reused by the next call)
  return pos;
}

__device__ inline int shuffle_level(std::int32_t const* predicted, float const* confidence, long long t, int D) {
  if (predicted == nullptr) return -1;
  int const p = predicted[t];
  if (p < 0 || p >= D) return -1;
  float const c = confidence ? confidence[t] : 1.0f;
  if (!(c > 0.0f)) return 0;
  if (c >= 1.0f) return token_shuffle_levels - 1;
  return min(token_shuffle_levels - 1, static_cast<int>(c * static_cast<float>(token_shuffle_levels)));
}

__device__ __host__ inline long long shard_count(long long T, int D, int d, long long S) {
  long long const c = T - d * S;
  return c < 0 ? 0 : (c > S ? S : c);
}

}  // namespace detail

/// One block: the shuffle plan of T tokens over D ranks (shards of S rows). `predicted` may be
/// null (the contiguous split); `confidence` may be null (every guess fully confident).
/// Writes order [D * S] and rank_of [T] (scratch, then the token's rank).
static __global__ void __launch_bounds__(1024)
    token_shuffle_plan_kernel(std::int32_t const* __restrict__ predicted, float const* __restrict__ confidence, long long T,
                              int D, long long S, std::int32_t* __restrict__ rank_of, std::int32_t* __restrict__ order) {
  constexpr int bins = ep_max_ranks + 1;  // D ranks, and one counter for the leftovers
  __shared__ int hist[ep_max_ranks][token_shuffle_levels];
  __shared__ int warp_base[32][bins];
  __shared__ int running[bins];
  __shared__ int threshold[ep_max_ranks], take[ep_max_ranks];
  __shared__ long long room_before[ep_max_ranks + 1];
  for (int i = static_cast<int>(threadIdx.x); i < D * token_shuffle_levels; i += static_cast<int>(blockDim.x))
    (&hist[0][0])[i] = 0;
  if (threadIdx.x < static_cast<unsigned>(bins)) running[threadIdx.x] = 0;
  __syncthreads();
  if (predicted) {
    for (long long t = threadIdx.x; t < T; t += blockDim.x) {
      int const q = detail::shuffle_level(predicted, confidence, t, D);
      if (q >= 0) atomicAdd(&hist[predicted[t]][q], 1);
    }
  }
  __syncthreads();
  {  // the level where each shard fills: a warp per rank, 8 levels a lane, from the top level down
    int const lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
    constexpr int per_lane = token_shuffle_levels / 32;
    for (int d = warp; d < D; d += static_cast<int>(blockDim.x) / 32) {
      long long const cap = detail::shard_count(T, D, d, S);
      int const top = token_shuffle_levels - 1 - lane * per_lane;  // this lane's levels: top .. top - 7
      int mine = 0;
      for (int i = 0; i < per_lane; ++i) mine += hist[d][top - i];
      int incl = mine;  // askers at this lane's levels and above
      for (int off = 1; off < 32; off <<= 1) {
        int const o = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += o;
      }
      int const total = __shfl_sync(0xffffffffu, incl, 31);
      unsigned const full = __ballot_sync(0xffffffffu, incl >= cap);
      if (full == 0) {  // fewer askers than room: all of them fit
        if (lane == 0) {
          threshold[d] = -1;
          take[d] = 0;
          room_before[d + 1] = cap - total;  // free slots, summed below
        }
      } else if (lane == __ffs(full) - 1) {  // the lane whose levels fill the shard
        long long above = incl - mine;
        for (int i = 0; i < per_lane; ++i) {
          int const h = hist[d][top - i];
          if (above + h >= cap) {
            threshold[d] = top - i;
            take[d] = static_cast<int>(cap - above);
            break;
          }
          above += h;
        }
        room_before[d + 1] = 0;
      }
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    room_before[0] = 0;
    for (int d = 0; d < D; ++d) room_before[d + 1] += room_before[d];
  }
  __syncthreads();
  // Guesses that fit (ties at the threshold level in token order); the rest numbered in token
  // order (bin D of the ordered count) and stored as -(index + 1).
  for (long long base = 0; base < T; base += blockDim.x) {
    long long const t = base + threadIdx.x;
    int q = -1, p = -1;
    if (t < T) {
      q = detail::shuffle_level(predicted, confidence, t, D);
      if (q >= 0) p = predicted[t];
    }
    int const tie = detail::block_ordered_position<bins>(q >= 0 && q == threshold[p] ? p : -1, D, warp_base, running);
    bool const accepted = q >= 0 && (q > threshold[p] || (tie >= 0 && tie < take[p]));
    int const left = detail::block_ordered_position<bins>(t < T && !accepted ? 0 : -1, 1, warp_base, running + D);
    if (t < T) rank_of[t] = accepted ? p : -(left + 1);
  }
  __syncthreads();
  if (threadIdx.x < static_cast<unsigned>(bins)) running[threadIdx.x] = 0;
  __syncthreads();
  // Final ranks, and each shard's rows in token order.
  for (long long base = 0; base < T; base += blockDim.x) {
    long long const t = base + threadIdx.x;
    int r = -1;
    if (t < T) {
      r = rank_of[t];
      if (r < 0) {
        long long const i = -static_cast<long long>(r) - 1;
        r = 0;
        while (r + 1 < D && room_before[r + 1] <= i) ++r;
      }
    }
    int const pos = detail::block_ordered_position<bins>(r, D, warp_base, running);
    if (t < T) {
      rank_of[t] = r;
      order[r * S + pos] = static_cast<std::int32_t>(t);
    }
  }
  for (long long j = threadIdx.x; j < D * S; j += blockDim.x)
    if (j % S >= detail::shard_count(T, D, static_cast<int>(j / S), S)) order[j] = -1;
}

/// A warp per slot of any shard: copies the partial row of the token there into that shard
/// rank's region for this source (`tg.x[d]`, rows 0..S); the last block signals each rank.
static __global__ void __launch_bounds__(256)
    shuffle_push_partials_kernel(__nv_bfloat16 const* __restrict__ partial, long long x_stride, int hidden,
                                 std::int32_t const* __restrict__ order, int D, long long S, ep_row_targets tg, ep_signal sig) {
  int const lane = static_cast<int>(threadIdx.x) % 32;
  int const vecs = hidden / 8;
  long long const warps = static_cast<long long>(gridDim.x) * (blockDim.x / 32);
  for (long long j = static_cast<long long>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; j < D * S; j += warps) {
    int const t = order[j];
    if (t < 0) continue;
    auto const* src = reinterpret_cast<uint4 const*>(partial + t * x_stride);
    auto* dst = reinterpret_cast<uint4*>(tg.x[j / S] + (j % S) * hidden);
    detail::warp_copy_row(dst, src, vecs, lane);
  }
  if (sig.flag[0] == nullptr) return;
  detail::ep_last_block(sig.arrivals, [&] {
    unsigned long long const epoch = *sig.epoch + sig.epoch_add;
    for (int d = 0; d < D; ++d) detail::store_release_sys(sig.flag[d], epoch << 32);
  });
}

/// The shard owner's side: waits for every source, then shard[i] = sum over sources s (ascending)
/// of regions[s * S + i], fp32, rounded once, for i < count. Thread = 8 columns.
static __global__ void __launch_bounds__(256)
    shuffle_reduce_kernel(ep_wait w, __nv_bfloat16 const* __restrict__ regions, int D, long long S, long long count,
                          int hidden, __nv_bfloat16* __restrict__ shard, device_status* status) {
  __shared__ int counts[ep_max_ranks];
  detail::ep_block_wait(w, D, nullptr, counts, status);
  int const vecs = hidden / 8;
  for (long long idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; idx < count * vecs;
       idx += static_cast<long long>(gridDim.x) * blockDim.x) {
    long long const i = idx / vecs;
    int const v = static_cast<int>(idx % vecs);
    float acc[8] = {};
    float part[8];
    for (int s = 0; s < D; ++s) {
      detail::load8(regions + (s * S + i) * hidden + v * 8, part);
#pragma unroll
      for (int c = 0; c < 8; ++c) acc[c] = __fadd_rn(acc[c], part[c]);
    }
    detail::store8(shard + i * hidden + v * 8, acc);
  }
}

/// A warp per shard row i < count: copies it into every rank's gather region for this source
/// (`tg.x[d]`), and its tag (`tags[i]`, when given) into `tg.ids[d][i]`; the last block signals
/// every rank, with 1 in the count field when this rank flagged bad input (its shard's rows are
/// then not outputs, and no rank may write them).
static __global__ void __launch_bounds__(256)
    shuffle_push_outputs_kernel(__nv_bfloat16 const* __restrict__ shard, std::int32_t const* __restrict__ tags,
                                long long count, int hidden, int D, ep_row_targets tg, ep_signal sig,
                                device_status const* status) {
  int const lane = static_cast<int>(threadIdx.x) % 32;
  int const vecs = hidden / 8;
  long long const warps = static_cast<long long>(gridDim.x) * (blockDim.x / 32);
  for (long long i = static_cast<long long>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; i < count; i += warps) {
    auto const* src = reinterpret_cast<uint4 const*>(shard + i * hidden);
    for (int d = 0; d < D; ++d) {
      auto* dst = reinterpret_cast<uint4*>(tg.x[d] + i * hidden);
      detail::warp_copy_row(dst, src, vecs, lane);
    }
    if (tags != nullptr && lane < D) tg.ids[lane][i] = tags[i];
  }
  detail::ep_last_block(sig.arrivals, [&] {
    unsigned long long const epoch = *sig.epoch + sig.epoch_add;
    unsigned long long const bad = *reinterpret_cast<int const volatile*>(&status->bits) != 0 ? 1 : 0;
    for (int d = 0; d < D; ++d) detail::store_release_sys(sig.flag[d], epoch << 32 | bad);
  });
}

/// Every rank after the gather: out[order[j]] = gathered[j] for each filled slot j (waits first
/// when `w.flags`), and tags_out[order[j]] = gathered_tags[j] when tags_out is given. Leaves `out`
/// (and the tags) unwritten when this rank flagged anything or a source reported bad input in its
/// shard (`bad_from`: [D] flags of the sources, or the counts of the wait). Thread = 8 columns.
static __global__ void __launch_bounds__(256)
    shuffle_unpermute_kernel(ep_wait w, __nv_bfloat16 const* __restrict__ gathered, std::int32_t const* __restrict__ order,
                             int D, long long S, int hidden, __nv_bfloat16* __restrict__ out, long long out_stride,
                             std::int32_t const* __restrict__ gathered_tags, std::int32_t* __restrict__ tags_out,
                             std::int32_t const* __restrict__ bad_from, device_status* status) {
  __shared__ int counts[ep_max_ranks];
  __shared__ int prior;  // this rank's own flags, from the kernels before (they name its token)
  if (threadIdx.x == 0) prior = *reinterpret_cast<int volatile*>(&status->bits);
  detail::ep_block_wait(w, D, bad_from, counts, status);
  if (prior == 0 && threadIdx.x < static_cast<unsigned>(D) && counts[threadIdx.x] != 0)
    detail::report(status, device_error_peer_bad_input, static_cast<long long>(threadIdx.x));
  __syncthreads();
  if (*reinterpret_cast<int volatile*>(&status->bits) != 0) return;
  int const vecs = hidden / 8;
  for (long long idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; idx < D * S * vecs;
       idx += static_cast<long long>(gridDim.x) * blockDim.x) {
    long long const j = idx / vecs;
    int const t = order[j];
    if (t < 0) continue;
    int const v = static_cast<int>(idx % vecs);
    reinterpret_cast<uint4*>(out + t * out_stride)[v] = reinterpret_cast<uint4 const*>(gathered + j * hidden)[v];
    if (tags_out != nullptr && v == 0) tags_out[t] = gathered_tags[j];
  }
}

/// Per token of a batch: the rank holding most of its experts (every owner of a replicated
/// expert counts; ties to the lower rank; ids outside [0, E) count nowhere) — the rank that
/// "served" it, the history of the inter-layer predictor (router/device_layer_affinity.cuh).
/// The same rule as affinity_detail::served_ranks on the host.
static __global__ void served_ranks_kernel(std::int32_t const* __restrict__ ids, long long n, int k, ep_placement_view p,
                                           std::int32_t* __restrict__ ranks) {
  long long const t = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= n) return;
  int votes[ep_max_ranks];
  for (int d = 0; d < p.num_ranks; ++d) votes[d] = 0;
  for (int j = 0; j < k; ++j) {
    int const e = ids[t * k + j];
    if (e < 0 || e >= p.num_experts) continue;
    for (int o = p.owner_offset[e]; o < p.owner_offset[e + 1]; ++o) ++votes[p.owners[o]];
  }
  int best = 0;
  for (int d = 1; d < p.num_ranks; ++d)
    if (votes[d] > votes[best]) best = d;
  ranks[t] = best;
}

/// Gathers the routing rows of the tokens in one shard: ids/weights [count, k] from [T, k].
static __global__ void shuffle_gather_routing_kernel(std::int32_t const* __restrict__ ids, float const* __restrict__ weights,
                                                     int k, std::int32_t const* __restrict__ shard_order, long long count,
                                                     std::int32_t* __restrict__ out_ids, float* __restrict__ out_weights) {
  long long const i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count * k) return;
  long long const t = shard_order[i / k];
  out_ids[i] = ids[t * k + i % k];
  out_weights[i] = weights[t * k + i % k];
}

// ---- host launchers -------------------------------------------------------------------------

inline cudaError_t launch_token_shuffle_plan(std::int32_t const* predicted, float const* confidence, long long T, int D,
                                             long long S, std::int32_t* rank_of, std::int32_t* order, cudaStream_t stream) {
  long long const want = (T + 31) / 32 * 32;
  int const threads = static_cast<int>(want < 128 ? 128 : (want > 1024 ? 1024 : want));
  token_shuffle_plan_kernel<<<1, threads, 0, stream>>>(predicted, confidence, T, D, S, rank_of, order);
  return cudaGetLastError();
}

inline cudaError_t launch_shuffle_push_partials(__nv_bfloat16 const* partial, long long x_stride, int hidden,
                                                std::int32_t const* order, int D, long long S, ep_row_targets const& tg,
                                                ep_signal const& sig, int sms, cudaStream_t stream) {
  shuffle_push_partials_kernel<<<ep_copy_blocks(D * S, sms), 256, 0, stream>>>(partial, x_stride, hidden, order, D, S, tg,
                                                                              sig);
  return cudaGetLastError();
}

inline cudaError_t launch_shuffle_reduce(ep_wait const& w, __nv_bfloat16 const* regions, int D, long long S, long long count,
                                         int hidden, __nv_bfloat16* shard, device_status* status, int sms, cudaStream_t stream) {
  shuffle_reduce_kernel<<<ep_wait_blocks(count * (hidden / 8), sms, w), 256, 0, stream>>>(w, regions, D, S, count, hidden, shard,
                                                                                       status);
  return cudaGetLastError();
}

/// `tags` (or null): one int per shard row, pushed to `tg.ids[d]` with the rows.
inline cudaError_t launch_shuffle_push_outputs(__nv_bfloat16 const* shard, std::int32_t const* tags, long long count, int hidden,
                                               int D, ep_row_targets const& tg, ep_signal const& sig,
                                               device_status const* status, int sms, cudaStream_t stream) {
  shuffle_push_outputs_kernel<<<ep_copy_blocks(count, sms), 256, 0, stream>>>(shard, tags, count, hidden, D, tg, sig, status);
  return cudaGetLastError();
}

/// `tags_out` (or null): [T] the gathered tags (`gathered_tags`, one per slot) in token order.
inline cudaError_t launch_shuffle_unpermute(ep_wait const& w, __nv_bfloat16 const* gathered, std::int32_t const* order, int D,
                                            long long S, int hidden, __nv_bfloat16* out, long long out_stride,
                                            std::int32_t const* gathered_tags, std::int32_t* tags_out,
                                            std::int32_t const* bad_from, device_status* status, int sms,
                                            cudaStream_t stream) {
  shuffle_unpermute_kernel<<<ep_wait_blocks(D * S * (hidden / 8), sms, w), 256, 0, stream>>>(
      w, gathered, order, D, S, hidden, out, out_stride, gathered_tags, tags_out, bad_from, status);
  return cudaGetLastError();
}

inline cudaError_t launch_served_ranks(std::int32_t const* ids, long long n, int k, ep_placement_view const& p,
                                       std::int32_t* ranks, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  served_ranks_kernel<<<static_cast<unsigned>((n + 127) / 128), 128, 0, stream>>>(ids, n, k, p, ranks);
  return cudaGetLastError();
}

inline cudaError_t launch_shuffle_gather_routing(std::int32_t const* ids, float const* weights, int k,
                                                 std::int32_t const* shard_order, long long count, std::int32_t* out_ids,
                                                 float* out_weights, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  long long const blocks = (count * k + 255) / 256;
  shuffle_gather_routing_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(ids, weights, k, shard_order, count,
                                                                                   out_ids, out_weights);
  return cudaGetLastError();
}

}  // namespace specmoe::kernels
