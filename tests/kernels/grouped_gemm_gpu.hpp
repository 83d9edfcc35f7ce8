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
enum class path { automatic, stream, mma, wgmma };

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
cudaError_t down(void const* h, std::int64_t const* offsets, int G, std::int64_t M_total, void const* const* w_down, std::int64_t ld,
                 int F, int N, void* y_bf16, cudaStream_t stream, path p, weight_maps const* maps);
cudaError_t down_f32(void const* h, std::int64_t const* offsets, int G, std::int64_t M_total, void const* const* w_down,
                     std::int64_t ld, int F, int N, float* y, cudaStream_t stream, path p, weight_maps const* maps);
std::size_t workspace_bytes(int G, std::int64_t M_total);

}  // namespace gg_test
