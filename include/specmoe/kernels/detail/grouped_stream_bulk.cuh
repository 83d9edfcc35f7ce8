// specmoe/kernels/detail/grouped_stream_bulk.cuh: the stream path of the grouped expert GEMMs on
// sm_90 (Hopper), fed by bulk copies; included by kernels/grouped_gemm.cuh.
//
// Why: the register-fed stream kernel (grouped_gemm.cuh) keeps at most 4 loads of 16 bytes a lane
// in flight, about 32 KiB a multiprocessor, and a decode step's weights then arrive at 1.9-2.3 TB/s
// of an H200's 4.2 (docs/benchmarks.md, issue 4, twelfth step). Here one warp copies weight rows
// into a ring of shared-memory stages with cp.async.bulk (no registers held per byte in flight:
// 128 KiB a multiprocessor), and eight warps compute from shared memory.
//
// Work: an item is (a chunk of up to 8 rows of one group, a band of 16 output rows); an item's k
// range is cut into units of `kc` columns, one stage each (the band's weight rows, NMAT matrices,
// and the chunk's activation rows). One persistent block per multiprocessor takes items
// blockIdx.x, blockIdx.x + gridDim.x, ...; the group offsets and weight tables are read once per
// block into shared memory. Each consumer warp owns 2 output rows of the band, as the register
// kernel's warps do, and sums in the same order (lane l: columns l*8 + 256 i, ascending; then a
// butterfly), so the two kernels give the same bits.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cub/block/block_scan.cuh>

#include <specmoe/kernels/detail/kernel_attributes.cuh>
#include <specmoe/kernels/detail/lane_math.cuh>
#include <specmoe/kernels/detail/sm90_async.cuh>

#include <cstddef>
#include <cstdint>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define SPECMOE_STREAM_BULK_DEVICE 1
#else
#define SPECMOE_STREAM_BULK_DEVICE 0
#endif

