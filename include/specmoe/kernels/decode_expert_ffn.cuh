// specmoe/kernels/decode_expert_ffn.cuh: a decode step's expert FFN (gate/up + SwiGLU, then down)
// in one launch, for the few rows per expert of decode (issue 4).
//
// Why: at one token the two stream GEMMs of grouped_gemm.cuh each pay a launch, a group search and
// a ramp on top of their bytes (Qwen3-30B-A3B on an H100: 50 MB in 23.5 us and 25 MB in 14 us
// against 16.7 and 8.3 us at 3.0 TB/s), and the down GEMM cannot start loading its weights until
// the gate/up GEMM has finished. Here the down tiles load their weight rows into registers first
// and only then wait for their expert's h, so the HBM stream does not stop between the two GEMMs.
//
// Tiles: gate/up tiles (one non-empty group, 16 rows of F) come first, down tiles (one group, 16
// rows of N) after; each block takes the next tile from a ticket counter, so every gate/up tile is
// held by a block that is already running before any down tile waits (no deadlock, whatever the
// residency). A down tile spins until its group's gate/up tiles have all published h, and the last
// down tile of a group puts the group's counters back to zero; the block with the last ticket
// resets the ticket. The counters (`sync`, decode_expert_ffn_sync_words(G) unsigned words) are zero
// before the first launch and after every launch: launches sharing them must be ordered on one
// stream, as a layer's forward passes are.
//
// Same results, bit for bit, as launch_grouped_gate_up_swiglu then launch_grouped_down on the
// stream path (the same per-lane order of fmas, the same reduction). Rows come from x through the
// layout's sorted slots (the gather folded in) or, with slots == nullptr, from dense
// expert-major rows as the grouped GEMMs take them.
#pragma once

#include <specmoe/kernels/grouped_gemm.cuh>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace specmoe::kernels {

/// The largest FFN size the fused decode FFN holds in registers (a down tile's weight rows).
inline constexpr int decode_expert_ffn_max_ffn = 2048;

/// Counter words of launch_decode_expert_ffn for G groups: a ticket and two per group.
constexpr std::size_t decode_expert_ffn_sync_words(int G) noexcept { return 1 + 2 * static_cast<std::size_t>(G > 0 ? G : 0); }

/// The inputs of one fused decode FFN launch (device pointers). Weight matrices are row-major
/// [rows, K] with row stride ld (PyTorch Linear layout): gate and up [F, K], down [N, F].
struct decode_expert_ffn_args {
  __nv_bfloat16 const* x = nullptr;        ///< token rows [*, K] (with slots) or expert-major rows [M_total, K]
  std::int32_t const* slots = nullptr;     ///< a layout's sorted slots (row m is token slots[m] / top_k), or null
  int top_k = 1;                           ///< divides the slots (ignored without them)
  std::int64_t const* offsets = nullptr;   ///< [G + 1], rows of group g: offsets[g] .. offsets[g+1]-1
  int G = 0;                               ///< groups (local experts)
  std::int64_t M_total = 0;                ///< host-known upper bound of offsets[G]
  __nv_bfloat16 const* const* w_gate = nullptr;  ///< [G] device pointers
  __nv_bfloat16 const* const* w_up = nullptr;    ///< [G]
  std::int64_t gate_up_ld = 0;
  __nv_bfloat16 const* const* w_down = nullptr;  ///< [G]
  std::int64_t down_ld = 0;
  int K = 0, F = 0, N = 0;                 ///< hidden in, FFN, hidden out
  __nv_bfloat16* h = nullptr;              ///< [M_total, F] scratch (SwiGLU output)
};

