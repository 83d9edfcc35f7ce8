// The kernels around the expert GEMMs, each alone, on the issue-4 shapes: gate (logits -> top-k),
// layout (both paths), gather (permute) and combine (weighted un-permute).
//
//   specmoe_kernels_routing_kernels_bench --benchmark_out=routing.json --benchmark_out_format=json
//
// Rows: <kernel>/<shape>/<tokens> (layout: the automatic choice, layout_single_block /
//   layout_counting / layout_device_sort: each layout path forced; gate: the
//   automatic choice, gate_warp / gate_block: each gate kernel forced).
//   shape: mixtral (8 experts, top-2, H 4096), qwen3 (128, top-8, H 2048), dsv3 (256, grouped
//   sigmoid top-8, H 7168).
// launch_cost/<node>: what one node of a layer's graph costs before it does any work: 16 chained
//   nodes in one graph (kernel: 132 blocks that only bump a counter; kernel_pdl: the same launched
//   with programmatic dependent launch, waiting at its start; kernel_pdl_trigger: also releasing
//   its dependent right after; memcpy16 / memset16: the 16-byte status reset as a copy or a set),
//   time per node.
// router_logits/<shape>/<tokens> (1-16 tokens): the router's logits by the block-per-expert kernel
//   (kernels/router_logits.cuh), beside router_gemm/<shape>/<tokens>: the same product by
//   cublasGemmEx as the layer runs it above router_logits_max_tokens (the measurement that sets
//   that bound).
// decode_routing/<shape>/<tokens> (1-16 tokens): router logits, gate and layout of a decode step in
//   one launch (kernels/decode_routing.cuh), beside routing_chain/<shape>/<tokens>: the same three
//   as separate launches with the status reset before them, as the layer ran them before.
// Each row is one step captured in a CUDA graph and replayed 20 times back to back (data stay in
// L2 where they fit, as inside the layer): the time per step includes the launch gaps the layer
// pays. Counters: GBps = bytes the step must move / time; x_floor = time / (bytes / HBM copy
// bandwidth), the copy bandwidth measured at start.
#include "gpu_bench_support.cuh"

#include <specmoe/core/moe_config.hpp>
#include <specmoe/kernels/combine.cuh>
#include <specmoe/kernels/decode_routing.cuh>
#include <specmoe/kernels/gate.cuh>
#include <specmoe/kernels/layout.cuh>
#include <specmoe/kernels/permute.cuh>

#include <benchmark/benchmark.h>
#include <cublas_v2.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

namespace {

using namespace specmoe;
namespace sb = specmoe_bench;

moe_config shape(int which) {
  return which == 0 ? models::mixtral_8x7b() : which == 1 ? models::qwen3_30b_a3b() : models::deepseek_v3();
}

template <class T>
T* device_alloc(std::size_t n) {
  T* p = nullptr;
  SPECMOE_BENCH_CUDA(cudaMalloc(&p, std::max<std::size_t>(n, 1) * sizeof(T)));
  return p;
}

/// Everything one shape at n tokens needs, with a realistic routing from the real gate kernel.
struct fixture {
  moe_config cfg;
  long long n;
  float* logits;
  float* bias = nullptr;
  std::int32_t* ids;
  float* weights;
  kernels::layout_buffers layout{};
  kernels::device_status* status;
  __nv_bfloat16* x;
  __nv_bfloat16* xp;
  __nv_bfloat16* out;
  cudaStream_t stream;

