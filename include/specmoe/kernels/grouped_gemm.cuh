// specmoe/kernels/grouped_gemm.cuh: the expert FFN of an MoE layer as grouped GEMMs over all local
// experts of one GPU, with no host synchronisation (issue 4).
//
// Rows arrive permuted into expert-major order: rows offsets[g] .. offsets[g+1]-1 belong to group
// (local expert) g. The offsets live only on the device; the grids are sized from the host-known
// upper bounds M_total (rows, e.g. tokens x top_k) and G, and blocks beyond the real work exit.
// Weights come per group through a device array of pointers, each a row-major [rows_out, K]
// matrix (PyTorch Linear layout) with row stride `ld` elements.
//
//   launch_grouped_gate_up_swiglu: h[m, f] = bf16_rn(silu(x_m . Wg[f]) * (x_m . Wu[f]))
//   launch_grouped_down:           y[m, n] = bf16_rn(h_m . Wd[n])        (or fp32 y)
//
// fp32 accumulation everywhere; silu(g) = g / (1 + expf(-g)), as detail/host/ffn.hpp.
//
// Three paths, chosen in the wrapper from host-known numbers only (M_total / G, the device):
//   stream: few rows per group (decode). Each warp streams whole weight rows with 16-byte loads
//           and applies each weight element to up to 8 rows of its group (weights read once per
//           8 rows of a group). On sm_90 a persistent kernel feeds the warps from shared memory
//           by bulk copies instead (detail/grouped_stream_bulk.cuh: more bytes in flight, the
//           same sums in the same order).
//   mma:    many rows per group (prefill). 128x128x64 tiles, mma.sync m16n8k16 bf16 tensor cores,
//           ldmatrix from XOR-swizzled shared memory, 3-stage cp.async pipeline; each block finds
//           its (group, row tile) by a block-wide scan of the offsets (no tile table, no
//           workspace); tiles are visited in bands of 8 row tiles so that a weight tile is read
//           from HBM about once per band.
//   wgmma:  more than ~2 rows per group on sm_90 (Hopper, sm_90a builds), in place of mma:
//           persistent, warp-specialised, TMA-fed wgmma kernel with 128x256x64 tiles
//           (detail/grouped_wgmma.cuh). The weights come through per-group tensor maps prepared
//           once on the host (grouped_weight_maps, the launches' last argument); without them
//           `automatic` never picks this path.
//
// Requirements (the wrappers return cudaErrorInvalidValue otherwise): K, F, N_out and ld multiples
// of 8, all pointers 16-byte aligned, G >= 1, offsets[0] = 0, offsets non-decreasing,
// offsets[G] <= M_total. Rows m >= offsets[G] (padding) are never written. No allocation, no
// synchronisation: the launches can be captured in a CUDA graph.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cub/block/block_scan.cuh>

#include <specmoe/kernels/detail/grouped_stream_bulk.cuh>
#include <specmoe/kernels/detail/lane_math.cuh>
#include <specmoe/kernels/detail/grouped_wgmma.cuh>

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

namespace specmoe::kernels {

/// Which kernel runs: `automatic` chooses from M_total / G and the device (the default); the others
/// force one path (tests and benchmarks). A forced `wgmma` needs grouped_weight_maps, an sm_90
/// device and an sm_90a build (else cudaErrorInvalidValue / cudaErrorNotSupported). `stream` runs
/// the bulk-copy stream kernel where it can (sm_90; G up to about 1700 for down, 2400 for gate/up)
/// and the register-fed one elsewhere; `stream_registers` forces the register-fed one (same
/// results, bit for bit).
enum class grouped_gemm_path { automatic, stream, mma, wgmma, stream_registers };

/// Scratch the grouped GEMMs need: none (each block scans the offsets itself).
constexpr std::size_t grouped_gemm_workspace_bytes(int /*G*/, std::int64_t /*M_total*/) noexcept { return 0; }

/// Per-group TMA descriptors (CUtensorMap) of the expert weights, for the wgmma path: one map per
/// group and matrix, encoded once on the host from host-side copies of the pointer tables and kept
/// on the device. Build it where the layer builds those tables (at construction) and pass it to
/// every launch; the pointers must be the same as those of the device tables.
///
/// @note The constructor synchronises (cudaMalloc + cudaMemcpy); the launches do not. Check
///       status(): on failure the maps are unusable and the launches ignore them.
class grouped_weight_maps {
 public:
  grouped_weight_maps() = default;
  /// gate_up: w_gate[g], w_up[g] (host arrays of G device pointers), each [rows = F, K], row stride ld.
  grouped_weight_maps(__nv_bfloat16 const* const* w_gate, __nv_bfloat16 const* const* w_up, int G, std::int64_t rows, int K,
                      std::int64_t ld) {
    build(w_gate, w_up, G, rows, K, ld);
  }
  /// down: w[g] (host array of G device pointers), each [rows = N_out, K = F], row stride ld.
  grouped_weight_maps(__nv_bfloat16 const* const* w, int G, std::int64_t rows, int K, std::int64_t ld) {
    build(w, nullptr, G, rows, K, ld);
  }
  grouped_weight_maps(grouped_weight_maps const&) = delete;
  grouped_weight_maps& operator=(grouped_weight_maps const&) = delete;
  grouped_weight_maps(grouped_weight_maps&& o) noexcept { swap(o); }
  grouped_weight_maps& operator=(grouped_weight_maps&& o) noexcept {
    grouped_weight_maps tmp(std::move(o));
    swap(tmp);
    return *this;
  }
  ~grouped_weight_maps() {
    if (maps_) cudaFree(maps_);
  }