namespace decode_ffn_detail {

using bf16 = __nv_bfloat16;
namespace gg = grouped_gemm_detail;
inline constexpr int threads = gg::threads;
inline constexpr int rows_per_tile = gg::stream_rows_per_block;  // 16: 2 per warp
inline constexpr int k_step = 256;                                // 32 lanes x 8 elements

struct params {
  decode_expert_ffn_args a;
  int max_active;  // upper bound of the non-empty groups (host-known)
  int up_bands, down_bands;
  unsigned* sync;  // [0] ticket, [1, 1 + G) gate/up tiles done per group, [1 + G, 1 + 2G) down tiles past their wait
};

__device__ __forceinline__ unsigned load_acquire(unsigned const* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

/// The warp's two down weight rows, all of K (<= KI * 256) in registers: loaded before the wait.
template <int KI>
__device__ __forceinline__ void load_rows(bf16 const* const (&wrow)[gg::stream_rpw][1], bool const (&nvalid)[gg::stream_rpw], int K,
                                          uint4 (&w)[gg::stream_rpw][KI]) {
  int const lane = threadIdx.x & 31;
#pragma unroll
  for (int i = 0; i < gg::stream_rpw; ++i)
#pragma unroll
    for (int j = 0; j < KI; ++j) {
      int const k = lane * 8 + j * k_step;
      w[i][j] = nvalid[i] && k < K ? gg::load_stream(wrow[i][0] + k) : make_uint4(0, 0, 0, 0);
    }
}

/// out[m0 + r, n_first + i] = h_{m0+r} . w_i for r < rows, i < 2, with the weights already in
/// registers: the fma order of gg::stream_rows<1, R> (k ascending per lane, then the xor reduction).
template <int KI, int R, class OutT>
__device__ __forceinline__ void rows_times_held(uint4 const (&w)[gg::stream_rpw][KI], bool const (&nvalid)[gg::stream_rpw],
                                                bf16 const* __restrict__ h, std::int64_t m0, int rows, int K, int n_first,
                                                OutT* __restrict__ out, std::int64_t ldo) {
  int const lane = threadIdx.x & 31;
  float acc[gg::stream_rpw][R];
#pragma unroll
  for (int i = 0; i < gg::stream_rpw; ++i)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[i][r] = 0.0f;
#pragma unroll
  for (int j = 0; j < KI; ++j) {
    int const k = lane * 8 + j * k_step;
    if (k >= K) continue;  // lanes past K (a lane-dependent test: no break before the shuffles)
    float wf[gg::stream_rpw][8];
#pragma unroll
    for (int i = 0; i < gg::stream_rpw; ++i) gg::unpack8(w[i][j], wf[i]);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float xf[8];
      // h was written by other blocks of this launch: read it from L2 (__ldcg), never a stale L1 line
      std::int64_t const m = m0 + (r < rows ? r : 0);
      gg::unpack8(__ldcg(reinterpret_cast<uint4 const*>(h + m * K + k)), xf);
#pragma unroll
      for (int i = 0; i < gg::stream_rpw; ++i)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[i][r] = fmaf(wf[i][e], xf[e], acc[i][r]);
    }
  }
#pragma unroll
  for (int i = 0; i < gg::stream_rpw; ++i)
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int s = 16; s > 0; s >>= 1) acc[i][r] += __shfl_xor_sync(0xffffffffu, acc[i][r], s);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (lane == r && r < rows) {
#pragma unroll
      for (int i = 0; i < gg::stream_rpw; ++i) {
        if (nvalid[i]) gg::store_one(out + (m0 + r) * ldo + n_first + i, acc[i][r]);
      }
    }
  }
}

/// Blocks per SM the register budget is set for: one-row chunks with up to 4 steps held fit 3
/// (80 registers; a few bytes spill at 3 steps); the rest keep the compiler's choice.
constexpr int min_blocks(int KI, int CH) { return CH == 1 && KI <= 4 ? 3 : 1; }