namespace specmoe::kernels::stream_bulk_detail {

using bf16 = __nv_bfloat16;

inline constexpr int consumer_warps = 8;
inline constexpr int threads = 32 * (consumer_warps + 1);  // + one producer warp
inline constexpr int rows_per_warp = 2;
inline constexpr int band_rows = consumer_warps * rows_per_warp;  // 16 output rows an item
inline constexpr int chunk_rows = 8;                              // activation rows an item
inline constexpr int weight_stage_bytes = 32 * 1024;              // the band's weights of one unit
inline constexpr int stages = 4;
/// Columns a unit: 512 (gate/up: 2 matrices) or 1024 (down), a multiple of 256 so that each lane
/// keeps the register kernel's column order.
template <int NMAT>
inline constexpr int kc = weight_stage_bytes / (band_rows * NMAT * 2);
template <int NMAT>
inline constexpr int stage_bytes = weight_stage_bytes + chunk_rows * kc<NMAT> * 2;
static_assert(kc<1> % 256 == 0 && kc<2> % 256 == 0, "a lane's columns must not depend on the unit size");

/// Dynamic shared memory: the stages, 2 mbarriers a stage, then per group its offsets (G + 1),
/// weight pointers (NMAT G) and row-chunk prefix (G + 1).
template <int NMAT>
constexpr std::size_t smem_bytes(int G) {
  return static_cast<std::size_t>(stages) * stage_bytes<NMAT> + 16 * stages + 8 * (static_cast<std::size_t>(G) + 1) +
         8 * NMAT * static_cast<std::size_t>(G) + 4 * (static_cast<std::size_t>(G) + 1);
}

#if SPECMOE_STREAM_BULK_DEVICE
using kernels::detail::bulk_load;
using kernels::detail::mbar_arrive;
using kernels::detail::mbar_expect_tx;
using kernels::detail::mbar_init;
using kernels::detail::mbar_wait;
using kernels::detail::smem_u32;

using kernels::detail::accumulate_row;
using kernels::detail::unpack8;
using kernels::detail::warp_reduce_store;

/// One item of the walk: rows m0 .. m0 + rows - 1 of group g against output rows n0 .. n0 + 15.
struct item {
  int g, rows, n0;
  std::int64_t m0;
};

/// Item `it` (row chunks fastest-varying after bands: consecutive items share a chunk).
__device__ __forceinline__ item locate(long long it, int bands, int const* pre, std::int64_t const* off, int G) {
  int const chunk = static_cast<int>(it / bands);
  int lo = 0, hi = G;  // pre[lo] <= chunk < pre[hi]
  while (hi - lo > 1) {
    int const mid = (lo + hi) >> 1;
    if (pre[mid] <= chunk) lo = mid; else hi = mid;
  }
  item t;
  t.g = lo;
  t.m0 = off[lo] + static_cast<std::int64_t>(chunk - pre[lo]) * chunk_rows;
  std::int64_t const left = off[lo + 1] - t.m0;
  t.rows = static_cast<int>(left < chunk_rows ? left : chunk_rows);
  t.n0 = static_cast<int>(it % bands) * band_rows;
  return t;
}

/// The consumer warps' work on one item: R >= t.rows accumulators a weight row; `u` counts units.
template <int NMAT, int R, class OutT>
__device__ __forceinline__ void consume_item(item const& t, int K, int N, unsigned char* stages_base, std::uint32_t full0,
                                             std::uint32_t empty0, int& u, OutT* __restrict__ out) {
  constexpr int KC = kc<NMAT>;
  int const warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;
  int const n_first = t.n0 + warp * rows_per_warp;
  bool valid[rows_per_warp];
#pragma unroll
  for (int i = 0; i < rows_per_warp; ++i) valid[i] = n_first + i < N;
  float acc[rows_per_warp][NMAT][R];
#pragma unroll
  for (int i = 0; i < rows_per_warp; ++i)
#pragma unroll
    for (int j = 0; j < NMAT; ++j)
#pragma unroll
      for (int r = 0; r < R; ++r) acc[i][j][r] = 0.0f;

  for (int k0 = 0; k0 < K; k0 += KC, ++u) {
    int const s = u % stages;
    int const klen = K - k0 < KC ? K - k0 : KC;
    mbar_wait(full0 + 8 * s, static_cast<std::uint32_t>((u / stages) & 1));
    auto const* w = reinterpret_cast<bf16 const*>(stages_base + static_cast<std::size_t>(s) * stage_bytes<NMAT>);
    auto const* x = w + weight_stage_bytes / 2;
    if (valid[0]) {
#pragma unroll
      for (int step = 0; step < KC / 256; ++step) {
        int const k = lane * 8 + step * 256;
        if (k >= klen) break;
        float wf[rows_per_warp][NMAT][8];
#pragma unroll
        for (int i = 0; i < rows_per_warp; ++i)
#pragma unroll
          for (int j = 0; j < NMAT; ++j) {
            // an invalid row (past N) reads a slot not copied this unit; its sums are never stored
            int const row = warp * rows_per_warp + i;
            unpack8(*reinterpret_cast<uint4 const*>(w + (j * band_rows + row) * KC + k), wf[i][j]);
          }
#pragma unroll
        for (int r = 0; r < R; ++r) {
          float xf[8];
          int const xr = r < t.rows ? r : 0;
          unpack8(*reinterpret_cast<uint4 const*>(x + xr * KC + k), xf);
          accumulate_row(acc, wf, xf, r);
        }
      }
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(empty0 + 8 * s);  // this warp is done with the stage
  }
  if (valid[0]) warp_reduce_store(acc, t.rows, valid, t.m0, n_first, out, static_cast<std::int64_t>(N));
}
#endif  // SPECMOE_STREAM_BULK_DEVICE

template <int NMAT, class OutT>
__global__ void __launch_bounds__(threads, 1)
    grouped_stream_bulk_kernel(bf16 const* __restrict__ a, std::int32_t const* __restrict__ slots, int top_k,
                               std::int64_t const* __restrict__ offsets, int G,
                               bf16 const* const* __restrict__ w0, bf16 const* const* __restrict__ w1, std::int64_t ld, int K, int N,
                               OutT* __restrict__ out) {
#if SPECMOE_STREAM_BULK_DEVICE
  constexpr int KC = kc<NMAT>;
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* const stages_base = smem;
  auto* const bars = reinterpret_cast<std::uint64_t*>(smem + static_cast<std::size_t>(stages) * stage_bytes<NMAT>);
  auto* const off = reinterpret_cast<std::int64_t*>(bars + 2 * stages);
  auto* const tab = reinterpret_cast<bf16 const**>(off + G + 1);  // tab[j * G + g]
  auto* const pre = reinterpret_cast<int*>(tab + NMAT * G);
  std::uint32_t const full0 = smem_u32(bars), empty0 = smem_u32(bars + stages);
  int const tid = static_cast<int>(threadIdx.x);

  // 1. per block, once: offsets and weight tables into shared memory (loads in flight together),
  //    then the prefix of row chunks a group
  for (int g = tid; g <= G; g += threads) off[g] = offsets[g];
  for (int g = tid; g < G; g += threads) {
    tab[g] = w0[g];
    if constexpr (NMAT == 2) tab[G + g] = w1[g];
  }
  __syncthreads();
  using scan_t = cub::BlockScan<int, threads>;
  __shared__ typename scan_t::TempStorage scan_storage;
  int carry = 0;
  for (int base = 0; base < G; base += threads) {
    int const g = base + tid;
    int const chunks = g < G ? static_cast<int>((off[g + 1] - off[g] + chunk_rows - 1) / chunk_rows) : 0;
    int excl = 0, total = 0;
    scan_t(scan_storage).ExclusiveSum(chunks, excl, total);
    if (g < G) pre[g] = carry + excl;
    carry += total;
    __syncthreads();
  }
  if (tid == 0) {
    pre[G] = carry;
    for (int s = 0; s < stages; ++s) {
      mbar_init(full0 + 8 * s, 1);                 // the producer's arrive, with the unit's bytes
      mbar_init(empty0 + 8 * s, consumer_warps);  // one arrive a consumer warp
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  int const bands = (N + band_rows - 1) / band_rows;
  long long const items = static_cast<long long>(carry) * bands;
  int const warp = tid >> 5, lane = tid & 31;

  if (warp == consumer_warps) {
    // 2. producer: the same walk, unit by unit, `stages` units ahead of the consumers
    int u = 0;
    for (long long it = blockIdx.x; it < items; it += gridDim.x) {
      item const t = locate(it, bands, pre, off, G);
      int const nrows = N - t.n0 < band_rows ? N - t.n0 : band_rows;
      int const copies = nrows * NMAT + t.rows;
      // lane r < t.rows copies activation row r of the chunk: a's row m, or a[slots[m] / top_k]
      std::int64_t const m = t.m0 + (lane < t.rows ? lane : 0);
      bf16 const* const x_row = a + (slots ? slots[m] / top_k : m) * static_cast<std::int64_t>(K);
      for (int k0 = 0; k0 < K; k0 += KC, ++u) {
        int const s = u % stages;
        if (u >= stages) mbar_wait(empty0 + 8 * s, static_cast<std::uint32_t>(((u / stages) + 1) & 1));
        int const klen = K - k0 < KC ? K - k0 : KC;
        auto const row_bytes = static_cast<std::uint32_t>(klen) * 2u;
        if (lane == 0) mbar_expect_tx(full0 + 8 * s, row_bytes * static_cast<std::uint32_t>(copies));
        __syncwarp();
        std::uint32_t const dst0 = smem_u32(stages_base + static_cast<std::size_t>(s) * stage_bytes<NMAT>);
        for (int c = lane; c < nrows * NMAT; c += 32) {
          int const j = c / nrows, row = c - j * nrows;
          bf16 const* const src = tab[j * G + t.g] + static_cast<std::int64_t>(t.n0 + row) * ld + k0;
          bulk_load(dst0 + static_cast<std::uint32_t>((j * band_rows + row) * KC * 2), src, row_bytes, full0 + 8 * s);
        }
        if (lane < t.rows) {
          bulk_load(dst0 + static_cast<std::uint32_t>(weight_stage_bytes + lane * KC * 2), x_row + k0, row_bytes, full0 + 8 * s);
        }
      }
    }
    return;
  }

  // 3. consumers
  int u = 0;
  for (long long it = blockIdx.x; it < items; it += gridDim.x) {
    item const t = locate(it, bands, pre, off, G);
    if (t.rows <= 1) {
      consume_item<NMAT, 1, OutT>(t, K, N, stages_base, full0, empty0, u, out);
    } else if (t.rows == 2) {
      consume_item<NMAT, 2, OutT>(t, K, N, stages_base, full0, empty0, u, out);
    } else if (t.rows <= 4) {
      consume_item<NMAT, 4, OutT>(t, K, N, stages_base, full0, empty0, u, out);
    } else {
      consume_item<NMAT, 8, OutT>(t, K, N, stages_base, full0, empty0, u, out);
    }
  }
#endif
}

/// The dynamic shared memory the kernel may use on the current device: the opt-in limit less its
/// static part, or 0 where this binary holds no sm_90 body for it (a pre-sm_90 target compiles an
/// empty kernel); queried once.
template <int NMAT, class OutT>
std::size_t max_dynamic_smem() {
  static std::size_t const bytes = [] {
    cudaFuncAttributes attr{};
    int dev = 0, optin = 0;
    if (cudaFuncGetAttributes(&attr, grouped_stream_bulk_kernel<NMAT, OutT>) != cudaSuccess || cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
      (void)cudaGetLastError();  // not this launch's error: the caller falls back
      return std::size_t{0};
    }
    if (attr.ptxVersion < 90) return std::size_t{0};  // compiled for an older target (an empty body)
    return static_cast<std::size_t>(optin) > attr.sharedSizeBytes ? static_cast<std::size_t>(optin) - attr.sharedSizeBytes
                                                                   : std::size_t{0};
  }();
  return bytes;
}

/// Whether try_launch runs the kernel for G groups on the current device (sm_90 device and body,
/// G small enough for its shared memory: up to about 1700 groups for down, 2400 for gate/up).
template <int NMAT, class OutT>
bool runs(int G) {
  return kernels::detail::hopper_sms() > 0 && smem_bytes<NMAT>(G) <= max_dynamic_smem<NMAT, OutT>();
}

/// Launches the kernel where runs(G); returns false, launching nothing, otherwise (the caller
/// falls back to the register-fed kernel). Weight rows must be 16-byte aligned (not checkable
/// here: the pointers live on the device), as for the register-fed kernel.
template <int NMAT, class OutT>
bool try_launch(bf16 const* a, std::int32_t const* slots, int top_k, std::int64_t const* offsets, int G, std::int64_t M_total,
                bf16 const* const* w0, bf16 const* const* w1, std::int64_t ld, int K, int N, OutT* out, cudaStream_t stream,
                cudaError_t& err) {
  if (!runs<NMAT, OutT>(G)) return false;
  int const sms = kernels::detail::hopper_sms();
  auto const bytes = smem_bytes<NMAT>(G);
  // The attribute is set once, to the most the kernel may use: a per-G value would leave the
  // limit at a smaller G's size for a later launch with more groups.
  if (detail::allow_dynamic_smem(reinterpret_cast<void const*>(grouped_stream_bulk_kernel<NMAT, OutT>),
                                 static_cast<int>(max_dynamic_smem<NMAT, OutT>())) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  // at most sum_g ceil(rows_g / chunk_rows) <= M_total / chunk_rows + min(G, M_total) items a band
  std::int64_t const active = M_total < G ? M_total : G;
  std::int64_t const bands = (N + band_rows - 1) / band_rows;
  std::int64_t const items = (M_total / chunk_rows + active) * bands;
  auto const grid = static_cast<unsigned>(items < sms ? items : sms);
  grouped_stream_bulk_kernel<NMAT, OutT><<<grid, threads, bytes, stream>>>(a, slots, top_k, offsets, G, w0, w1,
                                                                                                      ld, K, N, out);
  err = cudaGetLastError();
  return true;
}

}  // namespace specmoe::kernels::stream_bulk_detail