  [[nodiscard]] cudaError_t status() const noexcept { return status_; }
  [[nodiscard]] int groups() const noexcept { return groups_; }
  [[nodiscard]] int matrices() const noexcept { return matrices_; }  // 2: gate_up, 1: down
  /// The device-resident maps of matrix `m` (0: gate or down, 1: up), G of them, 64-byte aligned.
  [[nodiscard]] CUtensorMap const* device_maps(int m) const noexcept { return maps_ + static_cast<std::ptrdiff_t>(m) * groups_; }
  /// The wgmma kernel's tile counters (two, zero between launches): launches with these maps must
  /// be ordered on one stream, as a layer's forward passes are.
  [[nodiscard]] unsigned* tile_counters() const noexcept { return reinterpret_cast<unsigned*>(maps_ + static_cast<std::ptrdiff_t>(matrices_) * groups_); }
  /// Built for at least G groups of `nmat` matrices [rows, K] with row stride ld.
  [[nodiscard]] bool fits(int G, int nmat, std::int64_t rows, int K, std::int64_t ld) const noexcept {
    return status_ == cudaSuccess && groups_ >= G && matrices_ == nmat && rows_ == rows && k_ == K && ld_ == ld;
  }

 private:
  void build(__nv_bfloat16 const* const* w0, __nv_bfloat16 const* const* w1, int G, std::int64_t rows, int K, std::int64_t ld) {
    status_ = cudaErrorInvalidValue;
    if (G < 1 || !w0 || rows < 1 || K < 8 || K % 8 != 0 || ld < K || ld % 8 != 0) return;
    int const nmat = w1 ? 2 : 1;
    std::vector<CUtensorMap> host(static_cast<std::size_t>(G) * static_cast<std::size_t>(nmat));
    for (int m = 0; m < nmat; ++m) {
      for (int g = 0; g < G; ++g) {
        void const* const p = (m == 0 ? w0 : w1)[g];
        cudaError_t const e = wgmma_detail::encode_rows(host[static_cast<std::size_t>(m) * G + g], p, static_cast<std::uint64_t>(rows),
                                                        static_cast<std::uint64_t>(K), static_cast<std::uint64_t>(ld));
        if (e != cudaSuccess) {
          status_ = e;
          return;
        }
      }
    }
    void* d = nullptr;
    std::size_t const map_bytes = host.size() * sizeof(CUtensorMap);
    status_ = cudaMalloc(&d, map_bytes + sizeof(CUtensorMap));  // the maps, then the tile counters
    if (status_ != cudaSuccess) return;
    maps_ = static_cast<CUtensorMap*>(d);
    status_ = cudaMemcpy(maps_, host.data(), map_bytes, cudaMemcpyHostToDevice);
    if (status_ == cudaSuccess) status_ = cudaMemset(static_cast<char*>(d) + map_bytes, 0, sizeof(CUtensorMap));
    if (status_ != cudaSuccess) return;
    groups_ = G;
    matrices_ = nmat;
    rows_ = rows;
    k_ = K;
    ld_ = ld;
  }
  void swap(grouped_weight_maps& o) noexcept {
    std::swap(maps_, o.maps_);
    std::swap(status_, o.status_);
    std::swap(groups_, o.groups_);
    std::swap(matrices_, o.matrices_);
    std::swap(rows_, o.rows_);
    std::swap(k_, o.k_);
    std::swap(ld_, o.ld_);
  }