/// KI: 256-element steps of F a lane holds (F <= KI * 256). CH: rows per chunk (1 for one token,
/// 8 otherwise; any group size is handled either way).
template <int KI, int CH, class OutT>
__global__ void __launch_bounds__(threads, min_blocks(KI, CH)) decode_expert_ffn_kernel(params p, OutT* __restrict__ y) {
  __shared__ unsigned s_ticket;
  auto const& a = p.a;
  int const tid = threadIdx.x;
  int const flag = gg::first_group_flag(a.offsets, a.G);  // in flight beside the ticket
  if (tid == 0) {
    unsigned const t = atomicAdd(p.sync, 1u);
    if (t == gridDim.x - 1) atomicExch(p.sync, 0u);  // every block holds its ticket: ready for the next launch
    s_ticket = t;
  }
  __syncthreads();
  int const ticket = static_cast<int>(s_ticket);
  int const up_tiles = p.max_active * p.up_bands;
  bool const up = ticket < up_tiles;
  int const local = up ? ticket : ticket - up_tiles;
  int const bands = up ? p.up_bands : p.down_bands;
  int const g = gg::nth_nonempty_group<threads>(a.offsets, a.G, local / bands, flag);
  if (g < 0) return;  // fewer non-empty groups than the bound: nothing waits on this tile
  std::int64_t const mb = a.offsets[g], me = a.offsets[g + 1];
  int const n_first = (local % bands) * rows_per_tile + (tid >> 5) * gg::stream_rpw;
  unsigned* const up_done = p.sync + 1 + g;
  unsigned* const down_past = p.sync + 1 + a.G + g;

  if (up) {
    if (n_first < a.F) {
      bf16 const* wrow[gg::stream_rpw][2];
      bool nvalid[gg::stream_rpw];
      gg::warp_weight_rows<2>(a.w_gate, a.w_up, g, a.gate_up_ld, n_first, a.F, wrow, nvalid);
      gg::stream_group<2, CH>(a.x, a.slots, a.top_k, mb, me, wrow, nvalid, n_first, a.K, a.h, static_cast<std::int64_t>(a.F));
    }
    __syncthreads();  // the block's h rows written ...
    if (tid == 0) {
      __threadfence();  // ... and visible device-wide before they are counted
      atomicAdd(up_done, 1u);
    }
    return;
  }

  bf16 const* wrow[gg::stream_rpw][1];
  bool nvalid[gg::stream_rpw];
  uint4 w[gg::stream_rpw][KI];
  bool const rows_here = n_first < a.N;
  if (rows_here) {
    gg::warp_weight_rows<1>(a.w_down, a.w_down, g, a.down_ld, n_first, a.N, wrow, nvalid);
    load_rows<KI>(wrow, nvalid, a.F, w);  // in flight while the group's h is still being written
  }
  if (tid == 0) {
    while (load_acquire(up_done) < static_cast<unsigned>(p.up_bands)) __nanosleep(64);
    // the group's last down tile past its wait: nobody reads these counters again in this launch
    if (atomicAdd(down_past, 1u) == static_cast<unsigned>(p.down_bands) - 1) {
      atomicExch(up_done, 0u);  // (atomics: other blocks' acquire loads of up_done are not ordered before plain stores)
      atomicExch(down_past, 0u);
    }
  }
  __syncthreads();
  if (!rows_here) return;
  for (std::int64_t m0 = mb; m0 < me; m0 += CH) {
    int const rows = static_cast<int>(me - m0 < CH ? me - m0 : CH);
    if (CH == 1 || rows == 1) {
      rows_times_held<KI, 1>(w, nvalid, a.h, m0, rows, a.F, n_first, y, a.N);
    } else if constexpr (CH == 8) {
      if (rows == 2) {
        rows_times_held<KI, 2>(w, nvalid, a.h, m0, rows, a.F, n_first, y, a.N);
      } else if (rows <= 4) {
        rows_times_held<KI, 4>(w, nvalid, a.h, m0, rows, a.F, n_first, y, a.N);
      } else {
        rows_times_held<KI, 8>(w, nvalid, a.h, m0, rows, a.F, n_first, y, a.N);
      }
    }
  }
}

