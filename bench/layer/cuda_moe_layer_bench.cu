// The whole cuda_space layer for published shapes, replayed from a CUDA graph, beside the floor
// measured in the same run: max(activated expert weight bytes / HBM bandwidth, FLOPs / bf16 GEMM rate).
//
//   specmoe_layer_cuda_moe_layer_bench --benchmark_out=layer.json --benchmark_out_format=json
//
// Args: tokens. Weights are random (hash-filled on the device), routing is the layer's own gate;
// deepseek_v3_slice32 is one rank of an 8-way expert-parallel DeepSeek-V3: its 32 local experts
// get the slots of a random top-8 over 256 that land on them (engine routing, -1 elsewhere).
// Each timed replay starts with a cold L2 (a 256 MiB overwrite between replays, not timed).
// <model>_one_launch_ffn/1: one token with cuda_layer_options::one_launch_decode_ffn.
// Counters: floor_us, x_floor (time / floor), experts_hit, TFLOPs, weight_GBps.
#include <specmoe/layer/cuda_moe_layer.cuh>

#include "gpu_bench_support.cuh"

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <set>
#include <vector>

namespace {

using namespace specmoe;

using specmoe_bench::random_device_bf16;

// Device weights of one model shape, made once per process (DeepSeek-V3's are 22.5 GB).
struct model {
  moe_config cfg;
  std::vector<__nv_bfloat16*> buffers;
  std::vector<float> bias;
  moe_weights<bf16> weights;