  CUtensorMap* maps_ = nullptr;
  cudaError_t status_ = cudaErrorInvalidValue;  // not built
  int groups_ = 0, matrices_ = 0, k_ = 0;
  std::int64_t rows_ = 0, ld_ = 0;
};

namespace grouped_gemm_detail {

using bf16 = __nv_bfloat16;

inline constexpr int threads = 256;  // both kernels: 8 warps

// ------------------------------------------------------------------------------------------
// small device helpers
// ------------------------------------------------------------------------------------------
using detail::accumulate_row;
using detail::silu_mul;
using detail::store_one;
using detail::store_pair;
using detail::unpack8;
using detail::warp_reduce_store;

__device__ __forceinline__ uint4 load_stream(void const* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

__device__ __forceinline__ void cp_async16(void* smem, void const* gmem, bool valid) {
  auto const s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  int const bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], void const* smem) {
  auto const s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

__device__ __forceinline__ void mma_bf16(float (&c)[4], unsigned const (&a)[4], unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ------------------------------------------------------------------------------------------
// stream path (decode): grid (ceil(N / rows_per_block), min(G, M_total)); block y serves the
// y-th non-empty group. Each warp owns `rpw` output rows of each of the NMAT matrices (NMAT = 2:
// gate and up), streams them once per chunk of up to 8 group rows, and reduces across lanes.
// ------------------------------------------------------------------------------------------
inline constexpr int stream_rpw = 2;                                  // output rows per warp
inline constexpr int stream_rows_per_block = stream_rpw * threads / 32;  // 16

/// Row m of the A operand: a[m], or with `slots` (a layout's sorted slots) token row
/// a[slots[m] / top_k], which folds the gather into the GEMM.
__device__ __forceinline__ bf16 const* a_row(bf16 const* a, std::int32_t const* slots, int top_k, std::int64_t m, int K) {
  std::int64_t const r = slots ? slots[m] / top_k : m;
  return a + r * static_cast<std::int64_t>(K);
}

template <int NMAT, int R, class OutT, int UNROLL = 2>
__device__ __forceinline__ void stream_rows(bf16 const* __restrict__ a, std::int32_t const* slots, int top_k, std::int64_t m0, int rows,
                                            bf16 const* const (&wrow)[stream_rpw][NMAT], bool const (&nvalid)[stream_rpw], int n_first,
                                            int K, OutT* __restrict__ out, std::int64_t ldo) {
  int const lane = threadIdx.x & 31;
  float acc[stream_rpw][NMAT][R];
#pragma unroll
  for (int i = 0; i < stream_rpw; ++i)
#pragma unroll
    for (int j = 0; j < NMAT; ++j)
#pragma unroll
      for (int r = 0; r < R; ++r) acc[i][j][r] = 0.0f;

  bf16 const* xrow[R];
#pragma unroll
  for (int r = 0; r < R; ++r) xrow[r] = a_row(a, slots, top_k, m0 + (r < rows ? r : 0), K);

#pragma unroll UNROLL
  for (int k = lane * 8; k < K; k += 256) {
    uint4 wv[stream_rpw][NMAT];
#pragma unroll
    for (int i = 0; i < stream_rpw; ++i)
#pragma unroll
      for (int j = 0; j < NMAT; ++j) wv[i][j] = nvalid[i] ? load_stream(wrow[i][j] + k) : make_uint4(0, 0, 0, 0);
    float wf[stream_rpw][NMAT][8];
#pragma unroll
    for (int i = 0; i < stream_rpw; ++i)
#pragma unroll
      for (int j = 0; j < NMAT; ++j) unpack8(wv[i][j], wf[i][j]);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float xf[8];
      unpack8(__ldg(reinterpret_cast<uint4 const*>(xrow[r] + k)), xf);
      accumulate_row(acc, wf, xf, r);
    }
  }
  warp_reduce_store(acc, rows, nvalid, m0, n_first, out, ldo);
}

/// Rows mb .. me-1 of one group in chunks of up to CH (1 or 8) rows: each chunk streams the warp's
/// weight rows once.
template <int NMAT, int CH, class OutT, int UNROLL = 2>
__device__ __forceinline__ void stream_group(bf16 const* __restrict__ a, std::int32_t const* slots, int top_k, std::int64_t mb,
                                             std::int64_t me, bf16 const* const (&wrow)[stream_rpw][NMAT],
                                             bool const (&nvalid)[stream_rpw], int n_first, int K, OutT* __restrict__ out,
                                             std::int64_t ldo) {
  static_assert(CH == 1 || CH == 8, "chunks of 1 or 8 rows");
  for (std::int64_t m0 = mb; m0 < me; m0 += CH) {
    int const rows = static_cast<int>(me - m0 < CH ? me - m0 : CH);
    if (CH == 1 || rows == 1) {
      stream_rows<NMAT, 1, OutT, UNROLL>(a, slots, top_k, m0, rows, wrow, nvalid, n_first, K, out, ldo);
    } else if constexpr (CH == 8) {
      if (rows == 2) {
        stream_rows<NMAT, 2, OutT, UNROLL>(a, slots, top_k, m0, rows, wrow, nvalid, n_first, K, out, ldo);
      } else if (rows <= 4) {
        stream_rows<NMAT, 4, OutT, UNROLL>(a, slots, top_k, m0, rows, wrow, nvalid, n_first, K, out, ldo);
      } else {
        stream_rows<NMAT, 8, OutT, UNROLL>(a, slots, top_k, m0, rows, wrow, nvalid, n_first, K, out, ldo);
      }
    }
  }
}

/// The want-th group with rows (offsets[g + 1] > offsets[g]), or -1 where fewer groups have rows:
/// a block-wide scan of the offsets. Every thread of the block calls it. `first_flag`: thread
/// t's flag for group t, loaded by the caller (so that the load can overlap other latency).
template <int THREADS>
__device__ __forceinline__ int nth_nonempty_group(std::int64_t const* __restrict__ offsets, int G, int want, int first_flag) {
  using scan_t = cub::BlockScan<int, THREADS>;
  __shared__ typename scan_t::TempStorage scan_storage;
  __shared__ int s_group;
  int const tid = threadIdx.x;
  if (tid == 0) s_group = -1;
  __syncthreads();
  int carry = 0;
  for (int base = 0; base < G; base += THREADS) {
    int const g = base + tid;
    int const flag = base == 0 ? first_flag : (g < G && offsets[g + 1] > offsets[g]) ? 1 : 0;
    int excl = 0, total = 0;
    scan_t(scan_storage).ExclusiveSum(flag, excl, total);
    if (flag && carry + excl == want) s_group = g;
    carry += total;
    __syncthreads();
    if (carry > want) break;  // uniform: every thread holds the same carry
  }
  return s_group;
}

/// Thread t's flag for group t (the first chunk of nth_nonempty_group's scan).
__device__ __forceinline__ int first_group_flag(std::int64_t const* __restrict__ offsets, int G) {
  int const g = static_cast<int>(threadIdx.x);
  return g < G && offsets[g + 1] > offsets[g] ? 1 : 0;
}

/// The warp's weight rows n_first, n_first + 1 of each matrix of group g (row stride ld); rows
/// past N are marked invalid (and point at n_first, which the caller checked is < N).
template <int NMAT>
__device__ __forceinline__ void warp_weight_rows(bf16 const* const* __restrict__ w0, bf16 const* const* __restrict__ w1, int g,
                                                 std::int64_t ld, int n_first, int N, bf16 const* (&wrow)[stream_rpw][NMAT],
                                                 bool (&nvalid)[stream_rpw]) {
  bf16 const* const base0 = w0[g];
  bf16 const* const base1 = NMAT == 2 ? w1[g] : nullptr;
#pragma unroll
  for (int i = 0; i < stream_rpw; ++i) {
    nvalid[i] = n_first + i < N;
    int const n = nvalid[i] ? n_first + i : n_first;
    wrow[i][0] = base0 + static_cast<std::int64_t>(n) * ld;
    if constexpr (NMAT == 2) wrow[i][1] = base1 + static_cast<std::int64_t>(n) * ld;
  }
}

/// Blocks a multiprocessor must hold, which caps the registers: the k loop keeps 4 (gate/up) or 2
/// (down) 16-byte loads a lane per unrolled step in flight, and what limits a decode step is the
/// bytes in flight per multiprocessor. Uncapped, gate/up took 129 registers (one block an SM);
/// capped at two blocks it ran 4-23% faster on an H200 wherever it had blocks to fill them
/// (docs/benchmarks.md, issue 4, twelfth step). Down over a long k (LONG_K: K >= stream_long_k)
/// unrolls twice as far at two blocks an SM (3-11% faster at 2048 and 14336); over a short k
/// (Qwen3-30B-A3B's 768) three blocks of the plain loop stay ahead.
inline constexpr int stream_long_k = 2048;
template <int NMAT, bool LONG_K>
inline constexpr int stream_min_blocks = NMAT == 2 || LONG_K ? 2 : 3;
template <int NMAT, bool LONG_K>
inline constexpr int stream_unroll = NMAT == 1 && LONG_K ? 4 : 2;

/// GATHER: A rows through `slots` (gate/up with the gather folded in); a separate instance, so the
/// plain kernels keep their registers (the runtime choice spilled 80 bytes in down).
template <int NMAT, class OutT, bool LONG_K, bool GATHER = false>
__global__ void __launch_bounds__(threads, (stream_min_blocks<NMAT, LONG_K>))
    grouped_stream_kernel(bf16 const* __restrict__ a, std::int32_t const* __restrict__ slots, int top_k,
                          std::int64_t const* __restrict__ offsets, int G, bf16 const* const* __restrict__ w0,
                          bf16 const* const* __restrict__ w1, std::int64_t ld, int K, int N, OutT* __restrict__ out) {
  // block y serves the y-th non-empty group
  int const g = nth_nonempty_group<threads>(offsets, G, static_cast<int>(blockIdx.y), first_group_flag(offsets, G));
  if (g < 0) return;
  int const n_first = blockIdx.x * stream_rows_per_block + (threadIdx.x >> 5) * stream_rpw;
  if (n_first >= N) return;
  bf16 const* wrow[stream_rpw][NMAT];
  bool nvalid[stream_rpw];
  warp_weight_rows<NMAT>(w0, w1, g, ld, n_first, N, wrow, nvalid);
  stream_group<NMAT, 8, OutT, stream_unroll<NMAT, LONG_K>>(a, GATHER ? slots : nullptr, top_k, offsets[g], offsets[g + 1], wrow, nvalid,
                                                          n_first, K, out,
                                                          static_cast<std::int64_t>(N));
}

// ------------------------------------------------------------------------------------------
// mma path (prefill)
// ------------------------------------------------------------------------------------------
inline constexpr int mma_bm = 128, mma_bn = 128, mma_bk = 64, mma_stages = 3, mma_band = 8;
inline constexpr int mma_stage_elems = (mma_bm + mma_bn) * mma_bk;
inline constexpr std::size_t mma_smem_bytes = static_cast<std::size_t>(mma_stages) * mma_stage_elems * sizeof(bf16);  // 96 KiB

// element offset of 16-byte chunk `c` (0..7) of tile row `row` (64 elements a row), XOR-swizzled
__device__ __forceinline__ int swz(int row, int c) { return row * mma_bk + ((c ^ (row & 7)) << 3); }

/// SWIGLU: the block's B tile holds 64 gate rows then 64 up rows of the same 64 outputs, and the
/// epilogue writes bf16(silu(g) * u); otherwise 128 rows of one matrix and plain outputs.
template <bool SWIGLU, class OutT>
__global__ void __launch_bounds__(threads, 2)
    grouped_mma_kernel(bf16 const* __restrict__ a, std::int64_t const* __restrict__ offsets, int G, bf16 const* const* __restrict__ w0,
                       bf16 const* const* __restrict__ w1, std::int64_t ld, int K, int N, OutT* __restrict__ out) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  bf16* const smem = reinterpret_cast<bf16*>(smem_raw);
  using scan_t = cub::BlockScan<int, threads>;
  __shared__ typename scan_t::TempStorage scan_storage;
  int const tid = threadIdx.x;

  // 1. tile prefix over groups (in the pipeline's shared memory, free until the main loop)
  int* const pre = reinterpret_cast<int*>(smem_raw);
  int carry = 0;
  for (int base = 0; base < G; base += threads) {
    int const g = base + tid;
    int tiles = 0;
    if (g < G) tiles = static_cast<int>((offsets[g + 1] - offsets[g] + mma_bm - 1) / mma_bm);
    int incl = 0, total = 0;
    scan_t(scan_storage).InclusiveSum(tiles, incl, total);
    if (g < G) pre[g + 1] = carry + incl;
    carry += total;
    __syncthreads();
  }
  if (tid == 0) pre[0] = 0;
  __syncthreads();
  int const total_tiles = carry;
  constexpr int out_per_tile = SWIGLU ? mma_bn / 2 : mma_bn;
  int const n_tiles = (N + out_per_tile - 1) / out_per_tile;
  long long const lin = blockIdx.x;
  if (lin >= static_cast<long long>(total_tiles) * n_tiles) return;
  int const band = static_cast<int>(lin / (static_cast<long long>(mma_band) * n_tiles));
  int const r = static_cast<int>(lin % (static_cast<long long>(mma_band) * n_tiles));
  int const h = min(mma_band, total_tiles - band * mma_band);
  int const mt = band * mma_band + r % h;
  int const nt = r / h;
  // group of row tile mt: the last g with pre[g] <= mt
  int lo = 0, hi = G;  // pre[lo] <= mt < pre[hi]
  while (hi - lo > 1) {
    int const mid = (lo + hi) >> 1;
    if (pre[mid] <= mt) lo = mid; else hi = mid;
  }
  int const g = lo;
  std::int64_t const m0 = offsets[g] + static_cast<std::int64_t>(mt - pre[g]) * mma_bm;
  std::int64_t const rows_left = offsets[g + 1] - m0;
  int const mrows = static_cast<int>(rows_left < mma_bm ? rows_left : mma_bm);
  int const n0 = nt * out_per_tile;
  bf16 const* const wb0 = w0[g];
  bf16 const* const wb1 = SWIGLU ? w1[g] : nullptr;
  __syncthreads();  // pre[] is dead from here: the pipeline may overwrite it

  // 2. per-thread load assignments: 4 chunks of A and 4 of B per stage
  bf16 const* a_src[4];
  bool a_ok[4];
  int a_dst[4];
  bf16 const* b_src[4];
  bool b_ok[4];
  int b_dst[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    int const c = tid + i * threads;  // 0..1023
    int const row = c >> 3, ch = c & 7;
    a_ok[i] = row < mrows;
    a_src[i] = a + (m0 + (a_ok[i] ? row : 0)) * static_cast<std::int64_t>(K) + ch * 8;
    a_dst[i] = swz(row, ch);
    int n;
    bf16 const* wb;
    if constexpr (SWIGLU) {
      n = n0 + (row & 63);
      wb = row < 64 ? wb0 : wb1;
    } else {
      n = n0 + row;
      wb = wb0;
    }
    b_ok[i] = n < N;
    b_src[i] = wb + static_cast<std::int64_t>(b_ok[i] ? n : 0) * ld + ch * 8;
    b_dst[i] = mma_bm * mma_bk + swz(row, ch);
  }
  int const k_tiles = (K + mma_bk - 1) / mma_bk;
  auto load_stage = [&](int stage, int kt) {
    bf16* const s = smem + stage * mma_stage_elems;
    int const k0 = kt * mma_bk;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      int const ch = (tid + i * threads) & 7;
      bool const kok = k0 + ch * 8 < K;
      cp_async16(s + a_dst[i], kok ? a_src[i] + k0 : a, a_ok[i] && kok);
      cp_async16(s + b_dst[i], kok ? b_src[i] + k0 : wb0, b_ok[i] && kok);
    }
  };

