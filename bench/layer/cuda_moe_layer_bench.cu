// The whole cuda_space layer for published shapes, replayed from a CUDA graph, beside the floor
// measured in the same run: max(activated expert weight bytes / HBM bandwidth, FLOPs / bf16 GEMM rate).
//
//   specmoe_layer_cuda_moe_layer_bench --benchmark_out=layer.json --benchmark_out_format=json
//
// Args: tokens. Weights are random (hash-filled on the device), routing is the layer's own gate.
// Counters: floor_us, x_floor (time / floor), experts_hit, TFLOPs, weight_GBps.
#include <specmoe/layer/cuda_moe_layer.cuh>

#include <benchmark/benchmark.h>
#include <cublas_v2.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <set>
#include <vector>

namespace {

using namespace specmoe;

#define BENCH_CUDA(call)                                                                          \
  do {                                                                                            \
    cudaError_t const e_ = (call);                                                                \
    if (e_ != cudaSuccess) {                                                                      \
      std::fprintf(stderr, "%s failed: %s (%s:%d)\n", #call, cudaGetErrorString(e_), __FILE__, __LINE__); \
      std::exit(1);                                                                               \
    }                                                                                             \
  } while (0)

__global__ void fill_kernel(__nv_bfloat16* p, std::size_t n, std::uint64_t seed, float scale) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    std::uint64_t z = (i + 1) * 0x9e3779b97f4a7c15ull ^ seed;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    float const u = static_cast<float>(z >> 40) / static_cast<float>(1ull << 24) * 2.0f - 1.0f;
    p[i] = __float2bfloat16(u * scale);
  }
}

__nv_bfloat16* random_device(std::size_t n, std::uint64_t seed, float scale) {
  __nv_bfloat16* p = nullptr;
  BENCH_CUDA(cudaMalloc(&p, n * sizeof(__nv_bfloat16)));
  fill_kernel<<<1024, 256>>>(p, n, seed, scale);
  BENCH_CUDA(cudaGetLastError());
  return p;
}

struct ceilings {
  double hbm_bytes_per_s = 0;   // device-to-device copy: read + write bytes per second
  double gemm_flops_per_s = 0;  // one large bf16 cublasGemmEx
};

ceilings const& measured() {
  static ceilings const c = [] {
    ceilings r;
    std::size_t const bytes = std::size_t{1} << 30;
    void *a = nullptr, *b = nullptr;
    BENCH_CUDA(cudaMalloc(&a, bytes));
    BENCH_CUDA(cudaMalloc(&b, bytes));
    cudaEvent_t e0, e1;
    BENCH_CUDA(cudaEventCreate(&e0));
    BENCH_CUDA(cudaEventCreate(&e1));
    BENCH_CUDA(cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice));
    BENCH_CUDA(cudaEventRecord(e0));
    for (int i = 0; i < 10; ++i) BENCH_CUDA(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice));
    BENCH_CUDA(cudaEventRecord(e1));
    BENCH_CUDA(cudaEventSynchronize(e1));
    float ms = 0;
    BENCH_CUDA(cudaEventElapsedTime(&ms, e0, e1));
    r.hbm_bytes_per_s = 2.0 * 10 * static_cast<double>(bytes) / (ms * 1e-3);
    cudaFree(a);
    cudaFree(b);
    int const n = 8192;
    auto* x = random_device(std::size_t{1} * n * n, 1, 1.0f);
    auto* y = random_device(std::size_t{1} * n * n, 2, 1.0f);
    auto* z = random_device(std::size_t{1} * n * n, 3, 1.0f);
    cublasHandle_t h;
    cublasCreate(&h);
    float const one = 1.0f, zero = 0.0f;
    auto gemm = [&] {
      cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, n, n, n, &one, x, CUDA_R_16BF, n, y, CUDA_R_16BF, n, &zero, z,
                   CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    };
    gemm();
    BENCH_CUDA(cudaEventRecord(e0));
    for (int i = 0; i < 10; ++i) gemm();
    BENCH_CUDA(cudaEventRecord(e1));
    BENCH_CUDA(cudaEventSynchronize(e1));
    BENCH_CUDA(cudaEventElapsedTime(&ms, e0, e1));
    r.gemm_flops_per_s = 10 * 2.0 * n * static_cast<double>(n) * n / (ms * 1e-3);
    cublasDestroy(h);
    cudaFree(x);
    cudaFree(y);
    cudaFree(z);
    std::fprintf(stderr, "ceilings: HBM copy %.3f TB/s, bf16 GEMM %.1f TFLOP/s\n", r.hbm_bytes_per_s / 1e12,
                 r.gemm_flops_per_s / 1e12);
    return r;
  }();
  return c;
}

