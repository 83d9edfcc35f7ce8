// bench/gpu_bench_support.cuh: what every GPU benchmark needs, measured the same way everywhere.
//
//   SPECMOE_BENCH_CUDA(call)        exit with the call and CUDA's message on failure
//   random_device_bf16(n, seed, s)  device buffer of uniform [-s, s) bf16 (hash-filled on the device)
//   measured_ceilings()             once per process: HBM copy bandwidth (1 GiB D2D, read + write
//                                   bytes) and the bf16 GEMM rate (cuBLAS 8192^3), each the median of
//                                   7 runs; printed to stderr and added to the JSON context
//   l2_flush(stream)                overwrites a 256 MiB buffer so the next launch starts with a cold L2
//   time_graph_us(exec, stream, f)  one replay of a CUDA graph between events, after an L2 flush if f
#pragma once

#include <benchmark/benchmark.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace specmoe_bench {

#define SPECMOE_BENCH_CUDA(call)                                                                               \
  do {                                                                                                         \
    cudaError_t const e_ = (call);                                                                             \
    if (e_ != cudaSuccess) {                                                                                   \
      std::fprintf(stderr, "%s failed: %s (%s:%d)\n", #call, cudaGetErrorString(e_), __FILE__, __LINE__);      \
      std::exit(1);                                                                                            \
    }                                                                                                          \
  } while (0)

static __global__ void fill_random_kernel(__nv_bfloat16* p, std::size_t n, std::uint64_t seed, float scale) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    std::uint64_t z = (i + 1) * 0x9e3779b97f4a7c15ull ^ (seed * 0xd1b54a32d192ed03ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    float const u = static_cast<float>(z >> 40) / static_cast<float>(1ull << 24) * 2.0f - 1.0f;
    p[i] = __float2bfloat16(u * scale);
  }
}

inline void fill_random(__nv_bfloat16* p, std::size_t n, std::uint64_t seed, float scale, cudaStream_t stream = nullptr) {
  fill_random_kernel<<<1024, 256, 0, stream>>>(p, n, seed, scale);
  SPECMOE_BENCH_CUDA(cudaGetLastError());
}

inline __nv_bfloat16* random_device_bf16(std::size_t n, std::uint64_t seed, float scale) {
  __nv_bfloat16* p = nullptr;
  SPECMOE_BENCH_CUDA(cudaMalloc(&p, n * sizeof(__nv_bfloat16)));
  fill_random(p, n, seed, scale);
  return p;
}

struct ceilings {
  double hbm_bytes_per_s = 0;   // device-to-device copy: read + write bytes per second
  double gemm_flops_per_s = 0;  // one large bf16 cublasGemmEx
};