  explicit model(moe_config c) : cfg(c) {
    auto const E = cfg.num_experts, H = cfg.hidden_size, F = cfg.ffn_size;
    auto make = [&](std::size_t n, float scale) {
      buffers.push_back(random_device_bf16(n, buffers.size() + 11, scale));
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
    SPECMOE_BENCH_CUDA(cudaDeviceSynchronize());
  }
  ~model() {
    for (auto* p : buffers) cudaFree(p);
  }
};

/// The 32 local experts of one rank of 8 (routed experts only: the shared expert is benched
/// with the whole model).
moe_config slice32_config() {
  auto c = models::deepseek_v3();
  c.num_experts = 32;
  c.gate.num_groups = 1;
  c.gate.topk_groups = 1;
  c.gate.has_score_bias = false;
  c.num_shared_experts = 0;
  c.shared_ffn_size = 0;
  return c;
}

/// Random top-8 over 256 experts per token; the slots on experts 0..31 stay, the rest are -1.
void slice32_routing(std::int64_t n, std::int32_t* d_ids, float* d_w) {
  std::mt19937_64 rng(static_cast<std::uint64_t>(n) * 7 + 1);
  std::vector<std::int32_t> ids(static_cast<std::size_t>(n) * 8);
  std::vector<float> w(ids.size());
  std::vector<int> all(256);
  for (int e = 0; e < 256; ++e) all[static_cast<std::size_t>(e)] = e;
  for (std::int64_t t = 0; t < n; ++t) {
    for (int j = 0; j < 8; ++j) {
      std::swap(all[static_cast<std::size_t>(j)], all[static_cast<std::size_t>(j + static_cast<int>(rng() % (256 - j)))]);
      auto const i = static_cast<std::size_t>(t * 8 + j);
      ids[i] = all[static_cast<std::size_t>(j)] < 32 ? all[static_cast<std::size_t>(j)] : -1;
      w[i] = 0.05f + 0.2f * static_cast<float>(rng() % 1000) / 1000.0f;
    }
  }
  SPECMOE_BENCH_CUDA(cudaMemcpy(d_ids, ids.data(), ids.size() * 4, cudaMemcpyHostToDevice));
  SPECMOE_BENCH_CUDA(cudaMemcpy(d_w, w.data(), w.size() * 4, cudaMemcpyHostToDevice));
}

model& get_model(int which) {
  static std::unique_ptr<model> current;
  static int current_id = -1;
  if (current_id != which) {
    current.reset();
    current = std::make_unique<model>(which == 0   ? models::mixtral_8x7b()
                                      : which == 1 ? models::qwen3_30b_a3b()
                                      : which == 2 ? models::deepseek_v3()
                                                   : slice32_config());
    current_id = which;
  }
  return *current;
}

void layer_bench(benchmark::State& state, int which, bool one_launch_ffn = false) {
  auto& m = get_model(which);
  auto const& cfg = m.cfg;
  auto const n = state.range(0);
  auto const H = cfg.hidden_size, k = cfg.top_k;
  auto* x = random_device_bf16(static_cast<std::size_t>(n) * H, 99, 1.0f);
  __nv_bfloat16* out = nullptr;
  std::int32_t* ids = nullptr;
  float* w = nullptr;
  SPECMOE_BENCH_CUDA(cudaMalloc(&out, static_cast<std::size_t>(n) * H * 2));
  SPECMOE_BENCH_CUDA(cudaMalloc(&ids, static_cast<std::size_t>(n) * k * 4));
  SPECMOE_BENCH_CUDA(cudaMalloc(&w, static_cast<std::size_t>(n) * k * 4));
  {
    moe_layer<cuda_space> layer(cfg, m.weights, {}, {.max_tokens = n, .one_launch_decode_ffn = one_launch_ffn});
    cuda_batch batch{matrix_view<bf16 const>(reinterpret_cast<bf16 const*>(x), n, H)};
    bool const engine_routing = which == 3;
    if (engine_routing) {
      slice32_routing(n, ids, w);
      batch.routing = routing_view{std::span<std::int32_t const>(ids, static_cast<std::size_t>(n) * k),
                                   std::span<float const>(w, static_cast<std::size_t>(n) * k), n, k};
    }
    matrix_view<bf16> o(reinterpret_cast<bf16*>(out), n, H);
    cudaStream_t stream;
    SPECMOE_BENCH_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    // warm-up, checked, and the routing for the floor
    layer.forward(batch, o, stream, engine_routing ? cuda_routing_output{} : cuda_routing_output{ids, w});
    std::vector<std::int32_t> h_ids(static_cast<std::size_t>(n) * k);
    SPECMOE_BENCH_CUDA(cudaMemcpy(h_ids.data(), ids, h_ids.size() * 4, cudaMemcpyDeviceToHost));
    std::set<int> hit(h_ids.begin(), h_ids.end());
    hit.erase(-1);
    std::int64_t const rows = std::count_if(h_ids.begin(), h_ids.end(), [](std::int32_t e) { return e >= 0; });
    auto exec = specmoe_bench::capture(stream, [&](cudaStream_t s) { layer.forward_async(batch, o, s); });
    for (auto _ : state) state.SetIterationTime(specmoe_bench::time_graph_us(exec, stream, true) * 1e-6);
    layer.check(stream);
    // Floor: the activated experts' weights (plus shared and router) once, or the FLOPs at the GEMM rate.
    auto const F = static_cast<double>(cfg.ffn_size), SF = static_cast<double>(cfg.shared_ffn_size);
    double const bytes = 2.0 * (static_cast<double>(hit.size()) * 3 * H * F + cfg.num_shared_experts * 3.0 * H * SF +
                                static_cast<double>(cfg.num_experts) * H + 2.0 * static_cast<double>(n) * H);
    double const router_flops = engine_routing ? 0.0 : 2.0 * static_cast<double>(n) * cfg.num_experts * H;
    double const flops = 2.0 * static_cast<double>(rows) * 3.0 * H * F +
                         2.0 * static_cast<double>(n) * cfg.num_shared_experts * 3.0 * H * SF + router_flops;
    double const floor_s = specmoe_bench::floor_seconds(bytes, flops);
    state.counters["floor_us"] = floor_s * 1e6;
    state.counters["x_floor"] = benchmark::Counter(floor_s, benchmark::Counter::kIsIterationInvariantRate |
                                                                benchmark::Counter::kInvert);
    state.counters["experts_hit"] = static_cast<double>(hit.size());
    state.counters["TFLOPs"] = benchmark::Counter(flops * 1e-12, benchmark::Counter::kIsIterationInvariantRate);
    state.counters["weight_GBps"] = benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
    state.counters["rows"] = static_cast<double>(rows);
    cudaGraphExecDestroy(exec);
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
void deepseek_v3_slice32(benchmark::State& s) { layer_bench(s, 3); }
// one token with cuda_layer_options::one_launch_decode_ffn (kernels/decode_expert_ffn.cuh)
void qwen3_30b_a3b_one_launch_ffn(benchmark::State& s) { layer_bench(s, 1, true); }
void deepseek_v3_one_launch_ffn(benchmark::State& s) { layer_bench(s, 2, true); }
void deepseek_v3_slice32_one_launch_ffn(benchmark::State& s) { layer_bench(s, 3, true); }

}  // namespace

BENCHMARK(mixtral)->Arg(1)->Arg(16)->Arg(128)->Arg(1024)->Arg(8192)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(qwen3_30b_a3b)->Arg(1)->Arg(16)->Arg(128)->Arg(1024)->Arg(8192)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(deepseek_v3)->Arg(1)->Arg(16)->Arg(128)->Arg(1024)->Arg(8192)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(deepseek_v3_slice32)->Arg(1)->Arg(16)->Arg(128)->Arg(1024)->Arg(8192)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(qwen3_30b_a3b_one_launch_ffn)->Arg(1)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(deepseek_v3_one_launch_ffn)->Arg(1)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(deepseek_v3_slice32_one_launch_ffn)->Arg(1)->UseManualTime()->Unit(benchmark::kMicrosecond);