// Device weights of one model shape, made once per process (DeepSeek-V3's are 22.5 GB).
struct model {
  moe_config cfg;
  std::vector<__nv_bfloat16*> buffers;
  std::vector<float> bias;
  moe_weights<bf16> weights;

  explicit model(moe_config c) : cfg(c) {
    auto const E = cfg.num_experts, H = cfg.hidden_size, F = cfg.ffn_size;
    auto make = [&](std::size_t n, float scale) {
      buffers.push_back(random_device(n, buffers.size() + 11, scale));
      return reinterpret_cast<bf16 const*>(buffers.back());
    };
    float const in_h = 2.0f / std::sqrt(static_cast<float>(H)), in_f = 2.0f / std::sqrt(static_cast<float>(F));
    weights.router.weight = matrix_view<bf16 const>(make(std::size_t(E) * H, 4.0f / std::sqrt(float(H))), E, H);
    if (cfg.gate.has_score_bias) {
      bias.assign(static_cast<std::size_t>(E), 0.0f);
      for (int e = 0; e < E; ++e) bias[static_cast<std::size_t>(e)] = 0.01f * static_cast<float>(e % 7);
      weights.router.score_bias = bias;
    }
    auto const* gate = make(std::size_t(E) * F * H, in_h);
    auto const* up = make(std::size_t(E) * F * H, in_h);
    auto const* down = make(std::size_t(E) * H * F, in_f);
    weights.experts = ffn_weights<bf16>::dense(gate, up, down, E, H, F);
    if (cfg.num_shared_experts > 0) {
      auto const S = cfg.num_shared_experts, SF = cfg.shared_ffn_size;
      auto const* sg = make(std::size_t(S) * SF * H, in_h);
      auto const* su = make(std::size_t(S) * SF * H, in_h);
      auto const* sd = make(std::size_t(S) * H * SF, 2.0f / std::sqrt(float(SF)));
      weights.shared = ffn_weights<bf16>::dense(sg, su, sd, S, H, SF);
    }
    BENCH_CUDA(cudaDeviceSynchronize());
  }
  ~model() {
    for (auto* p : buffers) cudaFree(p);
  }
};

model& get_model(int which) {
  static std::unique_ptr<model> current;
  static int current_id = -1;
  if (current_id != which) {
    current.reset();
    current = std::make_unique<model>(which == 0   ? models::mixtral_8x7b()
                                      : which == 1 ? models::qwen3_30b_a3b()
                                                   : models::deepseek_v3());
    current_id = which;
  }
  return *current;
}

