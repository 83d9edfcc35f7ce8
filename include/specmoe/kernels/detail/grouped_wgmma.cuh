// specmoe/kernels/detail/grouped_wgmma.cuh: the wgmma path of the grouped expert GEMMs (sm_90a),
// included by kernels/grouped_gemm.cuh.
//
// One persistent block per SM walks the (row tile, column tile) list of all groups, taking tiles
// in order from a global counter (tiles that share operands then run at the same time: with a
// fixed stride per block the blocks drifted apart over many tiles and a DeepSeek-V3 shape read
// 2.4x its bytes from HBM). Warp-specialised:
// warpgroup 0 issues TMA loads (one thread; all 128 when gathering A's rows), warpgroups 1 and 2 each own 64 rows of a 128 x 256
// tile and run wgmma.m64n256k16 (fp32 accumulators in registers) on 128B-swizzled shared memory;
// on a tile of at most 64 rows (a group's padded last tile) the second one sits out.
// 4 stages of (A 128x64, B 256x64) bf16 = 192 KiB, a full and an empty mbarrier per stage; the
// producer runs ahead into the next tile while the consumers store the last one.
// Staged epilogue (bf16 out, N % 8 == 0): 3 stages, and the consumers write their tile to shared
// memory, then hand each row to a bulk copy (cp.async.bulk, one per row: a tile may end mid-way
// through a group) and go on to the next tile's wgmmas while the copies drain.
//
// Tried and dropped: an L2 prefetch stream (cp.async.bulk.prefetch.tensor, 8 k tiles ahead, plus
// prefetch.tensormap of the next tile) made every shape 2-3x slower on an H100.
//
// Gathered gate/up (GATHER): A's rows are token rows of x chosen through a layout's sorted slots
// (row m is x[slots[m] / top_k]), so no expert-major copy of x is written first; the whole
// producer warpgroup loads them, each thread one row a k tile (a one-row TMA box: the 128B swizzle
// follows the shared-memory address, so a row lands where the 128-row box would have put it).
//
// A (activations, [M_total, K]) comes through one tensor map encoded at launch; the weights through
// one tensor map per group and matrix, encoded once on the host (grouped_weight_maps). Rows past
// M_total, columns past N and k past K are zero-filled by TMA; rows of the next group inside a tile
// are computed but never stored.
#pragma once

#include <cuda.h>          // CUtensorMap and its enums (types only: the encoder comes through the runtime)
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled_v12000
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cub/block/block_scan.cuh>

#include <specmoe/kernels/detail/kernel_attributes.cuh>
#include <specmoe/kernels/detail/lane_math.cuh>
#include <specmoe/kernels/detail/sm90_async.cuh>

#include <cstddef>
#include <cstdint>
#include <type_traits>

// wgmma and setmaxnreg exist only in sm_90a code; other targets get an empty kernel that the
// host side recognises (launch_wgmma refuses it) and never launches.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SPECMOE_GROUPED_WGMMA_DEVICE 1
#else
#define SPECMOE_GROUPED_WGMMA_DEVICE 0
#endif

