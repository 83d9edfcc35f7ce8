// bench/comm/tp_block_bench.cu: Speculative MoE's block on the GPU — attention in tensor
// parallelism, experts in expert parallelism over every GPU (a thread per rank) — plain against
// shuffled, with trace-driven routing, DeepSeek-V3 and Qwen3-30B-A3B shapes, nvlink_direct.
//
//   plain        contiguous expert blocks; reduce-scatter into contiguous shards, dispatch,
//                experts, combine, all-gather (the all-reduce split in two: the same bytes)
//   grouped      the plan's expert placement (co-clustering), contiguous shards
//   speculative  the plan's placement, and shards chosen by the plan's token table on the device
//                (device_token_affinity + tp_balanced_shuffle): Speculative MoE
//   oracle       the plan's placement, shards chosen by each token's real serving rank
//   combined     three layers in order on every rank (a 3-layer trace and plan), each guessing
//                with device_combined_affinity (T and the 2-gram A over the previous layers'
//                serving ranks, which the all-gathers carry); the time is the third layer's block
//
// Routing: a synthetic trace with the published statistics (synthetic/trace_generator.hpp) of the
// model's expert count; the plan comes from one sample, the timed batch from another (held out).
// Counters: lar (share of activations whose expert is on the token's shard rank) and crossing_rows
// (rows the dispatch sends to other ranks, all ranks, per forward; the combine returns as many).
// `shuffle_plan` times the shuffle's own work on one GPU: the table lookup and the plan kernel.
//   specmoe_comm_tp_block_bench --benchmark_out=tp_block.json --benchmark_out_format=json
#include "comm/ep_bench_support.cuh"
#include "gpu_bench_support.cuh"

#include <specmoe/comm/nvlink_direct.cuh>
#include <specmoe/grouping/speculative_plan.hpp>
#include <specmoe/layer/cuda_ep_layer.cuh>
#include <specmoe/placement/tp_shuffle.hpp>
#include <specmoe/router/affinity_predictors.hpp>
#include <specmoe/router/device_layer_affinity.cuh>
#include <specmoe/router/device_token_affinity.cuh>
#include <specmoe/synthetic/trace_generator.hpp>

#include <benchmark/benchmark.h>

#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>