  // 3. warp tiling: 2 (m) x 4 (n) warps, each 64 rows x 32 columns of the B tile
  int const warp = tid >> 5, lane = tid & 31;
  int const wm = warp >> 2, wn = warp & 3;
  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

#pragma unroll
  for (int s = 0; s < mma_stages - 1; ++s) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<mma_stages - 2>();
    __syncthreads();
    {
      int const nk = kt + mma_stages - 1;
      if (nk < k_tiles) load_stage(nk % mma_stages, nk);
      cp_async_commit();
    }
    bf16 const* const sa = smem + (kt % mma_stages) * mma_stage_elems;
    bf16 const* const sb = sa + mma_bm * mma_bk;
#pragma unroll
    for (int kk = 0; kk < mma_bk / 16; ++kk) {
      unsigned af[4][4];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        int const row = wm * 64 + mi * 16 + (lane & 15);
        ldmatrix_x4(af[mi], sa + swz(row, kk * 2 + (lane >> 4)));
      }
      unsigned bfr[2][4];
#pragma unroll
      for (int p = 0; p < 2; ++p) {
        int const base = SWIGLU ? p * 64 + wn * 16 : wn * 32 + p * 16;
        int const row = base + (lane & 7) + ((lane >> 4) << 3);
        ldmatrix_x4(bfr[p], sb + swz(row, kk * 2 + ((lane >> 3) & 1)));
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma_bf16(acc[mi][ni], af[mi], bfr[ni >> 1][(ni & 1) * 2], bfr[ni >> 1][(ni & 1) * 2 + 1]);
    }
  }
  cp_async_wait<0>();