namespace specmoe::kernels::wgmma_detail {

using bf16 = __nv_bfloat16;

inline constexpr int bm = 128, bn = 256, bk = 64, band = 8;
inline constexpr int threads = 384;                       // producer warpgroup + 2 consumer warpgroups
inline constexpr int box_rows = 128;                      // one TMA box: 64 k x 128 rows = 16 KiB
inline constexpr int box_bytes = box_rows * bk * 2;
inline constexpr int a_bytes = bm * bk * 2;               // 16 KiB
inline constexpr int stage_bytes = a_bytes + bn * bk * 2;  // 48 KiB
/// Set in a stage's tile slot (bit 40: the walk has fewer than 2^31 tiles) when the tile has at
/// most 64 rows, so the second consumer warpgroup owns none of them.
inline constexpr long long half_tile_mark = 1LL << 40;
inline constexpr int min_real_regs = 64;                  // the real kernel needs ~168; the stub a few

/// Stages of the ring: the staged epilogue gives one up for its tile buffer.
template <bool STAGED>
inline constexpr int stages = STAGED ? 3 : 4;
/// Staged epilogue: bytes of one staged row (the tile's bf16 outputs, + 16 so the 8 rows one
/// store instruction writes fall in distinct banks), and of the whole buffer.
template <bool SWIGLU>
inline constexpr int staged_pitch = (SWIGLU ? bn / 2 : bn) * 2 + 16;
template <bool SWIGLU, bool STAGED>
inline constexpr int staged_bytes = STAGED ? bm * staged_pitch<SWIGLU> : 0;
/// When the staged epilogue is chosen (use_staged): rows a group on average, and for gate_up tiles
/// a multiprocessor.
inline constexpr std::int64_t staged_min_rows_per_group = 128;
inline constexpr std::int64_t staged_min_swiglu_tiles_per_sm = 40;

/// Bands of row tiles (see locate) for at most m_tiles row tiles: one starts in every `band` tiles.
constexpr std::int64_t max_bands(std::int64_t m_tiles) { return (m_tiles + band - 1) / band; }

/// Dynamic shared memory: 1 KiB alignment slack, the stages, the staged tile (if any), 2 mbarriers
/// and a tile slot a stage, offsets[G + 1] (a copy: every tile looks its group's rows up),
/// pre[G + 1], band_start[bands + 1].
template <bool SWIGLU, bool STAGED>
constexpr std::size_t smem_bytes(int G, std::int64_t bands) {
  constexpr std::size_t S = stages<STAGED>;
  return 1024 + S * stage_bytes + staged_bytes<SWIGLU, STAGED> + 24 * S + 8 * (static_cast<std::size_t>(G) + 1) +
         4 * (static_cast<std::size_t>(G) + 1) + 4 * (static_cast<std::size_t>(bands) + 1);
}

#if SPECMOE_GROUPED_WGMMA_DEVICE
using kernels::detail::mbar_arrive;
using kernels::detail::mbar_expect_tx;
using kernels::detail::mbar_init;
using kernels::detail::mbar_wait;
using kernels::detail::smem_u32;

/// TMA: box (c0 = k, c1 = row) of `map` into shared memory at dst, completing on bar.
__device__ __forceinline__ void tma_load(std::uint32_t dst, CUtensorMap const* map, std::uint32_t bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<std::uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1)
      : "memory");
}

/// Bulk copy of `bytes` (a multiple of 16) from shared to global memory, in this thread's bulk group.
__device__ __forceinline__ void bulk_store(void* dst, std::uint32_t src, std::uint32_t bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\n" ::"l"(dst), "r"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
/// This thread's bulk copies have read their shared memory (it may be rewritten).
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory"); }
/// This thread's bulk copies are complete.
__device__ __forceinline__ void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }
/// Makes this thread's shared-memory writes visible to the bulk copies (the async proxy).
__device__ __forceinline__ void fence_to_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
/// Barrier of one warpgroup (id 1 or 2: 0 is __syncthreads).
__device__ __forceinline__ void warpgroup_sync(int id) { asm volatile("bar.sync %0, 128;\n" ::"r"(id) : "memory"); }