  fixture(int which, long long tokens) : cfg(shape(which)), n(tokens) {
    auto const E = cfg.num_experts, k = cfg.top_k, H = cfg.hidden_size;
    auto const slots = static_cast<std::size_t>(n) * k;
    SPECMOE_BENCH_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    std::mt19937 rng(static_cast<unsigned>(which * 100000 + n));
    std::normal_distribution<float> normal(0.0f, 2.0f);
    std::vector<float> h_logits(static_cast<std::size_t>(n) * E);
    for (auto& v : h_logits) v = normal(rng);
    logits = device_alloc<float>(h_logits.size());
    SPECMOE_BENCH_CUDA(cudaMemcpy(logits, h_logits.data(), h_logits.size() * 4, cudaMemcpyHostToDevice));
    if (cfg.gate.has_score_bias) {
      std::vector<float> b(static_cast<std::size_t>(E));
      for (auto& v : b) v = 0.01f * normal(rng);
      bias = device_alloc<float>(b.size());
      SPECMOE_BENCH_CUDA(cudaMemcpy(bias, b.data(), b.size() * 4, cudaMemcpyHostToDevice));
    }
    ids = device_alloc<std::int32_t>(slots);
    weights = device_alloc<float>(slots);
    layout.keys_in = device_alloc<std::int32_t>(slots);
    layout.keys_out = device_alloc<std::int32_t>(slots);
    layout.vals_in = device_alloc<std::int32_t>(slots);
    layout.sorted_slots = device_alloc<std::int32_t>(slots);
    layout.position = device_alloc<std::int32_t>(slots);
    layout.offsets = device_alloc<std::int64_t>(static_cast<std::size_t>(E) + 1);
    layout.sort_temp_bytes = kernels::layout_sort_temp_bytes(static_cast<long long>(slots), E);
    layout.sort_temp = device_alloc<std::byte>(layout.sort_temp_bytes);
    status = device_alloc<kernels::device_status>(1);
    SPECMOE_BENCH_CUDA(cudaMemset(status, 0, sizeof(kernels::device_status)));
    x = sb::random_device_bf16(static_cast<std::size_t>(n) * H, 5, 1.0f);
    xp = sb::random_device_bf16(slots * H, 6, 1.0f);
    out = device_alloc<__nv_bfloat16>(static_cast<std::size_t>(n) * H);
    // the routing and layout every later step reads
    SPECMOE_BENCH_CUDA(kernels::launch_topk_gate(logits, n, kernels::gate_params::from(cfg, bias), ids, weights, status, stream));
    SPECMOE_BENCH_CUDA(kernels::launch_layout(ids, weights, n, k, E, layout, status, stream));
    SPECMOE_BENCH_CUDA(cudaStreamSynchronize(stream));
  }
  ~fixture() {
    for (void* p : {static_cast<void*>(logits), static_cast<void*>(bias), static_cast<void*>(ids), static_cast<void*>(weights),
                    static_cast<void*>(layout.keys_in), static_cast<void*>(layout.keys_out), static_cast<void*>(layout.vals_in),
                    static_cast<void*>(layout.sorted_slots), static_cast<void*>(layout.position), static_cast<void*>(layout.offsets),
                    layout.sort_temp, static_cast<void*>(status), static_cast<void*>(x), static_cast<void*>(xp), static_cast<void*>(out)}) {
      cudaFree(p);
    }
    cudaStreamDestroy(stream);
  }
};

template <class Enqueue>
void run(benchmark::State& state, fixture& f, double bytes, Enqueue&& enqueue) {
  auto exec = sb::capture(f.stream, enqueue);
  sb::time_graph_us(exec, f.stream, false, 3);  // warm-up
  for (auto _ : state) state.SetIterationTime(sb::time_graph_us(exec, f.stream, false, 20) * 1e-6);
  kernels::device_status s{};
  SPECMOE_BENCH_CUDA(cudaMemcpy(&s, f.status, sizeof s, cudaMemcpyDeviceToHost));
  if (s.bits != 0) state.SkipWithError("a kernel flagged the input");
  state.counters["GBps"] = benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["x_floor"] = benchmark::Counter(bytes / sb::measured_ceilings().hbm_bytes_per_s,
                                                 benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
  cudaGraphExecDestroy(exec);
}

void gate(benchmark::State& state, int which, kernels::gate_path path) {
  fixture f(which, state.range(0));
  auto const slots = static_cast<double>(f.n) * f.cfg.top_k;
  double const bytes = static_cast<double>(f.n) * f.cfg.num_experts * 4 + slots * 8;
  auto const p = kernels::gate_params::from(f.cfg, f.bias);
  run(state, f, bytes, [&](cudaStream_t s) {
    SPECMOE_BENCH_CUDA(kernels::launch_topk_gate(f.logits, f.n, p, f.ids, f.weights, f.status, s, path));
  });
}

// One node of the launch_cost chains: waits for its predecessor when launched with programmatic
// dependent launch (a no-op otherwise), then bumps a counter (read-modify-write: a node that ran
// early would lose counts).
__global__ void chain_kernel(int* counter, int trigger) {
  asm volatile("griddepcontrol.wait;" ::: "memory");
  if (trigger) asm volatile("griddepcontrol.launch_dependents;");
  if (blockIdx.x == 0 && threadIdx.x == 0) *counter += 1;
}

enum class node_kind { kernel, kernel_pdl, kernel_pdl_trigger, memcpy16, memset16 };

void launch_cost(benchmark::State& state, node_kind kind) {
  constexpr int nodes = 16, reps = 20;
  cudaStream_t stream;
  SPECMOE_BENCH_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  int* counter = device_alloc<int>(1);
  auto* a = device_alloc<kernels::device_status>(1);
  auto* b = device_alloc<kernels::device_status>(1);
  SPECMOE_BENCH_CUDA(cudaMemset(counter, 0, sizeof(int)));
  // Failures skip the row instead of ending the process (programmatic launch is the experiment).
  cudaError_t err = cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal);
  for (int i = 0; i < nodes && err == cudaSuccess; ++i) {
    if (kind == node_kind::memcpy16) {
      err = cudaMemcpyAsync(a, b, sizeof(kernels::device_status), cudaMemcpyDeviceToDevice, stream);
    } else if (kind == node_kind::memset16) {
      err = cudaMemsetAsync(a, 0, sizeof(kernels::device_status), stream);
    } else {
      cudaLaunchAttribute attr{};
      attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
      attr.val.programmaticStreamSerializationAllowed = 1;
      cudaLaunchConfig_t cfg{};
      cfg.gridDim = dim3(132);
      cfg.blockDim = dim3(128);
      cfg.stream = stream;
      cfg.attrs = &attr;
      cfg.numAttrs = kind == node_kind::kernel ? 0 : 1;
      err = cudaLaunchKernelEx(&cfg, chain_kernel, counter, kind == node_kind::kernel_pdl_trigger ? 1 : 0);
    }
  }
  cudaGraph_t graph = nullptr;
  cudaError_t const end = cudaStreamEndCapture(stream, &graph);
  if (err == cudaSuccess) err = end;
  cudaGraphExec_t exec = nullptr;
  if (err == cudaSuccess) err = cudaGraphInstantiate(&exec, graph, 0);
  if (graph) cudaGraphDestroy(graph);
  if (err != cudaSuccess) {
    state.SkipWithError(cudaGetErrorString(err));
    for (auto _ : state) {
    }
  } else {
    sb::time_graph_us(exec, stream, false, 3);  // warm-up
    long long replays = 3;
    for (auto _ : state) {
      state.SetIterationTime(sb::time_graph_us(exec, stream, false, reps) / nodes * 1e-6);
      replays += reps;
    }
    int count = 0;
    SPECMOE_BENCH_CUDA(cudaMemcpy(&count, counter, sizeof count, cudaMemcpyDeviceToHost));
    bool const is_kernel = kind != node_kind::memcpy16 && kind != node_kind::memset16;
    if (is_kernel && count != replays * nodes) state.SkipWithError("the chained kernels lost counts (ran out of order)");
    cudaGraphExecDestroy(exec);
  }
  cudaFree(counter);
  cudaFree(a);
  cudaFree(b);
  cudaStreamDestroy(stream);
}

void layout(benchmark::State& state, int which, kernels::layout_path path) {
  fixture f(which, state.range(0));
  auto const slots = static_cast<double>(f.n) * f.cfg.top_k;
  if ((path == kernels::layout_path::single_block && slots > kernels::layout_single_block_max_slots) ||
      (path == kernels::layout_path::counting && !kernels::layout_counting_fits(f.n * f.cfg.top_k, f.cfg.num_experts))) {
    state.SkipWithError("more slots than the single-block path takes, or too few for the counting path");
    for (auto _ : state) {
    }
    return;
  }
  double const bytes = slots * (4 + 4 + 4 + 4) + (f.cfg.num_experts + 1) * 8.0;  // ids, weights in; order, inverse out
  run(state, f, bytes, [&](cudaStream_t s) {
    SPECMOE_BENCH_CUDA(kernels::launch_layout(f.ids, f.weights, f.n, f.cfg.top_k, f.cfg.num_experts, f.layout, f.status, s, path));
  });
}

void gather(benchmark::State& state, int which) {
  fixture f(which, state.range(0));
  auto const H = f.cfg.hidden_size, k = f.cfg.top_k;
  auto const rows = f.n * k;
  double const bytes = static_cast<double>(rows) * H * 2 * 2;  // read (at least once) and write each row
  run(state, f, bytes, [&](cudaStream_t s) {
    SPECMOE_BENCH_CUDA(kernels::launch_gather_rows(f.x, H, H, f.layout.sorted_slots, k, f.layout.offsets + f.cfg.num_experts, rows, f.xp, s));
  });
}

void combine(benchmark::State& state, int which) {
  fixture f(which, state.range(0));
  auto const H = f.cfg.hidden_size, k = f.cfg.top_k;
  double const bytes = static_cast<double>(f.n) * k * H * 2 + static_cast<double>(f.n) * H * 2;
  run(state, f, bytes, [&](cudaStream_t s) {
    SPECMOE_BENCH_CUDA(kernels::launch_combine(f.xp, f.layout.position, f.weights, f.n, k, H, nullptr, 0, f.out, H, f.status, s));
  });
}

/// The decode step's routing from x: fused (one launch) or as the chain of three plus the reset.
void decode_routing(benchmark::State& state, int which, bool fused) {
  fixture f(which, state.range(0));
  auto const E = f.cfg.num_experts, H = f.cfg.hidden_size, k = f.cfg.top_k;
  auto const p = kernels::gate_params::from(f.cfg, f.bias);
  auto* router = sb::random_device_bf16(static_cast<std::size_t>(E) * H, 7, 0.05f);
  auto* arrivals = device_alloc<unsigned>(1);
  auto* clean = device_alloc<kernels::device_status>(1);
  SPECMOE_BENCH_CUDA(cudaMemset(arrivals, 0, sizeof(unsigned)));
  SPECMOE_BENCH_CUDA(cudaMemset(clean, 0, sizeof(kernels::device_status)));
  if (!kernels::decode_routing_supported(router, H, H, f.x, f.n, p)) {
    state.SkipWithError("outside the fused routing's range");
    for (auto _ : state) {
    }
  } else {
    double const bytes = static_cast<double>(E) * H * 2 + static_cast<double>(f.n) * H * 2;  // router and x read once
    run(state, f, bytes, [&](cudaStream_t s) {
      if (fused) {
        SPECMOE_BENCH_CUDA(kernels::launch_decode_routing(router, H, H, f.x, f.n, f.logits, p, f.ids, f.weights, f.layout, f.status,
                                                          arrivals, s));
      } else {
        SPECMOE_BENCH_CUDA(cudaMemcpyAsync(f.status, clean, sizeof(kernels::device_status), cudaMemcpyDeviceToDevice, s));
        SPECMOE_BENCH_CUDA(kernels::launch_router_logits(router, H, E, H, f.x, f.n, f.logits, s));
        SPECMOE_BENCH_CUDA(kernels::launch_topk_gate(f.logits, f.n, p, f.ids, f.weights, f.status, s));
        SPECMOE_BENCH_CUDA(kernels::launch_layout(f.ids, f.weights, f.n, k, E, f.layout, f.status, s));
      }
    });
  }
  cudaFree(router);
  cudaFree(arrivals);
  cudaFree(clean);
}

/// The router's logits of n tokens: the block-per-expert kernel, or cuBLAS as the layer calls it.
void router(benchmark::State& state, int which, bool gemm) {
  fixture f(which, state.range(0));
  auto const E = f.cfg.num_experts, H = f.cfg.hidden_size;
  auto* w = sb::random_device_bf16(static_cast<std::size_t>(E) * H, 7, 0.05f);
  cublasHandle_t handle = nullptr;
  if (gemm && cublasCreate(&handle) != CUBLAS_STATUS_SUCCESS) {
    state.SkipWithError("cublasCreate failed");
    for (auto _ : state) {
    }
    cudaFree(w);
    return;
  }
  if (handle) cublasSetStream(handle, f.stream);
  double const bytes = static_cast<double>(E) * H * 2 + static_cast<double>(f.n) * H * 2;  // router and x read once
  run(state, f, bytes, [&](cudaStream_t s) {
    if (gemm) {
      float const one = 1.0f, zero = 0.0f;
      if (cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, E, static_cast<int>(f.n), H, &one, w, CUDA_R_16BF, H, f.x, CUDA_R_16BF, H,
                       &zero, f.logits, CUDA_R_32F, E, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS) {
        std::fprintf(stderr, "cublasGemmEx failed\n");
        std::exit(1);
      }
    } else {
      SPECMOE_BENCH_CUDA(kernels::launch_router_logits(w, H, E, H, f.x, f.n, f.logits, s));
    }
  });
  if (handle) cublasDestroy(handle);
  cudaFree(w);
}

void register_all() {
  char const* names[] = {"mixtral", "qwen3", "dsv3"};
  for (int w = 0; w < 3; ++w) {
    auto add = [&](std::string const& name, auto fn) {
      auto* b = benchmark::RegisterBenchmark((name + "/" + names[w]).c_str(), fn);
      for (long long t : {1, 16, 128, 1024, 8192}) b->Arg(t);
      b->UseManualTime()->Unit(benchmark::kMicrosecond);
    };
    add("gate", [w](benchmark::State& s) { gate(s, w, kernels::gate_path::automatic); });
    add("gate_warp", [w](benchmark::State& s) { gate(s, w, kernels::gate_path::warp_per_token); });
    add("gate_block", [w](benchmark::State& s) { gate(s, w, kernels::gate_path::block_per_token); });
    add("layout", [w](benchmark::State& s) { layout(s, w, kernels::layout_path::automatic); });
    add("layout_single_block", [w](benchmark::State& s) { layout(s, w, kernels::layout_path::single_block); });
    add("layout_counting", [w](benchmark::State& s) { layout(s, w, kernels::layout_path::counting); });
    add("layout_device_sort", [w](benchmark::State& s) { layout(s, w, kernels::layout_path::device_sort); });
    add("gather", [w](benchmark::State& s) { gather(s, w); });
    add("combine", [w](benchmark::State& s) { combine(s, w); });
    for (bool const gemm : {false, true}) {
      auto* b = benchmark::RegisterBenchmark((std::string(gemm ? "router_gemm/" : "router_logits/") + names[w]).c_str(),
                                             [w, gemm](benchmark::State& s) { router(s, w, gemm); });
      for (long long t : {1, 2, 4, 8, 16}) b->Arg(t);
      b->UseManualTime()->Unit(benchmark::kMicrosecond);
    }
    for (bool const fused : {true, false}) {
      auto* b = benchmark::RegisterBenchmark((std::string(fused ? "decode_routing/" : "routing_chain/") + names[w]).c_str(),
                                             [w, fused](benchmark::State& s) { decode_routing(s, w, fused); });
      for (long long t : {1, 2, 4, 8, 16}) b->Arg(t);
      b->UseManualTime()->Unit(benchmark::kMicrosecond);
    }
  }
  std::pair<char const*, node_kind> const kinds[] = {{"kernel", node_kind::kernel},
                                                     {"kernel_pdl", node_kind::kernel_pdl},
                                                     {"kernel_pdl_trigger", node_kind::kernel_pdl_trigger},
                                                     {"memcpy16", node_kind::memcpy16},
                                                     {"memset16", node_kind::memset16}};
  for (auto const& nk : kinds) {
    node_kind const kind = nk.second;
    benchmark::RegisterBenchmark((std::string("launch_cost/") + nk.first).c_str(),
                                 [kind](benchmark::State& s) { launch_cost(s, kind); })
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
  }
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  sb::measured_ceilings();
  register_all();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
