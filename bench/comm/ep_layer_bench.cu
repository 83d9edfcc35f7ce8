// bench/comm/ep_layer_bench.cu: the whole multi-rank cuda layer (gate, plan, dispatch, local experts,
// shared experts, combine, reduce) for DeepSeek-V3 and Qwen3-30B-A3B shapes, experts in contiguous
// blocks over every GPU (a thread per rank), both device backends. Weights are random; routing is
// the layer's own gate on random activations. The slowest rank's time per forward counts.
//   specmoe_comm_ep_layer_bench --benchmark_out=ep_layer.json --benchmark_out_format=json
#include "comm/ep_bench_support.cuh"
#include "gpu_bench_support.cuh"

#include <specmoe/comm/nccl_alltoallv.cuh>
#include <specmoe/comm/nvlink_direct.cuh>
#include <specmoe/layer/cuda_ep_layer.cuh>

#include <benchmark/benchmark.h>

#include <cmath>
#include <memory>
#include <string>

namespace {

using namespace specmoe;

using bench::backend;
using bench::rank_model;

template <class Comm>
using ep_layer = moe_layer<cuda_space, no_prediction, stay, contiguous_blocks, all_resident, Comm>;

void layer_bench(benchmark::State& state, moe_config (*shape)(int), backend b) {
  long long const n = state.range(0);
  int const D = bench::ep_ranks();
  auto const cfg = shape(D);
  if (b == backend::nccl && D > bench::gpu_count()) {
    state.SkipWithError("NCCL runs one rank per GPU: more ranks than GPUs");
    for (auto _ : state) {
    }
    return;
  }
  auto group = in_process_group::create(D);
#if SPECMOE_HAS_NCCL
  bench::nccl_comms const nccl(D, b == backend::nccl);
  auto const comm_handles = nccl.handles();
#else
  std::vector<void*> const comm_handles;
#endif
  bench::ep_job job;
  job.rounds = static_cast<int>(state.max_iterations);
  job.inner = n >= 1024 ? 3 : 10;
  job.check = true;
  job.setup = [&](int r) -> std::function<void(int, cudaStream_t)> {
    auto const local = static_cast<int>(contiguous_blocks{}.place(cfg, r).local_experts(r).size());
    auto model = std::make_shared<rank_model>(cfg, local, 100 + static_cast<std::uint64_t>(r) * 17);
    auto x = std::shared_ptr<__nv_bfloat16>(specmoe_bench::random_device_bf16(static_cast<std::size_t>(n) * cfg.hidden_size, 7 + r, 1.0f),
                                            cudaFree);
    std::shared_ptr<__nv_bfloat16> out;
    {
      __nv_bfloat16* p = nullptr;
      SPECMOE_CUDA_TRY(cudaMalloc(&p, static_cast<std::size_t>(std::max<long long>(n, 1)) * cfg.hidden_size * 2));
      out = std::shared_ptr<__nv_bfloat16>(p, cudaFree);
    }
    ep_buffer_options const o{std::max<long long>(n, 1), cfg.hidden_size, cfg.top_k};
    auto run = [&](auto comm) -> std::function<void(int, cudaStream_t)> {
      using C = decltype(comm);
      auto layer = std::make_shared<ep_layer<C>>(cfg, model->weights, typename ep_layer<C>::policies_type{.comm = comm},
                                                 cuda_ep_layer_options{.max_tokens = std::max<long long>(n, 1)});
      {  // the gate once alone (a first cuBLAS call may load code: on a shared GPU that waits for peers)
        std::int32_t* ids = nullptr;
        float* w = nullptr;
        SPECMOE_CUDA_TRY(cudaMalloc(&ids, static_cast<std::size_t>(n) * cfg.top_k * 4));
        SPECMOE_CUDA_TRY(cudaMalloc(&w, static_cast<std::size_t>(n) * cfg.top_k * 4));
        layer->route_async(matrix_view<bf16 const>(reinterpret_cast<bf16 const*>(x.get()), n, cfg.hidden_size), {ids, w},
                           nullptr);
        layer->check(nullptr);
        cudaFree(ids);
        cudaFree(w);
      }
      return [layer, model, x, out, n, cfg](int part, cudaStream_t stream) {
        if (part < 0) return layer->check(stream);
        layer->forward_async(cuda_batch{matrix_view<bf16 const>(reinterpret_cast<bf16 const*>(x.get()), n, cfg.hidden_size)},
                             matrix_view<bf16>(reinterpret_cast<bf16*>(out.get()), n, cfg.hidden_size), stream);
      };
    };
    return bench::with_backend(b, r, *group, comm_handles, o, run);
  };
  std::vector<std::vector<double>> times;
  try {
    times = bench::run_ep_job(D, job);
  } catch (std::exception const& e) {
    state.SkipWithError(e.what());
  }
  std::size_t i = 0;
  for (auto _ : state) {
    if (!times.empty()) state.SetIterationTime(times[0][i++ % times[0].size()]);
  }
  state.counters["ranks"] = D;
  state.counters["gpus"] = bench::gpu_count();
}

int register_all() {
  struct shape {
    char const* name;
    moe_config (*make)(int);
  };
  for (auto s : {shape{"deepseek_v3", &models::deepseek_v3}, shape{"qwen3_30b_a3b", &models::qwen3_30b_a3b}}) {
    for (backend b : {backend::nvlink, backend::nccl}) {
      auto const name = std::string("ep_layer/") + s.name + "/" + bench::name(b);
      auto* bm = benchmark::RegisterBenchmark(name.c_str(), [s, b](benchmark::State& st) { layer_bench(st, s.make, b); });
      bm->ArgName("tokens")->UseManualTime()->Unit(benchmark::kMicrosecond)->Iterations(8);
      for (long long n : {1, 16, 128, 1024, 8192}) bm->Arg(n);
    }
  }
  return 0;
}
int const registered = register_all();

}  // namespace

BENCHMARK_MAIN();