/// Shared-memory matrix descriptor: K-major, 128B swizzle, 8-row groups 1024 bytes apart (LBO unused).
__device__ __forceinline__ std::uint64_t smem_desc(std::uint32_t addr) {
  return static_cast<std::uint64_t>((addr & 0x3FFFFu) >> 4) | (std::uint64_t{1} << 16) | (std::uint64_t{1024 >> 4} << 32) |
         (std::uint64_t{1} << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

/// d[64 x 256] (+)= A[64 x 16] . B[256 x 16]^T, both K-major in shared memory; scale_d = 0 overwrites d.
__device__ __forceinline__ void wgmma_m64n256k16(float (&d)[128], std::uint64_t da, std::uint64_t db, int scale_d) {
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
        "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
        "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
        "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
        "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
        "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
        "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
        "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(da), "l"(db), "r"(scale_d));
}

/// Pins the accumulators: the compiler may not move their reads across this point.
__device__ __forceinline__ void fence_acc(float (&d)[128]) {
#pragma unroll
  for (int i = 0; i < 128; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

using kernels::detail::silu_mul;
using kernels::detail::store_pair;

struct tile {
  std::int64_t m0;  // first row
  int g, mrows, n0;
};

/// The ring's next stage; the phase flips at each wrap.
template <int STAGES>
__device__ __forceinline__ void next_stage(int& stage, std::uint32_t& phase) {
  if (++stage == STAGES) {
    stage = 0;
    phase ^= 1u;
  }
}

/// A tile's number as its first k tile's stage publishes it, marked when the tile has at most 64
/// rows (the second consumer warpgroup then sits out).
__device__ __forceinline__ long long slot_value(long long lin, int mrows) { return mrows <= 64 ? lin | half_tile_mark : lin; }

/// Group of row tile mt: pre[g] <= mt < pre[g + 1] (pre[G] = all row tiles).
__device__ __forceinline__ int group_of(int mt, int const* pre, int G) {
  int lo = 0, hi = G;
  while (hi - lo > 1) {
    int const mid = (lo + hi) >> 1;
    if (pre[mid] <= mt) lo = mid; else hi = mid;
  }
  return lo;
}

/// Bands: every group's row tiles are cut into chunks of at most `band`, and band b holds the
/// chunks that start in row tiles [band * b, band * (b + 1)), so a band never splits a chunk and a
/// group's weight tile is read from HBM once per chunk (about once). start[b] = first row tile of
/// band b; every band holds at least one chunk (a chunk is at most `band` long).
__device__ __forceinline__ int band_start(int b, int const* pre, int G, int total_tiles) {
  for (int mt = b * band; mt < total_tiles && mt < (b + 1) * band; ++mt) {
    int const g = group_of(mt, pre, G);
    if ((mt - pre[g]) % band == 0) return mt;
  }
  return total_tiles;
}

/// Tile `lin` of the walk: band by band, and inside a band the row tiles fastest, so the row tiles
/// sharing a weight tile are taken one after another (and A's band is reused across the columns).
/// Tiles before band b: start[b] * n_tiles.
__device__ __forceinline__ tile locate(long long lin, int const* pre, int G, int const* start, int bands, int n_tiles,
                                       int out_per_tile, std::int64_t const* __restrict__ offsets) {
  int const row_tile_pos = static_cast<int>(lin / n_tiles);  // a row tile inside lin's band (bands are row-tile ranges)
  int lo = 0, hi = bands;                                    // start[lo] <= row_tile_pos < start[hi]
  while (hi - lo > 1) {
    int const mid = (lo + hi) >> 1;
    if (start[mid] <= row_tile_pos) lo = mid; else hi = mid;
  }
  int const first = start[lo];
  int const h = start[lo + 1] - first;
  long long const r = lin - static_cast<long long>(first) * n_tiles;
  int const mt = first + static_cast<int>(r % h);
  int const g = group_of(mt, pre, G);
  tile t;
  t.g = g;
  t.m0 = offsets[g] + static_cast<std::int64_t>(mt - pre[g]) * bm;
  std::int64_t const left = offsets[g + 1] - t.m0;
  t.mrows = static_cast<int>(left < bm ? left : bm);
  t.n0 = static_cast<int>(r / h) * out_per_tile;
  return t;
}
#endif  // SPECMOE_GROUPED_WGMMA_DEVICE

/// SWIGLU: B rows 0..127 are gate rows n0.., rows 128..255 the up rows of the same outputs, so each
/// thread holds g (column block j) and u (block j + 16) of one output; otherwise 256 rows of one
/// matrix. w0_maps / w1_maps: G device-resident tensor maps each (w1 unused without SWIGLU).
/// GATHER (gate/up only): a_map is x's map with one-row boxes, and row m of A is x[slots[m] / top_k].
template <bool SWIGLU, class OutT, bool STAGED, bool GATHER = false>
__global__ void __launch_bounds__(threads, 1)
    grouped_wgmma_kernel(__grid_constant__ CUtensorMap const a_map, CUtensorMap const* __restrict__ w0_maps,
                         CUtensorMap const* __restrict__ w1_maps, std::int64_t const* __restrict__ offsets, int G, int K, int N,
                         OutT* __restrict__ out, unsigned* __restrict__ sched, int bands_cap,
                         std::int32_t const* __restrict__ slots = nullptr, int top_k = 1) {
  static_assert(!GATHER || SWIGLU, "only gate/up folds the gather");
#if SPECMOE_GROUPED_WGMMA_DEVICE
  extern __shared__ unsigned char smem_raw[];
  using scan_t = cub::BlockScan<int, threads>;
  __shared__ typename scan_t::TempStorage scan_storage;
  std::uint32_t const raw = smem_u32(smem_raw);
  std::uint32_t const base = (raw + 1023u) & ~1023u;  // 128B-swizzle atoms: 1 KiB aligned
  unsigned char* const smem = smem_raw + (base - raw);
  static_assert(!STAGED || sizeof(OutT) == 2, "the staged epilogue holds bf16 rows");
  constexpr int stages = wgmma_detail::stages<STAGED>;
  constexpr int pitch = staged_pitch<SWIGLU>;
  std::uint32_t const staged = base + stages * stage_bytes;  // STAGED: rows of 64 per consumer warpgroup
  std::uint32_t const full0 = staged + staged_bytes<SWIGLU, STAGED>;  // full[s] = full0 + 8 s
  std::uint32_t const empty0 = full0 + 8 * stages;
  unsigned char* const after_bars = smem + (full0 - base) + 16 * stages;
  long long* const slot = reinterpret_cast<long long*>(after_bars);  // tile of stage s's k tile 0
  std::int64_t* const soff = reinterpret_cast<std::int64_t*>(after_bars + 8 * stages);  // offsets, 8-byte aligned
  int* const pre = reinterpret_cast<int*>(soff + G + 1);
  int* const start = pre + G + 1;
  int const tid = static_cast<int>(threadIdx.x);

  // 1. row tiles per group, prefix-summed, then the bands (once per block)
  int carry = 0;
  for (int b = 0; b < G; b += threads) {
    int const g = b + tid;
    int tiles = 0;
    if (g < G) {
      std::int64_t const lo = offsets[g], hi = offsets[g + 1];
      soff[g] = lo;
      if (g == G - 1) soff[G] = hi;
      tiles = static_cast<int>((hi - lo + bm - 1) / bm);
    }
    int incl = 0, total = 0;
    scan_t(scan_storage).InclusiveSum(tiles, incl, total);
    if (g < G) pre[g + 1] = carry + incl;
    carry += total;
    __syncthreads();
  }
  if (tid == 0) {
    pre[0] = 0;
    for (int s = 0; s < stages; ++s) {
      mbar_init(full0 + 8 * s, 1);   // the producer's arrive (with the tile's bytes, or the end mark)
      mbar_init(empty0 + 8 * s, 8);  // one arrive per consumer warp
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  }
  __syncthreads();
  int const total_tiles = carry;
  int const bands = min((total_tiles + band - 1) / band, bands_cap);  // the cap only guards against offsets past M_total
  for (int b = tid; b <= bands; b += threads) start[b] = b == bands ? total_tiles : band_start(b, pre, G, total_tiles);
  __syncthreads();

  constexpr int out_per_tile = SWIGLU ? bn / 2 : bn;
  int const n_tiles = (N + out_per_tile - 1) / out_per_tile;
  long long const work = static_cast<long long>(start[bands]) * n_tiles;
  int const k_tiles = (K + bk - 1) / bk;
  int const wg = tid / 128;

  if (wg == 0) {
    // 2. producer: one thread takes tiles from the counter in order and keeps the ring of stages full
    //    (gathered: the warpgroup's 128 threads, one A row each)
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if constexpr (GATHER) {
      // every producer thread loads one A row a k tile; thread 0 takes the tiles, publishes each
      // tile's first row (double-buffered: a thread reads it before the next barrier), loads B
      __shared__ long long tile_row0[2];
      int stage = 0, buf = 0;
      std::uint32_t phase = 0;
      std::int64_t const rows_total = soff[G];
      long long lin = tid == 0 ? static_cast<long long>(atomicAdd(sched, 1u)) : 0;
      while (true) {
        tile t{};
        long long next = 0;
        if (tid == 0) {
          if (lin < work) {
            next = atomicAdd(sched, 1u);
            t = locate(lin, pre, G, start, bands, n_tiles, out_per_tile, soff);
          }
          tile_row0[buf] = lin < work ? t.m0 : -1;
        }
        asm volatile("bar.sync 3, 128;\n" ::: "memory");
        long long const m0 = tile_row0[buf];
        buf ^= 1;
        if (m0 < 0) {
          if (tid == 0) {  // the end mark
            mbar_wait(empty0 + 8 * stage, phase ^ 1u);
            slot[stage] = -1;
            mbar_arrive(full0 + 8 * stage);
          }
          break;
        }
        std::int64_t const m = m0 + tid;  // this thread's row of the tile (rows past the end: any token, never stored)
        int const token = m < rows_total ? slots[m] / top_k : 0;
        CUtensorMap const* const m0map = w0_maps + t.g;
        CUtensorMap const* const m1map = w1_maps + t.g;
        for (int kt = 0; kt < k_tiles; ++kt) {
          mbar_wait(empty0 + 8 * stage, phase ^ 1u);
          std::uint32_t const fb = full0 + 8 * stage;
          std::uint32_t const s = base + stage * stage_bytes;
          if (tid == 0) {
            if (kt == 0) slot[stage] = slot_value(lin, t.mrows);
            mbar_expect_tx(fb, stage_bytes);  // (other threads' rows may land first: tx-count may dip below zero)
            tma_load(s + a_bytes, m0map, fb, kt * bk, t.n0);
            tma_load(s + a_bytes + box_bytes, m1map, fb, kt * bk, t.n0);
          }
          tma_load(s + static_cast<std::uint32_t>(tid) * (bk * 2), &a_map, fb, kt * bk, token);
          next_stage<stages>(stage, phase);
        }
        if (tid == 0) lin = next;
      }
    } else if (tid == 0) {
      int stage = 0;
      std::uint32_t phase = 0;
      long long lin = atomicAdd(sched, 1u);
      while (true) {
        if (lin >= work) {  // the end mark: consumers stop at it
          mbar_wait(empty0 + 8 * stage, phase ^ 1u);
          slot[stage] = -1;
          mbar_arrive(full0 + 8 * stage);
          break;
        }
        long long const next = atomicAdd(sched, 1u);  // asked early: its latency hides behind this tile's loads
        tile const t = locate(lin, pre, G, start, bands, n_tiles, out_per_tile, soff);
        CUtensorMap const* const m0 = w0_maps + t.g;
        CUtensorMap const* const m1 = SWIGLU ? w1_maps + t.g : m0;
        int const row1 = SWIGLU ? t.n0 : t.n0 + box_rows;
        bool const load1 = row1 < N;  // down: the second half of B may lie wholly past N (never stored)
        std::uint32_t const bytes = load1 ? stage_bytes : stage_bytes - box_bytes;
        for (int kt = 0; kt < k_tiles; ++kt) {
          mbar_wait(empty0 + 8 * stage, phase ^ 1u);
          std::uint32_t const fb = full0 + 8 * stage;
          std::uint32_t const s = base + stage * stage_bytes;
          // published by the arrive below; a tile of at most 64 rows (a group's last) is marked so
          // that the second warpgroup, which owns none of them, leaves the tensor cores to the first
          if (kt == 0) slot[stage] = slot_value(lin, t.mrows);
          mbar_expect_tx(fb, bytes);
          tma_load(s, &a_map, fb, kt * bk, static_cast<int>(t.m0));
          tma_load(s + a_bytes, m0, fb, kt * bk, t.n0);
          if (load1) tma_load(s + a_bytes + box_bytes, m1, fb, kt * bk, row1);
          next_stage<stages>(stage, phase);
        }
        lin = next;
      }
    }
    if (tid == 0) {
      // every block asks once past the end; the last to do so resets the counter for the next launch
      __threadfence();
      if (atomicAdd(sched + 1, 1u) == gridDim.x - 1) {
        atomicExch(sched, 0u);
        atomicExch(sched + 1, 0u);
      }
    }
  } else {
    // 3. consumers: warpgroup wg owns tile rows (wg - 1) * 64 .. + 63
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
    int const warp = (tid >> 5) & 3, lane = tid & 31;
    std::uint32_t const a_off = static_cast<std::uint32_t>(wg - 1) * 64 * 128;
    float acc[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) acc[i] = 0.0f;
    int stage = 0;
    std::uint32_t phase = 0;
    while (true) {
      mbar_wait(full0 + 8 * stage, phase);  // k tile 0 of the next tile, or the end mark
      long long const marked = slot[stage];
      if (marked < 0) break;
      if (wg == 2 && (marked & half_tile_mark) != 0) {
        // none of this tile's rows is ours: free each stage as it arrives (the first warpgroup's
        // wgmmas then run alone, at up to twice the rate: a padded last tile costs half a tile)
        for (int kt = 0; kt < k_tiles; ++kt) {
          if (kt > 0) mbar_wait(full0 + 8 * stage, phase);
          if (lane == 0) mbar_arrive(empty0 + 8 * stage);
          next_stage<stages>(stage, phase);
        }
        continue;
      }
      long long const lin = marked & ~half_tile_mark;
      tile t{};  // found while the first k tile's wgmmas run: only the epilogue needs it
      int prev = 0;
      for (int kt = 0; kt < k_tiles; ++kt) {
        if (kt > 0) mbar_wait(full0 + 8 * stage, phase);
        std::uint32_t const s = base + stage * stage_bytes;
        std::uint64_t const da = smem_desc(s + a_off);
        std::uint64_t const db = smem_desc(s + a_bytes);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < bk / 16; ++kk) {
          // +32 bytes along the swizzled row per k16 step: +2 in the descriptor's address field
          wgmma_m64n256k16(acc, da + 2 * kk, db + 2 * kk, (kt > 0 || kk > 0) ? 1 : 0);
        }
        wgmma_commit();
        if (kt == 0) t = locate(lin, pre, G, start, bands, n_tiles, out_per_tile, soff);
        wgmma_wait<1>();  // k tile kt - 1 is done: its stage may be refilled
        if (kt > 0 && lane == 0) mbar_arrive(empty0 + 8 * prev);
        prev = stage;
        next_stage<stages>(stage, phase);
      }
      wgmma_wait<0>();
      fence_acc(acc);
      if (lane == 0) mbar_arrive(empty0 + 8 * prev);

      // 4. epilogue: d[4j + e] is row r (e < 2) or r + 8, column 8j + 2 (lane % 4) + e % 2
      if constexpr (STAGED) {
        // the last tile's copies out of this warpgroup's rows have read them; then write, fence, copy
        std::uint32_t const rows = staged + static_cast<std::uint32_t>((wg - 1) * 64 * pitch);
        if (lane < 16) bulk_wait_read();
        warpgroup_sync(wg);
        unsigned char* const rows_p = smem + (rows - base);
        int const c = 2 * (lane & 3);
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          unsigned char* const srow = rows_p + (warp * 16 + (lane >> 2) + half * 8) * pitch;
#pragma unroll
          for (int j = 0; j < (SWIGLU ? 16 : 32); ++j) {
            int const i = 4 * j + 2 * half;
            float const v0 = SWIGLU ? silu_mul(acc[i], acc[i + 64]) : acc[i];
            float const v1 = SWIGLU ? silu_mul(acc[i + 1], acc[i + 65]) : acc[i + 1];
            *reinterpret_cast<__nv_bfloat162*>(srow + 2 * (8 * j + c)) = __floats2bfloat162_rn(v0, v1);
          }
        }
        fence_to_async();
        warpgroup_sync(wg);
        if (lane < 16) {  // warp w copies its 16 rows, one each
          int const local = warp * 16 + lane;
          int const row = (wg - 1) * 64 + local;
          if (row < t.mrows) {
            int const cols = min(SWIGLU ? bn / 2 : bn, N - t.n0);
            bulk_store(out + (t.m0 + row) * static_cast<std::int64_t>(N) + t.n0, rows + static_cast<std::uint32_t>(local * pitch),
                       static_cast<std::uint32_t>(cols) * 2u);
          }
          bulk_commit();
        }
      } else {
        int const c = 2 * (lane & 3);
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          int const row = (wg - 1) * 64 + warp * 16 + (lane >> 2) + half * 8;
          if (row >= t.mrows) continue;
          OutT* const orow = out + (t.m0 + row) * static_cast<std::int64_t>(N);
          if constexpr (SWIGLU) {
#pragma unroll
            for (int j = 0; j < 16; ++j) {
              int const col = t.n0 + 8 * j + c;
              if (col < N) {
                store_pair(orow + col, silu_mul(acc[4 * j + 2 * half], acc[4 * (j + 16) + 2 * half]),
                       silu_mul(acc[4 * j + 2 * half + 1], acc[4 * (j + 16) + 2 * half + 1]));
              }
            }
          } else {
#pragma unroll
            for (int j = 0; j < 32; ++j) {
              int const col = t.n0 + 8 * j + c;
              if (col < N) store_pair(orow + col, acc[4 * j + 2 * half], acc[4 * j + 2 * half + 1]);
            }
          }
        }
      }
    }
    if (STAGED && (tid & 31) < 16) bulk_wait_all();  // shared memory stays until the copies are done
  }
#else
  (void)a_map, (void)w0_maps, (void)w1_maps, (void)offsets, (void)G, (void)K, (void)N, (void)out, (void)sched, (void)bands_cap;
  (void)slots, (void)top_k;
#endif
}

// ------------------------------------------------------------------------------------------
// host side
// ------------------------------------------------------------------------------------------

/// cuTensorMapEncodeTiled through the runtime's entry-point query (no link against libcuda).
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 const fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      p = nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }();
  return fn;
}