void layer_bench(benchmark::State& state, int which) {
  auto& m = get_model(which);
  auto const& cfg = m.cfg;
  auto const n = state.range(0);
  auto const H = cfg.hidden_size, k = cfg.top_k;
  auto* x = random_device(static_cast<std::size_t>(n) * H, 99, 1.0f);
  __nv_bfloat16* out = nullptr;
  std::int32_t* ids = nullptr;
  float* w = nullptr;
  BENCH_CUDA(cudaMalloc(&out, static_cast<std::size_t>(n) * H * 2));
  BENCH_CUDA(cudaMalloc(&ids, static_cast<std::size_t>(n) * k * 4));
  BENCH_CUDA(cudaMalloc(&w, static_cast<std::size_t>(n) * k * 4));
  {
    moe_layer<cuda_space> layer(cfg, m.weights, {}, {.max_tokens = n});
    cuda_batch batch{matrix_view<bf16 const>(reinterpret_cast<bf16 const*>(x), n, H)};
    matrix_view<bf16> o(reinterpret_cast<bf16*>(out), n, H);
    cudaStream_t stream;
    BENCH_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    layer.forward(batch, o, stream, {ids, w});  // warm-up, checked, and the routing for the floor
    std::vector<std::int32_t> h_ids(static_cast<std::size_t>(n) * k);
    BENCH_CUDA(cudaMemcpy(h_ids.data(), ids, h_ids.size() * 4, cudaMemcpyDeviceToHost));
    std::set<int> hit(h_ids.begin(), h_ids.end());
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    BENCH_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    layer.forward_async(batch, o, stream);
    BENCH_CUDA(cudaStreamEndCapture(stream, &graph));
    BENCH_CUDA(cudaGraphInstantiate(&exec, graph, 0));
    cudaEvent_t e0, e1;
    BENCH_CUDA(cudaEventCreate(&e0));
    BENCH_CUDA(cudaEventCreate(&e1));
    for (auto _ : state) {
      BENCH_CUDA(cudaEventRecord(e0, stream));
      BENCH_CUDA(cudaGraphLaunch(exec, stream));
      BENCH_CUDA(cudaEventRecord(e1, stream));
      BENCH_CUDA(cudaEventSynchronize(e1));
      float ms = 0;
      BENCH_CUDA(cudaEventElapsedTime(&ms, e0, e1));
      state.SetIterationTime(ms * 1e-3);
    }
    layer.check(stream);
    // Floor: the activated experts' weights (plus shared and router) once, or the FLOPs at the GEMM rate.
    auto const F = static_cast<double>(cfg.ffn_size), SF = static_cast<double>(cfg.shared_ffn_size);
    double const bytes = 2.0 * (static_cast<double>(hit.size()) * 3 * H * F + cfg.num_shared_experts * 3.0 * H * SF +
                                static_cast<double>(cfg.num_experts) * H + 2.0 * static_cast<double>(n) * H);
    double const flops = 2.0 * static_cast<double>(n) * (k * 3.0 * H * F + cfg.num_shared_experts * 3.0 * H * SF +
                                                         static_cast<double>(cfg.num_experts) * H);
    auto const& c = measured();
    double const floor_s = std::max(bytes / c.hbm_bytes_per_s, flops / c.gemm_flops_per_s);
    state.counters["floor_us"] = floor_s * 1e6;
    state.counters["x_floor"] = benchmark::Counter(floor_s, benchmark::Counter::kIsIterationInvariantRate |
                                                                benchmark::Counter::kInvert);
    state.counters["experts_hit"] = static_cast<double>(hit.size());
    state.counters["TFLOPs"] = benchmark::Counter(flops * 1e-12, benchmark::Counter::kIsIterationInvariantRate);
    state.counters["weight_GBps"] = benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    cudaStreamDestroy(stream);
  }
  cudaFree(x);
  cudaFree(out);
  cudaFree(ids);
  cudaFree(w);
}

void mixtral(benchmark::State& s) { layer_bench(s, 0); }
void qwen3_30b_a3b(benchmark::State& s) { layer_bench(s, 1); }
void deepseek_v3(benchmark::State& s) { layer_bench(s, 2); }

}  // namespace

BENCHMARK(mixtral)->Arg(1)->Arg(16)->Arg(128)->Arg(1024)->Arg(8192)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(qwen3_30b_a3b)->Arg(1)->Arg(16)->Arg(128)->Arg(1024)->Arg(8192)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(deepseek_v3)->Arg(1)->Arg(16)->Arg(128)->Arg(1024)->Arg(8192)->UseManualTime()->Unit(benchmark::kMicrosecond);