template <int KI, class OutT>
cudaError_t launch_ki(params const& p, bool one_row_chunks, unsigned blocks, OutT* y, cudaStream_t stream) {
  if (one_row_chunks) {
    decode_expert_ffn_kernel<KI, 1, OutT><<<blocks, threads, 0, stream>>>(p, y);
  } else {
    decode_expert_ffn_kernel<KI, 8, OutT><<<blocks, threads, 0, stream>>>(p, y);
  }
  return cudaGetLastError();
}

}  // namespace decode_ffn_detail

/// Whether launch_decode_expert_ffn takes these arguments: K, F, N and the row strides multiples of
/// 8, F <= decode_expert_ffn_max_ffn, 16-byte aligned x and h, all tables set, 1 <= G <= 16384.
inline bool decode_expert_ffn_supported(decode_expert_ffn_args const& a) noexcept {
  auto const aligned = [](void const* q) { return (reinterpret_cast<std::uintptr_t>(q) & 15u) == 0; };
  return a.G >= 1 && a.G <= 16384 && a.M_total >= 0 && a.K >= 8 && a.F >= 8 && a.N >= 8 && a.K % 8 == 0 && a.F % 8 == 0 &&
         a.N % 8 == 0 && a.F <= decode_expert_ffn_max_ffn && a.gate_up_ld >= a.K && a.gate_up_ld % 8 == 0 && a.down_ld >= a.F &&
         a.down_ld % 8 == 0 && a.x && a.offsets && a.w_gate && a.w_up && a.w_down && a.h && aligned(a.x) && aligned(a.h) &&
         (!a.slots || a.top_k >= 1);
}

/// h = SwiGLU(x W_gate^T, x W_up^T) per group, then y[m, n] = h_m . W_down[n] (bf16 or fp32 y
/// [M_total, N]), in one launch: the results of launch_grouped_gate_up_swiglu + launch_grouped_down
/// on their stream path, bit for bit. `sync`: decode_expert_ffn_sync_words(G) unsigned words, zero
/// before the first launch (every launch leaves them zero), private to one stream: two launches
/// in flight on one `sync` would hand out each other's tiles. `one_row_chunks`: stream each row of
/// a group on its own (best where groups hold one row, as at one token); otherwise chunks of 8.
/// cudaErrorInvalidValue, nothing launched, unless decode_expert_ffn_supported and y, sync are set.
template <class OutT>
cudaError_t launch_decode_expert_ffn(decode_expert_ffn_args const& a, OutT* y, unsigned* sync, cudaStream_t stream,
                                     bool one_row_chunks = true) {
  static_assert(std::is_same_v<OutT, __nv_bfloat16> || std::is_same_v<OutT, float>, "y is bf16 or fp32");
  auto const word_aligned = [](void const* q) { return (reinterpret_cast<std::uintptr_t>(q) & 3u) == 0; };
  if (!decode_expert_ffn_supported(a) || !y || !sync || !word_aligned(sync) || !word_aligned(y)) return cudaErrorInvalidValue;
  if (a.M_total == 0) return cudaSuccess;
  namespace dd = decode_ffn_detail;
  constexpr int tile = dd::rows_per_tile, step = dd::k_step;
  dd::params const p{a, static_cast<int>(a.M_total < a.G ? a.M_total : a.G), (a.F + tile - 1) / tile, (a.N + tile - 1) / tile, sync};
  long long const blocks = static_cast<long long>(p.max_active) * (p.up_bands + p.down_bands);
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
  auto const b = static_cast<unsigned>(blocks);
  if (a.F <= 2 * step) return dd::launch_ki<2>(p, one_row_chunks, b, y, stream);
  if (a.F <= 3 * step) return dd::launch_ki<3>(p, one_row_chunks, b, y, stream);  // Qwen3-30B-A3B's 768
  if (a.F <= 4 * step) return dd::launch_ki<4>(p, one_row_chunks, b, y, stream);
  return dd::launch_ki<8>(p, one_row_chunks, b, y, stream);
}

}  // namespace specmoe::kernels