  // 4. epilogue
  std::int64_t const ldo = N;
#pragma unroll
  for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      int const row = wm * 64 + mi * 16 + (lane >> 2) + half * 8;
      if (row >= mrows) continue;
      OutT* const orow = out + (m0 + row) * ldo;
      if constexpr (SWIGLU) {
#pragma unroll
        for (int ni = 0; ni < 2; ++ni) {
          int const col = n0 + wn * 16 + ni * 8 + (lane & 3) * 2;
          if (col < N) {
            store_pair(orow + col, silu_mul(acc[mi][ni][half * 2], acc[mi][ni + 2][half * 2]),
                       silu_mul(acc[mi][ni][half * 2 + 1], acc[mi][ni + 2][half * 2 + 1]));
          }
        }
      } else {
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
          int const col = n0 + wn * 32 + ni * 8 + (lane & 3) * 2;
          if (col < N) store_pair(orow + col, acc[mi][ni][half * 2], acc[mi][ni][half * 2 + 1]);
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
// host side
// ------------------------------------------------------------------------------------------
inline bool aligned16(void const* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

/// Few rows a group: the wgmma path from this many tiles a multiprocessor (see choose).
inline constexpr std::int64_t wgmma_min_tiles_per_sm_for_few_rows = 4;

/// The automatic choice: the stream path while groups hold few rows on average. Measured on an
/// H100 (docs/benchmarks.md, issue 4): gate_up (two matrices streamed per warp) stays ahead of
/// the mma path up to ~4 rows a group, down (one matrix, less in flight) only up to ~2. The wgmma
/// path, where it can run (maps given, sm_90 device, sm_90a build), beat mma on every measured
/// shape from 16 tokens up and ties or beats stream from ~2 rows a group; with fewer rows it also
/// beats stream once the groups give it tiles enough to fill the GPU several times over
/// (Qwen3-30B-A3B and DeepSeek-V3 at 16 tokens, one row a group: 4-7% faster), not below (one
/// token: a few tiles, most multiprocessors idle).
inline grouped_gemm_path choose(grouped_gemm_path p, int G, std::int64_t M_total, int N, int nmat, bool wgmma_ok) {
  if (p != grouped_gemm_path::automatic) return p;
  std::int64_t const active = M_total < G ? M_total : G;  // at most this many non-empty groups
  std::int64_t const rows_per_group = nmat == 2 && !wgmma_ok ? 4 : 2;
  if (M_total <= rows_per_group * active) {
    if (wgmma_ok) {
      std::int64_t const out_per_tile = nmat == 2 ? wgmma_detail::bn / 2 : wgmma_detail::bn;
      std::int64_t const tiles = active * ((N + out_per_tile - 1) / out_per_tile);
      if (tiles >= wgmma_min_tiles_per_sm_for_few_rows * wgmma_detail::hopper_sms()) return grouped_gemm_path::wgmma;
    }
    return grouped_gemm_path::stream;
  }
  return wgmma_ok ? grouped_gemm_path::wgmma : grouped_gemm_path::mma;
}

/// A operand rows gathered on the fly (the stream and wgmma paths): row m is a[slots[m] / top_k].
struct row_gather {
  std::int32_t const* slots = nullptr;
  int top_k = 1;
};

template <int NMAT, class OutT>
cudaError_t launch(bf16 const* a, std::int64_t const* offsets, int G, std::int64_t M_total, bf16 const* const* w0,
                   bf16 const* const* w1, std::int64_t ld, int K, int N, OutT* out, cudaStream_t stream, grouped_gemm_path path,
                   grouped_weight_maps const* maps, row_gather gather = {}) {
  if (G < 1 || G > 16384 || M_total < 0 || K < 8 || N < 8 || K % 8 != 0 || N % 8 != 0 || ld < K || ld % 8 != 0 || !a || !offsets ||
      !w0 || (NMAT == 2 && !w1) || !out || !aligned16(a) || !aligned16(out) || gather.top_k < 1) {
    return cudaErrorInvalidValue;
  }
  if (maps && maps->status() != cudaSuccess) maps = nullptr;  // unusable: as if absent
  if (maps && !maps->fits(G, NMAT, N, K, ld)) return cudaErrorInvalidValue;
  constexpr bool swiglu = NMAT == 2;
  bool const wgmma_ok = M_total > 0 && maps && wgmma_detail::can_launch<swiglu, OutT>(G, M_total);
  grouped_gemm_path const chosen = choose(path, G, M_total, N, NMAT, wgmma_ok);
  bool const streams = chosen == grouped_gemm_path::stream || chosen == grouped_gemm_path::stream_registers;
  if (gather.slots && !streams && chosen != grouped_gemm_path::wgmma) return cudaErrorInvalidValue;  // the mma path reads A in place
  if (M_total == 0) return cudaSuccess;
  if (chosen == grouped_gemm_path::wgmma) {
    if (!maps) return cudaErrorInvalidValue;
    if (!wgmma_ok) return cudaErrorNotSupported;
    return wgmma_detail::launch<swiglu, OutT>(a, offsets, G, M_total, maps->device_maps(0), maps->device_maps(swiglu ? 1 : 0), K, N, out,
                                              maps->tile_counters(), stream, wgmma_detail::epilogue::automatic,
                                              wgmma_detail::a_gather{gather.slots, gather.top_k});
  }
  if (chosen == grouped_gemm_path::stream) {
    cudaError_t err = cudaSuccess;
    if (stream_bulk_detail::try_launch<NMAT, OutT>(a, gather.slots, gather.top_k, offsets, G, M_total, w0, w1, ld, K, N, out, stream,
                                                   err)) {
      return err;
    }
  }
  if (streams) {
    std::int64_t const slots = M_total < G ? M_total : G;
    dim3 const grid(static_cast<unsigned>((N + stream_rows_per_block - 1) / stream_rows_per_block), static_cast<unsigned>(slots));
    if (slots > 65535) return cudaErrorInvalidValue;
    if (gather.slots) {
      if constexpr (NMAT == 2) {
        grouped_stream_kernel<NMAT, OutT, false, true>
            <<<grid, threads, 0, stream>>>(a, gather.slots, gather.top_k, offsets, G, w0, w1, ld, K, N, out);
      } else {
        return cudaErrorInvalidValue;  // (only gate/up folds the gather)
      }
    } else {
      bool launched = false;
      if constexpr (NMAT == 1) {  // (no gate/up instance of the long-k kernel)
        if (K >= stream_long_k) {
          grouped_stream_kernel<NMAT, OutT, true><<<grid, threads, 0, stream>>>(a, nullptr, 1, offsets, G, w0, w1, ld, K, N, out);
          launched = true;
        }
      }
      if (!launched) {
        grouped_stream_kernel<NMAT, OutT, false><<<grid, threads, 0, stream>>>(a, nullptr, 1, offsets, G, w0, w1, ld, K, N, out);
      }
    }
  } else {
    auto const kernel = grouped_mma_kernel<swiglu, OutT>;
    cudaError_t const attr = detail::allow_dynamic_smem(reinterpret_cast<void const*>(kernel), static_cast<int>(mma_smem_bytes));
    if (attr != cudaSuccess) return attr;
    if (static_cast<std::size_t>(G + 1) * sizeof(int) > mma_smem_bytes) return cudaErrorInvalidValue;
    int const out_per_tile = swiglu ? mma_bn / 2 : mma_bn;
    std::int64_t const n_tiles = (N + out_per_tile - 1) / out_per_tile;
    // sum_g ceil(n_g / BM) <= (M_total + G (BM - 1)) / BM, and at most M_total tiles
    std::int64_t m_tiles = (M_total + static_cast<std::int64_t>(G) * (mma_bm - 1)) / mma_bm;
    if (m_tiles > M_total) m_tiles = M_total;
    std::int64_t const blocks = m_tiles * n_tiles;
    if (blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
    kernel<<<static_cast<unsigned>(blocks), threads, mma_smem_bytes, stream>>>(a, offsets, G, w0, w1, ld, K, N, out);
  }
  return cudaGetLastError();
}

}  // namespace grouped_gemm_detail

/// h[m, f] = bf16_rn(silu(x_m . Wg[f]) * (x_m . Wu[f])) for every row m < offsets[G], where group g
/// of row m uses w_gate[g], w_up[g] (device arrays of G device pointers, each [F, K] with row
/// stride ld). x [M_total, K], h [M_total, F], both bf16 row-major. Fused w13 ([2F, K] per
/// expert): w_up[g] = w_gate[g] + F * ld. `maps` (optional): the same pointers as tensor maps
/// (grouped_weight_maps(w_gate, w_up, G, F, K, ld)), which enables the wgmma path.
inline cudaError_t launch_grouped_gate_up_swiglu(__nv_bfloat16 const* x, std::int64_t const* offsets, int G, std::int64_t M_total,
                                                 __nv_bfloat16 const* const* w_gate, __nv_bfloat16 const* const* w_up, std::int64_t ld,
                                                 int K, int F, __nv_bfloat16* h, cudaStream_t stream,
                                                 grouped_gemm_path path = grouped_gemm_path::automatic,
                                                 grouped_weight_maps const* maps = nullptr) {
  return grouped_gemm_detail::launch<2>(x, offsets, G, M_total, w_gate, w_up, ld, K, F, h, stream, path, maps);
}

/// The same with the gather folded in: row m of the A operand is x[slots[m] / top_k] (slots: a
/// layout's sorted_slots; x [tokens, K] dense, in token order), so no expert-major copy of x is
/// written first. The stream paths and the wgmma path read their rows through `slots`; the mma
/// path cannot (cudaErrorInvalidValue, nothing launched), nor can the wgmma path where
/// wgmma_detail::can_launch_gathered fails (cudaErrorNotSupported). A layer asks
/// grouped_gate_up_gather_pays first.
inline cudaError_t launch_grouped_gate_up_swiglu_gathered(__nv_bfloat16 const* x, std::int32_t const* slots, int top_k,
                                                          std::int64_t const* offsets, int G, std::int64_t M_total,
                                                          __nv_bfloat16 const* const* w_gate, __nv_bfloat16 const* const* w_up,
                                                          std::int64_t ld, int K, int F, __nv_bfloat16* h, cudaStream_t stream,
                                                          grouped_gemm_path path = grouped_gemm_path::automatic,
                                                          grouped_weight_maps const* maps = nullptr) {
  if (!slots) return cudaErrorInvalidValue;
  return grouped_gemm_detail::launch<2>(x, offsets, G, M_total, w_gate, w_up, ld, K, F, h, stream, path, maps,
                                        grouped_gemm_detail::row_gather{slots, top_k});
}

/// Whether the automatic choice streams the weights (decode sizes) for these host-known sizes:
/// nmat 2 for gate/up (N = F), 1 for down; `maps` as passed to the launch.
inline bool grouped_gemm_streams(int G, std::int64_t M_total, int N, int nmat, grouped_weight_maps const* maps) {
  if (maps && maps->status() != cudaSuccess) maps = nullptr;
  bool const wgmma_ok = maps && (nmat == 2 ? wgmma_detail::can_launch<true, __nv_bfloat16>(G, M_total)
                                           : wgmma_detail::can_launch<false, __nv_bfloat16>(G, M_total));
  return grouped_gemm_detail::choose(grouped_gemm_path::automatic, G, M_total, N, nmat, wgmma_ok) == grouped_gemm_path::stream;
}

/// Whether launch_grouped_gate_up_swiglu_gathered with the automatic path runs the wgmma kernel
/// with its rows gathered (the producer warpgroup loads each row with its own TMA box).
inline bool grouped_gate_up_gathers_in_wgmma(int G, std::int64_t M_total, int F, grouped_weight_maps const* maps) {
  if (maps && maps->status() != cudaSuccess) maps = nullptr;
  bool const wgmma_ok = maps && wgmma_detail::can_launch<true, __nv_bfloat16>(G, M_total);
  return grouped_gemm_detail::choose(grouped_gemm_path::automatic, G, M_total, F, 2, wgmma_ok) == grouped_gemm_path::wgmma &&
         wgmma_detail::can_launch_gathered(G, M_total);
}

/// Whether the layer folds its gather into the wgmma gate/up (grouped_gate_up_gather_pays). Off
/// until measured: 128 one-row TMA boxes a k tile may hold back a compute-bound tile more than the
/// gather kernel costs (the bench rows gate_up/gathered against gate_up/gather_then decide).
inline constexpr bool wgmma_gather_in_layer = false;

/// Whether a layer should fold its gather into gate/up (launch_grouped_gate_up_swiglu_gathered)
/// for these sizes: where the automatic choice streams and the stream is the bulk-copy kernel,
/// whose producer warp copies the rows through the slots, and (wgmma_gather_in_layer) where it
/// takes the wgmma kernel. The register-fed kernel reading rows through the slots was measured
/// slower than gather + gate/up at 16 tokens (docs/benchmarks.md, issue 4, fifth run), so there
/// the layer keeps its gather.
inline bool grouped_gate_up_gather_pays(int G, std::int64_t M_total, int F, grouped_weight_maps const* maps) {
  if (grouped_gemm_streams(G, M_total, F, 2, maps)) return stream_bulk_detail::runs<2, __nv_bfloat16>(G);
  return wgmma_gather_in_layer && grouped_gate_up_gathers_in_wgmma(G, M_total, F, maps);
}

/// y[m, n] = round(h_m . Wd[n]) for every row m < offsets[G]; w_down[g] is [N_out, F] with row
/// stride ld. h [M_total, F] bf16, y [M_total, N_out] bf16. `maps` (optional):
/// grouped_weight_maps(w_down, G, N_out, F, ld), which enables the wgmma path.
inline cudaError_t launch_grouped_down(__nv_bfloat16 const* h, std::int64_t const* offsets, int G, std::int64_t M_total,
                                       __nv_bfloat16 const* const* w_down, std::int64_t ld, int F, int N_out, __nv_bfloat16* y,
                                       cudaStream_t stream, grouped_gemm_path path = grouped_gemm_path::automatic,
                                       grouped_weight_maps const* maps = nullptr) {
  return grouped_gemm_detail::launch<1>(h, offsets, G, M_total, w_down, w_down, ld, F, N_out, y, stream, path, maps);
}

/// The same with an fp32 output (fp32 layers); y [M_total, N_out] float.
inline cudaError_t launch_grouped_down(__nv_bfloat16 const* h, std::int64_t const* offsets, int G, std::int64_t M_total,
                                       __nv_bfloat16 const* const* w_down, std::int64_t ld, int F, int N_out, float* y, cudaStream_t stream,
                                       grouped_gemm_path path = grouped_gemm_path::automatic, grouped_weight_maps const* maps = nullptr) {
  return grouped_gemm_detail::launch<1>(h, offsets, G, M_total, w_down, w_down, ld, F, N_out, y, stream, path, maps);
}

}  // namespace specmoe::kernels