namespace {

using namespace specmoe;

enum class variant { plain, grouped, speculative, oracle, combined };
char const* name(variant v) {
  switch (v) {
    case variant::plain: return "plain";
    case variant::grouped: return "grouped";
    case variant::speculative: return "speculative";
    case variant::combined: return "combined";
    default: return "oracle";
  }
}

// The model's trace statistics: a plan from one sample, a held-out batch from another (cached).
struct workload {
  grouping::speculative_plan plan;
  trace::routing_trace held_out;
};

workload const& workload_for(moe_config const& cfg, int D, std::int64_t tokens, int layers = 1) {
  static std::mutex m;
  static std::map<std::string, std::unique_ptr<workload>> cache;
  std::lock_guard lock(m);
  auto const key = std::to_string(cfg.num_experts) + "/" + std::to_string(cfg.top_k) + "/" + std::to_string(D) + "/" +
                   std::to_string(tokens) + "/" + std::to_string(layers);
  auto& w = cache[key];
  if (!w) {
    synthetic::trace_params p;
    p.layers = layers;
    p.experts = cfg.num_experts;
    p.top_k = cfg.top_k;
    p.tokens = std::max<std::int64_t>(65536, tokens);
    p.requests = static_cast<int>(p.tokens / 256);
    p.seed = 7;
    p.sample_seed = 1;
    auto const train = synthetic::generate_trace(p);
    p.tokens = tokens;
    p.requests = static_cast<int>(std::max<std::int64_t>(1, tokens / 256));
    p.sample_seed = 2;
    w = std::make_unique<workload>();
    w->plan = grouping::make_plan(train, grouping::co_cluster_options{.ranks = D});
    w->held_out = synthetic::generate_trace(p);
  }
  return *w;
}

// The rank serving most of a token's experts (ties: the lower rank), as the layer counts it.
int serving_rank(expert_placement const& p, std::int32_t const* ids, int k) {
  std::vector<int> votes(static_cast<std::size_t>(p.num_ranks()), 0);
  for (int j = 0; j < k; ++j)
    if (ids[j] >= 0) ++votes[static_cast<std::size_t>(p.owners(ids[j]).front())];
  return static_cast<int>(std::max_element(votes.begin(), votes.end()) - votes.begin());
}

template <class Pred, class Place>
using block_layer = moe_layer<cuda_space, Pred, Place, explicit_placement, all_resident, nvlink_direct>;

void block_bench(benchmark::State& state, moe_config (*shape)(int), variant v) {
  long long const n = state.range(0);  // tokens per rank (its shard)
  int const D = bench::ep_ranks();
  auto const base_cfg = shape(D);
  int const layers = v == variant::combined ? 3 : 1, timed = layers - 1;  // the layer whose block is timed
  auto cfg_of = [&](int l) {
    auto c = base_cfg;
    c.layer = l;
    return c;
  };
  auto const cfg = cfg_of(timed);
  long long const T = n * D;
  auto const& wl = workload_for(cfg, D, T, layers);
  auto const& L = wl.plan.per_layer[static_cast<std::size_t>(timed)];
  auto const plan_grouping = grouping::plan_placements(wl.plan);
  auto placement_of = [&](int l) {
    return v == variant::plain ? contiguous_blocks{}.place(cfg_of(l), 0) : plan_grouping.place(cfg_of(l), 0);
  };
  auto const placement = placement_of(timed);
  auto const k = cfg.top_k;
  // Host view of the batch: routing of each layer, token ids, guesses, and what crosses.
  auto routing_of = [&](int l) {
    auto const first = wl.held_out.topk_ids.begin() + static_cast<std::ptrdiff_t>(l) * T * k;
    return std::vector<std::int32_t>(first, first + T * k);
  };
  auto const ids = routing_of(timed);
  std::vector<float> weights(static_cast<std::size_t>(T * k));
  for (std::size_t i = 0; i < weights.size(); ++i) weights[i] = 0.05f + static_cast<float>((i * 2654435761u) % 1000) * 1e-3f;
  std::vector<std::int32_t> token_ids(wl.held_out.token_ids.begin(), wl.held_out.token_ids.begin() + T);
  std::vector<int> guess(static_cast<std::size_t>(T), -1);
  std::vector<float> conf;
  if (v == variant::oracle) {
    for (long long t = 0; t < T; ++t) guess[static_cast<std::size_t>(t)] = serving_rank(placement, ids.data() + t * k, k);
  } else if (v == variant::speculative) {
    conf.assign(static_cast<std::size_t>(T), 0.0f);
    for (long long t = 0; t < T; ++t) {
      auto const [r, c] = L.token(token_ids[static_cast<std::size_t>(t)]);
      guess[static_cast<std::size_t>(t)] = r;
      conf[static_cast<std::size_t>(t)] = c;
    }
  } else if (v == variant::combined) {  // the host predictor over the same layers gives the device's guesses
    combined_affinity_prediction host(std::make_shared<grouping::speculative_plan const>(wl.plan), std::make_shared<rank_history>());
    std::vector<std::int64_t> const ids64(token_ids.begin(), token_ids.end());
    std::vector<int> const home(static_cast<std::size_t>(T), 0);
    for (int l = 0; l < layers; ++l) {
      auto const c = cfg_of(l);
      auto const pl = placement_of(l);
      auto const r = routing_of(l);
      prediction pr;
      host.predict(prediction_request{c, T, home, ids64, matrix_view<float const>{}, pl}, pr);
      if (l == timed) {
        guess = pr.rank;
        conf = pr.confidence;
      }
      routing_view const rv{std::span<std::int32_t const>(r), std::span<float const>(weights), T, k};
      host.observe(routing_observation{c, home, home, ids64, rv, pl, &pr});
    }
  }
  bool const guessed = v == variant::speculative || v == variant::oracle || v == variant::combined;
  auto const shuffle = plan_tp_shuffle(guessed ? std::span<int const>(guess) : std::span<int const>{}, conf, T, D);
  long long local = 0, crossing = 0;
  for (long long t = 0; t < T; ++t) {
    int const home = shuffle.rank[static_cast<std::size_t>(t)];
    std::set<int> ranks;
    for (int j = 0; j < k; ++j) {
      int const owner = placement.owners(ids[static_cast<std::size_t>(t * k + j)]).front();
      local += owner == home;
      if (owner != home) ranks.insert(owner);
    }
    crossing += static_cast<long long>(ranks.size());
  }

  auto group = in_process_group::create(D);
  bench::ep_job job;
  job.rounds = static_cast<int>(state.max_iterations);
  job.inner = n >= 1024 ? 3 : 10;
  job.parts = layers;  // combined: one part per layer, in order; the last is the timed block
  job.check = true;
  job.setup = [&](int r) -> std::function<void(int, cudaStream_t)> {
    auto const local_experts = static_cast<int>(placement.local_experts(r).size());
    auto model = std::make_shared<bench::rank_model>(cfg, local_experts, 100 + static_cast<std::uint64_t>(r) * 17);
    auto const H = cfg.hidden_size;
    auto partial = std::shared_ptr<__nv_bfloat16>(
        specmoe_bench::random_device_bf16(static_cast<std::size_t>(T) * H, 7 + r, 1.0f), cudaFree);
    auto dev = [](auto const& host) {
      using V = typename std::decay_t<decltype(host)>::value_type;
      V* p = nullptr;
      SPECMOE_CUDA_TRY(cudaMalloc(&p, std::max<std::size_t>(1, host.size()) * sizeof(V)));
      SPECMOE_CUDA_TRY(cudaMemcpy(p, host.data(), host.size() * sizeof(V), cudaMemcpyHostToDevice));
      return std::shared_ptr<V>(p, cudaFree);
    };
    auto d_ids = dev(ids);
    auto d_w = dev(weights);
    auto d_tok = dev(token_ids);
    auto d_guess = dev(std::vector<std::int32_t>(guess.begin(), guess.end()));
    std::shared_ptr<__nv_bfloat16> out;
    {
      __nv_bfloat16* p = nullptr;
      SPECMOE_CUDA_TRY(cudaMalloc(&p, static_cast<std::size_t>(T) * H * 2));
      out = std::shared_ptr<__nv_bfloat16>(p, cudaFree);
    }
    nvlink_direct_options o;
    o.max_tokens = n;
    o.hidden = H;
    o.top_k = k;
    o.token_shuffle = true;
    nvlink_direct comm(std::make_shared<in_process_group::member>(group->join(r)), o);
    auto build = [&](auto predictor, auto place) -> std::function<void(int, cudaStream_t)> {
      using Layer = block_layer<decltype(predictor), decltype(place)>;
      auto layer = std::make_shared<Layer>(
          cfg, model->weights, typename Layer::policies_type{.predictor = predictor, .grouping = explicit_placement(placement), .comm = comm},
          cuda_ep_layer_options{.max_tokens = n});
      cuda_tp_batch b{matrix_view<bf16 const>(reinterpret_cast<bf16 const*>(partial.get()), T, H), d_tok.get()};
      b.routing = routing_view{std::span<std::int32_t const>(d_ids.get(), ids.size()),
                               std::span<float const>(d_w.get(), weights.size()), T, k};
      if (v == variant::oracle) b.predicted_rank = d_guess.get();
      return [layer, model, partial, out, d_ids, d_w, d_tok, d_guess, b, T, H](int part, cudaStream_t stream) {
        if (part < 0) return layer->check(stream);
        layer->forward_tp_async(b, matrix_view<bf16>(reinterpret_cast<bf16*>(out.get()), T, H), stream);
      };
    };
    if (v == variant::combined) {  // three layers sharing one history; part l runs layer l
      using Layer = block_layer<device_combined_affinity, tp_balanced_shuffle>;
      auto history = std::make_shared<device_rank_history>(layers, T);
      auto plan = std::make_shared<grouping::speculative_plan const>(wl.plan);
      std::vector<std::shared_ptr<Layer>> stack;
      std::vector<std::shared_ptr<bench::rank_model>> models;
      std::vector<std::shared_ptr<std::int32_t>> routings;
      std::vector<cuda_tp_batch> batches;
      for (int l = 0; l < layers; ++l) {
        auto const c = cfg_of(l);
        auto const local = static_cast<int>(placement_of(l).local_experts(r).size());
        models.push_back(l == timed && local == local_experts
                             ? model
                             : std::make_shared<bench::rank_model>(c, local, 300 + static_cast<std::uint64_t>(r * 17 + l)));
        stack.push_back(std::make_shared<Layer>(
            c, models.back()->weights,
            typename Layer::policies_type{.predictor = device_combined_affinity(plan, l, history), .grouping = plan_grouping, .comm = comm},
            cuda_ep_layer_options{.max_tokens = n}));
        routings.push_back(l == timed ? d_ids : dev(routing_of(l)));
        cuda_tp_batch b{matrix_view<bf16 const>(reinterpret_cast<bf16 const*>(partial.get()), T, H), d_tok.get()};
        b.routing = routing_view{std::span<std::int32_t const>(routings.back().get(), ids.size()),
                                 std::span<float const>(d_w.get(), weights.size()), T, k};
        batches.push_back(b);
      }
      return [stack, models, routings, batches, partial, out, d_w, d_tok, T, H](int part, cudaStream_t stream) {
        if (part < 0) {
          for (auto const& layer : stack) layer->check(stream);
          return;
        }
        stack[static_cast<std::size_t>(part)]->forward_tp_async(batches[static_cast<std::size_t>(part)],
                                                                matrix_view<bf16>(reinterpret_cast<bf16*>(out.get()), T, H), stream);
      };
    }
    if (v == variant::speculative) return build(device_token_affinity(L), tp_balanced_shuffle{});
    if (v == variant::oracle) return build(no_prediction{}, tp_balanced_shuffle{});
    return build(no_prediction{}, stay{});
  };
  std::vector<std::vector<double>> times;
  try {
    times = bench::run_ep_job(D, job);
  } catch (std::exception const& e) {
    state.SkipWithError(e.what());
  }
  std::size_t i = 0;
  for (auto _ : state) {
    if (!times.empty()) state.SetIterationTime(times.back()[i++ % times.back().size()]);  // the timed layer: the last part
  }
  state.counters["ranks"] = D;
  state.counters["gpus"] = bench::gpu_count();
  state.counters["tokens_total"] = static_cast<double>(T);
  state.counters["lar"] = static_cast<double>(local) / static_cast<double>(T * k);
  state.counters["crossing_rows"] = static_cast<double>(crossing);
}

// The shuffle's own work on one GPU: token-table lookup and the plan kernel for T tokens.
void shuffle_plan_bench(benchmark::State& state, moe_config (*shape)(int)) {
  long long const T = state.range(0);
  int const D = bench::ep_ranks();
  auto const cfg = shape(D);
  auto const& wl = workload_for(cfg, D, T);
  device_token_affinity const table(wl.plan.per_layer[0]);
  std::int32_t *tok = nullptr, *rank = nullptr, *rank_of = nullptr, *order = nullptr;
  float* conf = nullptr;
  auto const S = tp_shard_rows(T, D);
  SPECMOE_CUDA_TRY(cudaMalloc(&tok, static_cast<std::size_t>(T) * 4));
  SPECMOE_CUDA_TRY(cudaMalloc(&rank, static_cast<std::size_t>(T) * 4));
  SPECMOE_CUDA_TRY(cudaMalloc(&conf, static_cast<std::size_t>(T) * 4));
  SPECMOE_CUDA_TRY(cudaMalloc(&rank_of, static_cast<std::size_t>(T) * 4));
  SPECMOE_CUDA_TRY(cudaMalloc(&order, static_cast<std::size_t>(D * S) * 4));
  SPECMOE_CUDA_TRY(cudaMemcpy(tok, wl.held_out.token_ids.data(), static_cast<std::size_t>(T) * 4, cudaMemcpyHostToDevice));
  cudaStream_t stream;
  SPECMOE_CUDA_TRY(cudaStreamCreate(&stream));
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  for (auto _ : state) {
    cudaEventRecord(start, stream);
    for (int i = 0; i < 20; ++i) {
      table.predict_async(tok, T, rank, conf, stream);
      SPECMOE_CUDA_TRY(kernels::launch_token_shuffle_plan(rank, conf, T, D, S, rank_of, order, stream));
    }
    cudaEventRecord(stop, stream);
    cudaEventSynchronize(stop);
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    state.SetIterationTime(ms * 1e-3 / 20);
  }
  state.counters["ranks"] = D;
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaStreamDestroy(stream);
  for (void* p : {static_cast<void*>(tok), static_cast<void*>(rank), static_cast<void*>(conf), static_cast<void*>(rank_of),
                  static_cast<void*>(order)})
    cudaFree(p);
}

int register_all() {
  struct shape {
    char const* name;
    moe_config (*make)(int);
  };
  for (auto s : {shape{"deepseek_v3", &models::deepseek_v3}, shape{"qwen3_30b_a3b", &models::qwen3_30b_a3b}}) {
    for (variant v : {variant::plain, variant::grouped, variant::speculative, variant::oracle, variant::combined}) {
      auto const bench_name = std::string("tp_block/") + s.name + "/" + name(v);
      auto* bm = benchmark::RegisterBenchmark(bench_name.c_str(), [s, v](benchmark::State& st) { block_bench(st, s.make, v); });
      bm->ArgName("tokens")->UseManualTime()->Unit(benchmark::kMicrosecond)->Iterations(8);
      for (long long n : {128, 512, 2048, 4096}) bm->Arg(n);
    }
    auto const plan_name = std::string("shuffle_plan/") + s.name;
    auto* bm = benchmark::RegisterBenchmark(plan_name.c_str(), [s](benchmark::State& st) { shuffle_plan_bench(st, s.make); });
    bm->ArgName("tokens_total")->UseManualTime()->Unit(benchmark::kMicrosecond)->Iterations(50);
    for (long long t : {256, 1024, 4096, 16384, 32768}) bm->Arg(t);
  }
  return 0;
}
int const registered = register_all();

}  // namespace

BENCHMARK_MAIN();
