// tests/kernels/grouped_gemm_gpu.hpp: the grouped-GEMM launches behind a plain C++ interface, so the
// Catch2 test (grouped_gemm_gpu_test.cpp) is compiled by the host compiler; the kernels live in
// grouped_gemm_gpu.cu, which includes no Catch2 (see tests/CMakeLists.txt for why).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <memory>

namespace gg_test {

/// Mirrors specmoe::kernels::grouped_gemm_path.
enum class path { automatic, stream, mma, wgmma, stream_registers };

/// specmoe::kernels::grouped_weight_maps, opaque here.
struct weight_maps;
struct weight_maps_deleter {
  void operator()(weight_maps* m) const noexcept;
};
using weight_maps_ptr = std::unique_ptr<weight_maps, weight_maps_deleter>;

/// Device pointers are bf16 (`void` here). Tables: host arrays of G device pointers.
weight_maps_ptr make_gate_up_maps(void const* const* w_gate, void const* const* w_up, int G, std::int64_t rows, int K, std::int64_t ld);
weight_maps_ptr make_down_maps(void const* const* w, int G, std::int64_t rows, int K, std::int64_t ld);
weight_maps_ptr make_empty_maps();
cudaError_t maps_status(weight_maps const* m);

cudaError_t gate_up(void const* x, std::int64_t const* offsets, int G, std::int64_t M_total, void const* const* w_gate,
                    void const* const* w_up, std::int64_t ld, int K, int F, void* h, cudaStream_t stream, path p,
                    weight_maps const* maps);
/// gate_up with the gather folded in: A row m is x[slots[m] / top_k].
cudaError_t gate_up_gathered(void const* x, std::int32_t const* slots, int top_k, std::int64_t const* offsets, int G,
                             std::int64_t M_total, void const* const* w_gate, void const* const* w_up, std::int64_t ld, int K, int F,
                             void* h, cudaStream_t stream, path p, weight_maps const* maps);
/// Whether `stream` runs the bulk-copy kernel for G groups here (gate/up: nmat 2; down: 1, bf16 out).
bool stream_bulk_runs(int G, int nmat);
/// Whether the bulk-copy kernel (gate/up: nmat 2; down: 1, bf16 out) may take G groups' shared
/// memory on this device: true only once its launch path has set the attribute, right before its
/// first launch in this process (evidence that the path was taken, not only that it could be; the
/// attribute then stays set, so later calls prove no more than the first).
bool stream_bulk_launched_for(int G, int nmat);
/// specmoe::kernels::grouped_gemm_streams.
bool gemm_streams(int G, std::int64_t M_total, int N, int nmat, weight_maps const* maps);
cudaError_t down(void const* h, std::int64_t const* offsets, int G, std::int64_t M_total, void const* const* w_down, std::int64_t ld,
                 int F, int N, void* y_bf16, cudaStream_t stream, path p, weight_maps const* maps);
cudaError_t down_f32(void const* h, std::int64_t const* offsets, int G, std::int64_t M_total, void const* const* w_down,
                     std::int64_t ld, int F, int N, float* y, cudaStream_t stream, path p, weight_maps const* maps);
std::size_t workspace_bytes(int G, std::int64_t M_total);
/// The wgmma kernels with their bf16 epilogue forced: staged (rows through shared memory and bulk
/// copies) or direct (stores from the registers); cudaErrorNotSupported where staged does not fit.
cudaError_t gate_up_wgmma(void const* x, std::int64_t const* offsets, int G, std::int64_t M_total, int K, int F, void* h,
                          weight_maps const* maps, bool staged);
cudaError_t down_wgmma(void const* h, std::int64_t const* offsets, int G, std::int64_t M_total, int F, int N, void* y_bf16,
                       weight_maps const* maps, bool staged);
/// gate_up_wgmma with the gather folded in: row m of A is x[slots[m] / top_k].
cudaError_t gate_up_wgmma_gathered(void const* x, std::int32_t const* slots, int top_k, std::int64_t const* offsets, int G,
                                  std::int64_t M_total, int K, int F, void* h, weight_maps const* maps, bool staged);
/// specmoe::kernels::wgmma_gather_in_layer.
extern bool const wgmma_gather_in_layer;
/// specmoe::kernels::grouped_gate_up_gather_pays.
bool gate_up_gather_pays(int G, std::int64_t M_total, int F, weight_maps const* maps);

/// specmoe::kernels::decode_expert_ffn_args with opaque bf16 pointers.
struct decode_ffn_args {
  void const* x = nullptr;
  std::int32_t const* slots = nullptr;
  int top_k = 1;
  std::int64_t const* offsets = nullptr;
  int G = 0;
  std::int64_t M_total = 0;
  void const* const* w_gate = nullptr;
  void const* const* w_up = nullptr;
  std::int64_t gate_up_ld = 0;
  void const* const* w_down = nullptr;
  std::int64_t down_ld = 0;
  int K = 0, F = 0, N = 0;
  void* h = nullptr;
};
cudaError_t decode_ffn(decode_ffn_args const& a, void* y_bf16, unsigned* sync, cudaStream_t stream, bool one_row_chunks);
cudaError_t decode_ffn_f32(decode_ffn_args const& a, float* y, unsigned* sync, cudaStream_t stream, bool one_row_chunks);
std::size_t decode_ffn_sync_words(int G);

}  // namespace gg_test