/// The map of a row-major bf16 [rows, K] matrix with row stride ld elements: boxes of 64 k x
/// `box_h` rows (128, or 1 for gathered rows), 128B swizzle, zero fill outside. Needs 16-byte
/// aligned base, ld % 8 == 0.
inline cudaError_t encode_rows(CUtensorMap& map, void const* base, std::uint64_t rows, std::uint64_t K, std::uint64_t ld,
                               std::uint32_t box_h = box_rows) {
  auto const encode = tensor_map_encoder();
  if (!encode) return cudaErrorNotSupported;
  if (rows == 0 || rows > (std::uint64_t{1} << 31) || K == 0 || ld < K || ld % 8 != 0 || (reinterpret_cast<std::uintptr_t>(base) & 15u) != 0) {
    return cudaErrorInvalidValue;
  }
  cuuint64_t dims[2] = {K, rows};
  cuuint64_t strides[1] = {ld * 2};
  cuuint32_t box[2] = {bk, box_h};
  cuuint32_t elem[2] = {1, 1};
  CUresult const r = encode(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(base), dims, strides, box, elem,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

using kernels::detail::hopper_sms;

/// Once per kernel instance: whether this binary holds its sm_90a body, and the largest dynamic
/// shared memory it may use (the opt-in limit less its static part).
struct kernel_info {
  cudaError_t err;
  bool real;
  std::size_t max_dynamic;
};

template <bool SWIGLU, class OutT, bool STAGED, bool GATHER = false>
kernel_info const& info() {
  static kernel_info const k = [] {
    auto const kernel = grouped_wgmma_kernel<SWIGLU, OutT, STAGED, GATHER>;
    kernel_info r{cudaSuccess, false, 0};
    cudaFuncAttributes a{};
    int dev = 0, optin = 0;
    r.err = cudaFuncGetAttributes(&a, kernel);
    if (r.err == cudaSuccess) r.err = cudaGetDevice(&dev);
    if (r.err == cudaSuccess) r.err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    if (r.err != cudaSuccess) return r;
    r.real = a.numRegs >= min_real_regs;
    r.max_dynamic = static_cast<std::size_t>(optin) > a.sharedSizeBytes ? static_cast<std::size_t>(optin) - a.sharedSizeBytes : 0;
    return r;  // (the shared-memory attribute is per device: set at launch)
  }();
  return k;
}

/// At least sum_g ceil(n_g / bm) for any G counts summing to M_total.
inline std::int64_t row_tiles_bound(int G, std::int64_t M_total) {
  std::int64_t const m_tiles = (M_total + static_cast<std::int64_t>(G) * (bm - 1)) / bm;
  return m_tiles < M_total ? m_tiles : M_total;
}

template <bool SWIGLU, class OutT, bool STAGED, bool GATHER = false>
bool fits(int G, std::int64_t M_total) {
  kernel_info const& k = info<SWIGLU, OutT, STAGED, GATHER>();
  return k.err == cudaSuccess && k.real && smem_bytes<SWIGLU, STAGED>(G, max_bands(row_tiles_bound(G, M_total))) <= k.max_dynamic;
}

/// True when launch() below can run this problem on the current device (else the caller falls back).
template <bool SWIGLU, class OutT>
bool can_launch(int G, std::int64_t M_total) {
  if (hopper_sms() <= 0 || M_total > 0x7fffffffLL || !tensor_map_encoder()) return false;
  return fits<SWIGLU, OutT, false>(G, M_total);
}

/// The same for gate/up with the gather folded in (bf16 out).
inline bool can_launch_gathered(int G, std::int64_t M_total) {
  return can_launch<true, bf16>(G, M_total) && fits<true, bf16, false, true>(G, M_total);
}

/// The staged epilogue when it applies (bf16 out, rows of whole 16-byte units) and pays. It gives
/// up a stage of the ring, which shapes with few rows a group (bound by streaming weights) lose more
/// from than they gain; measured on an H100 (docs/benchmarks.md, issue 4), the down GEMM gained from
/// 128 rows a group on average, gate_up (half as wide an epilogue, a longer k loop) only on grids of
/// many tiles a multiprocessor.
template <bool SWIGLU, class OutT>
bool use_staged(int G, std::int64_t M_total, int N, OutT const* out) {
  if (N % 8 != 0 || (reinterpret_cast<std::uintptr_t>(out) & 15u) != 0 || !fits<SWIGLU, OutT, true>(G, M_total)) return false;
  if (M_total < staged_min_rows_per_group * static_cast<std::int64_t>(G)) return false;
  if constexpr (SWIGLU) {
    std::int64_t const n_tiles = (N + bn / 2 - 1) / (bn / 2);
    return row_tiles_bound(G, M_total) * n_tiles >= staged_min_swiglu_tiles_per_sm * static_cast<std::int64_t>(hopper_sms());
  }
  return true;
}

/// A operand rows gathered through a layout's sorted slots (gate/up only): row m is a[slots[m] / top_k].
struct a_gather {
  std::int32_t const* slots = nullptr;
  int top_k = 1;
};

template <bool SWIGLU, class OutT, bool STAGED, bool GATHER>
cudaError_t launch_kernel(CUtensorMap const& a_map, std::int64_t const* offsets, int G, std::int64_t m_tiles, CUtensorMap const* w0_maps,
                          CUtensorMap const* w1_maps, int K, int N, OutT* out, unsigned* sched, unsigned grid, cudaStream_t stream,
                          a_gather gather) {
  auto const kernel = grouped_wgmma_kernel<SWIGLU, OutT, STAGED, GATHER>;
  if (cudaError_t const e = kernels::detail::allow_dynamic_smem(reinterpret_cast<void const*>(kernel),
                                                                static_cast<int>(info<SWIGLU, OutT, STAGED, GATHER>().max_dynamic));
      e != cudaSuccess)
    return e;
  auto const bands = max_bands(m_tiles);
  kernel<<<grid, threads, smem_bytes<SWIGLU, STAGED>(G, bands), stream>>>(a_map, w0_maps, w1_maps, offsets, G, K, N, out, sched,
                                                                          static_cast<int>(bands), gather.slots, gather.top_k);
  return cudaGetLastError();
}

/// Which epilogue launch() runs: its own choice (use_staged), or one forced (tests).
enum class epilogue { automatic, direct, staged };

/// Validated by the caller (grouped_gemm_detail::launch) and by can_launch. sched: the maps' two
/// counters, zero between launches (each launch leaves them so); launches that share them must be
/// ordered on one stream.
/// gather.slots (gate/up, bf16 out): `a` is x [tokens, K] in token order, read through the slots
/// (cudaErrorNotSupported where can_launch_gathered fails).
template <bool SWIGLU, class OutT>
cudaError_t launch(bf16 const* a, std::int64_t const* offsets, int G, std::int64_t M_total, CUtensorMap const* w0_maps,
                   CUtensorMap const* w1_maps, int K, int N, OutT* out, unsigned* sched, cudaStream_t stream,
                   epilogue ep = epilogue::automatic, a_gather gather = {}) {
  bool const gathered = gather.slots != nullptr;
  if (gathered && gather.top_k < 1) return cudaErrorInvalidValue;
  if (gathered && (!SWIGLU || sizeof(OutT) != 2 || !can_launch_gathered(G, M_total))) return cudaErrorNotSupported;
  CUtensorMap a_map;
  // gathered: x's rows are tokens, not counted here; the map spans every row a slot can name
  // (TMA reads only the rows asked for, so the slots are trusted as the stream paths trust them:
  // they come from the layer's own layout), one row a box
  std::uint64_t const a_rows = gathered ? std::uint64_t{0x7fffffff} : static_cast<std::uint64_t>(M_total);
  if (cudaError_t const e = encode_rows(a_map, a, a_rows, static_cast<std::uint64_t>(K), static_cast<std::uint64_t>(K), gathered ? 1u : box_rows);
      e != cudaSuccess) {
    return e;
  }
  constexpr int out_per_tile = SWIGLU ? bn / 2 : bn;
  std::int64_t const n_tiles = (N + out_per_tile - 1) / out_per_tile;
  std::int64_t const m_tiles = row_tiles_bound(G, M_total);
  std::int64_t const tiles = m_tiles * n_tiles;
  if (tiles > 0x7fffffffLL) return cudaErrorInvalidValue;
  int const sms = hopper_sms();
  auto const grid = static_cast<unsigned>(tiles < sms ? tiles : sms);
  if (grid == 0) return cudaSuccess;
  // the instance: epilogue (staged or direct) x A rows (gathered or in place)
  auto const run = [&](auto staged_tag) {
    constexpr bool staged = decltype(staged_tag)::value;
    if constexpr (SWIGLU) {
      if (gathered) return launch_kernel<SWIGLU, OutT, staged, true>(a_map, offsets, G, m_tiles, w0_maps, w1_maps, K, N, out, sched, grid, stream, gather);
    }
    return launch_kernel<SWIGLU, OutT, staged, false>(a_map, offsets, G, m_tiles, w0_maps, w1_maps, K, N, out, sched, grid, stream, {});
  };
  if constexpr (sizeof(OutT) == 2) {
    bool const staged_fits = N % 8 == 0 && fits<SWIGLU, OutT, true, false>(G, M_total) && (!gathered || fits<SWIGLU, OutT, true, SWIGLU>(G, M_total));
    if (ep == epilogue::staged && !staged_fits) return cudaErrorNotSupported;
    if (ep == epilogue::staged || (ep == epilogue::automatic && staged_fits && use_staged<SWIGLU, OutT>(G, M_total, N, out))) {
      return run(std::true_type{});
    }
  } else {
    if (ep == epilogue::staged) return cudaErrorNotSupported;
  }
  return run(std::false_type{});
}

}  // namespace specmoe::kernels::wgmma_detail

#undef SPECMOE_GROUPED_WGMMA_DEVICE