inline ceilings const& measured_ceilings() {
  static ceilings const c = [] {
    ceilings r;
    cudaEvent_t e0, e1;
    SPECMOE_BENCH_CUDA(cudaEventCreate(&e0));
    SPECMOE_BENCH_CUDA(cudaEventCreate(&e1));
    // median of 7 single runs: robust to one slow outlier, same recipe for both ceilings
    auto median_ms = [&](auto&& run) {
      run();  // warm-up
      float t[7];
      for (float& ms : t) {
        SPECMOE_BENCH_CUDA(cudaEventRecord(e0));
        run();
        SPECMOE_BENCH_CUDA(cudaEventRecord(e1));
        SPECMOE_BENCH_CUDA(cudaEventSynchronize(e1));
        SPECMOE_BENCH_CUDA(cudaEventElapsedTime(&ms, e0, e1));
      }
      std::sort(t, t + 7);
      return static_cast<double>(t[3]);
    };
    std::size_t const bytes = std::size_t{1} << 30;
    void *a = nullptr, *b = nullptr;
    SPECMOE_BENCH_CUDA(cudaMalloc(&a, bytes));
    SPECMOE_BENCH_CUDA(cudaMalloc(&b, bytes));
    SPECMOE_BENCH_CUDA(cudaMemset(a, 1, bytes));
    double ms = median_ms([&] { SPECMOE_BENCH_CUDA(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice)); });
    r.hbm_bytes_per_s = 2.0 * static_cast<double>(bytes) / (ms * 1e-3);
    cudaFree(a);
    cudaFree(b);
    int const n = 8192;
    auto* x = random_device_bf16(std::size_t{1} * n * n, 1, 1.0f);
    auto* y = random_device_bf16(std::size_t{1} * n * n, 2, 1.0f);
    auto* z = random_device_bf16(std::size_t{1} * n * n, 3, 1.0f);
    cublasHandle_t h;
    if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) std::exit(1);
    float const one = 1.0f, zero = 0.0f;
    ms = median_ms([&] {
      if (cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, n, n, n, &one, x, CUDA_R_16BF, n, y, CUDA_R_16BF, n, &zero, z,
                       CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS) {
        std::fprintf(stderr, "cublasGemmEx failed while measuring the GEMM rate\n");
        std::exit(1);
      }
    });
    r.gemm_flops_per_s = 2.0 * n * static_cast<double>(n) * n / (ms * 1e-3);
    cublasDestroy(h);
    cudaFree(x);
    cudaFree(y);
    cudaFree(z);
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    std::fprintf(stderr, "ceilings: HBM copy %.3f TB/s (read + write), bf16 GEMM %.1f TFLOP/s\n",
                 r.hbm_bytes_per_s / 1e12, r.gemm_flops_per_s / 1e12);
    benchmark::AddCustomContext("hbm_copy_TBps", std::to_string(r.hbm_bytes_per_s * 1e-12));
    benchmark::AddCustomContext("bf16_gemm_TFLOPs", std::to_string(r.gemm_flops_per_s * 1e-12));
    return r;
  }();
  return c;
}

/// max(bytes / HBM bandwidth, flops / GEMM rate) in seconds.
inline double floor_seconds(double bytes, double flops) {
  auto const& c = measured_ceilings();
  double const t_bytes = bytes / c.hbm_bytes_per_s, t_flops = flops / c.gemm_flops_per_s;
  return t_bytes > t_flops ? t_bytes : t_flops;
}

inline void l2_flush(cudaStream_t stream) {
  static std::size_t const bytes = std::size_t{256} << 20;
  static void* buffer = [] {
    void* p = nullptr;
    SPECMOE_BENCH_CUDA(cudaMalloc(&p, bytes));
    return p;
  }();
  static int value = 0;
  SPECMOE_BENCH_CUDA(cudaMemsetAsync(buffer, ++value & 0x7f, bytes, stream));
}

/// Microseconds of `reps` back-to-back replays of `exec` divided by reps, after an L2 flush if asked.
inline double time_graph_us(cudaGraphExec_t exec, cudaStream_t stream, bool flush_l2, int reps = 1) {
  static cudaEvent_t e0 = nullptr, e1 = nullptr;
  if (!e0) {
    SPECMOE_BENCH_CUDA(cudaEventCreate(&e0));
    SPECMOE_BENCH_CUDA(cudaEventCreate(&e1));
  }
  if (flush_l2) l2_flush(stream);
  SPECMOE_BENCH_CUDA(cudaEventRecord(e0, stream));
  for (int i = 0; i < reps; ++i) SPECMOE_BENCH_CUDA(cudaGraphLaunch(exec, stream));
  SPECMOE_BENCH_CUDA(cudaEventRecord(e1, stream));
  SPECMOE_BENCH_CUDA(cudaEventSynchronize(e1));
  float ms = 0;
  SPECMOE_BENCH_CUDA(cudaEventElapsedTime(&ms, e0, e1));
  return static_cast<double>(ms) * 1e3 / reps;
}

/// Captures what `enqueue(stream)` launches into an instantiated graph.
template <class Enqueue>
cudaGraphExec_t capture(cudaStream_t stream, Enqueue&& enqueue) {
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  SPECMOE_BENCH_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  enqueue(stream);
  SPECMOE_BENCH_CUDA(cudaStreamEndCapture(stream, &graph));
  SPECMOE_BENCH_CUDA(cudaGraphInstantiate(&exec, graph, 0));
  SPECMOE_BENCH_CUDA(cudaGraphDestroy(graph));
  return exec;
}

}  // namespace specmoe_bench
