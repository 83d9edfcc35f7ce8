// bench/comm/ep_dispatch_bench.cu: expert-parallel dispatch and combine through the device backends,
// alone (no expert compute), as issue 5 asks: hidden 7168, top-8, 256 experts in contiguous blocks,
// random routing, 1 to 8192 tokens per rank, every rank a thread on its own GPU.
//
//   dispatch = plan (serving rank per token and expert, de-duplicated rows) + rows and routing to
//              the owners + arrival; combine = one row per (token, destination) back + the reduce
//              in token order. Each is timed on every rank (events), the slowest rank counts.
// ep_fp8/...: the same with fp8 dispatch (nvlink_direct; rows as e4m3 + a scale per 128 elements).
// Counters: bytes_crossing (the largest rank's rows to other ranks, hidden x 2 bytes each; fp8
// dispatch: hidden + hidden / 32 bytes),
// algbw_GBps (bytes_crossing / time), ranks, gpus.
#include "comm/ep_bench_support.cuh"

#include <specmoe/comm/nccl_alltoallv.cuh>
#include <specmoe/comm/nvlink_direct.cuh>
#include <specmoe/grouping/concepts.hpp>
#include <specmoe/kernels/ep_dispatch.cuh>

#include <benchmark/benchmark.h>

#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <tuple>

namespace {

using namespace specmoe;

constexpr int hidden = 7168, top_k = 8, experts = 256;

template <class T>
struct dbuf {
  T* p = nullptr;
  explicit dbuf(std::vector<T> const& h) {
    SPECMOE_CUDA_TRY(cudaMalloc(&p, std::max<std::size_t>(1, h.size()) * sizeof(T)));
    if (!h.empty()) SPECMOE_CUDA_TRY(cudaMemcpy(p, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  explicit dbuf(std::size_t n) { SPECMOE_CUDA_TRY(cudaMalloc(&p, std::max<std::size_t>(1, n) * sizeof(T))); }
  dbuf(dbuf const&) = delete;
  ~dbuf() { cudaFree(p); }
};

// One rank's fixed inputs and the plan's outputs.
struct rank_state {
  std::unique_ptr<dbuf<__nv_bfloat16>> x, out;
  std::unique_ptr<dbuf<std::int32_t>> ids, dest_of, send_slot, send_counts, owner_offset, owners, local_index;
  std::unique_ptr<dbuf<float>> weights;
  std::unique_ptr<dbuf<kernels::device_status>> status;
  kernels::ep_placement_view view{};
  std::array<int, kernels::ep_max_ranks> width{};
  long long bytes_crossing = 0;
};

rank_state make_rank(int rank, int D, long long n) {
  rank_state s;
  moe_config cfg{.hidden_size = hidden, .ffn_size = 8, .num_experts = experts, .top_k = top_k};
  cfg.num_ranks = D;
  auto const placement = contiguous_blocks{}.place(cfg, rank);
  std::mt19937_64 rng(1000 + static_cast<std::uint64_t>(rank) * 7919 + static_cast<std::uint64_t>(n));
  std::vector<std::int32_t> ids(static_cast<std::size_t>(n * top_k));
  std::vector<float> w(ids.size());
  std::vector<int> pool(experts);
  std::iota(pool.begin(), pool.end(), 0);
  long long crossing_rows = 0;
  for (long long t = 0; t < n; ++t) {
    for (int j = 0; j < top_k; ++j) {  // partial Fisher-Yates: 8 distinct experts
      auto const pick = j + static_cast<int>(rng() % static_cast<std::uint64_t>(experts - j));
      std::swap(pool[static_cast<std::size_t>(j)], pool[static_cast<std::size_t>(pick)]);
      ids[static_cast<std::size_t>(t * top_k + j)] = pool[static_cast<std::size_t>(j)];
      w[static_cast<std::size_t>(t * top_k + j)] = 0.125f;
    }
    unsigned mask = 0;
    for (int j = 0; j < top_k; ++j) mask |= 1u << placement.owners(ids[static_cast<std::size_t>(t * top_k + j)])[0];
    crossing_rows += __builtin_popcount(mask & ~(1u << rank));
  }
  s.bytes_crossing = crossing_rows * hidden * 2;
  std::vector<__nv_bfloat16> x(static_cast<std::size_t>(n * hidden));
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = __float2bfloat16(static_cast<float>(i % 97) / 97.0f - 0.5f);
  s.x = std::make_unique<dbuf<__nv_bfloat16>>(x);
  s.out = std::make_unique<dbuf<__nv_bfloat16>>(static_cast<std::size_t>(n * hidden));
  s.ids = std::make_unique<dbuf<std::int32_t>>(ids);
  s.weights = std::make_unique<dbuf<float>>(w);
  s.dest_of = std::make_unique<dbuf<std::int32_t>>(static_cast<std::size_t>(n * top_k));
  s.send_slot = std::make_unique<dbuf<std::int32_t>>(static_cast<std::size_t>(n * D));
  s.send_counts = std::make_unique<dbuf<std::int32_t>>(static_cast<std::size_t>(D));
  kernels::device_status const clean = kernels::clean_device_status;
  s.status = std::make_unique<dbuf<kernels::device_status>>(std::vector<kernels::device_status>{clean});
  std::vector<std::int32_t> offset, owners, local(static_cast<std::size_t>(D * experts));
  for (int e = 0; e < experts; ++e) {
    offset.push_back(static_cast<std::int32_t>(owners.size()));
    owners.push_back(placement.owners(e)[0]);
  }
  offset.push_back(static_cast<std::int32_t>(owners.size()));
  for (int r = 0; r < D; ++r) {
    for (int e = 0; e < experts; ++e) local[static_cast<std::size_t>(r * experts + e)] = placement.local_index(r, e);
    s.width[static_cast<std::size_t>(r)] = std::min<int>(top_k, static_cast<int>(placement.local_experts(r).size()));
  }
  s.owner_offset = std::make_unique<dbuf<std::int32_t>>(offset);
  s.owners = std::make_unique<dbuf<std::int32_t>>(owners);
  s.local_index = std::make_unique<dbuf<std::int32_t>>(local);
  s.view = {D, experts, s.owner_offset->p, s.owners->p, s.local_index->p};
  return s;
}

using bench::backend;

struct measured {
  std::vector<std::vector<double>> parts;  // [dispatch, combine][round]
  long long dispatch_bytes = 0, combine_bytes = 0;  // the largest rank's bytes to other ranks
};

// Builds the group for (backend, tokens) once and measures both parts; the three benchmark
// names of a configuration share the measurement.
measured const& measure(backend b, bool fp8, long long n) {
  static std::mutex m;
  static std::map<std::tuple<int, bool, long long>, measured> cache;
  std::lock_guard lock(m);
  auto key = std::make_tuple(static_cast<int>(b), fp8, n);
  if (auto it = cache.find(key); it != cache.end()) return it->second;
  int const D = bench::ep_ranks();
  std::vector<long long> crossing(static_cast<std::size_t>(D));
  auto group = in_process_group::create(D);
#if SPECMOE_HAS_NCCL
  bench::nccl_comms const nccl(D, b == backend::nccl);
  auto const comm_handles = nccl.handles();
#else
  std::vector<void*> const comm_handles;
#endif
  bench::ep_job job;
  job.parts = 2;
  job.rounds = 12;
  job.inner = n >= 2048 ? 5 : 20;
  job.check = true;
  job.setup = [&](int r) -> std::function<void(int, cudaStream_t)> {
    auto st = std::make_shared<rank_state>(make_rank(r, D, n));
    crossing[static_cast<std::size_t>(r)] = st->bytes_crossing;
    ep_buffer_options o{std::max<long long>(n, 1), hidden, top_k};
    o.fp8_dispatch = fp8;
    int const sms = specmoe::detail::multiprocessor_count();
    auto run = [st, n, D, sms](auto comm) -> std::function<void(int, cudaStream_t)> {
      auto c = std::make_shared<decltype(comm)>(std::move(comm));
      return [st, c, n, D, sms](int part, cudaStream_t stream) {
        if (part < 0) {  // after the rounds: a flagged timeout voids the figures
          kernels::device_status h{};
          SPECMOE_CUDA_TRY(cudaStreamSynchronize(stream));
          SPECMOE_CUDA_TRY(cudaMemcpy(&h, st->status->p, sizeof h, cudaMemcpyDeviceToHost));
          SPECMOE_EXPECTS(h.bits == 0, errc::timeout, "the device flagged ", h.bits, " (rank ", h.first_token, ")");
          return;
        }
        long long const region = std::max<long long>(n, 1);
        if (part == 0) {
          SPECMOE_CUDA_TRY(kernels::launch_ep_plan(st->ids->p, st->weights->p, n, top_k, st->view, c->rank(), st->dest_of->p,
                                                   st->send_slot->p, st->send_counts->p, st->status->p, stream));
          ep_dispatch_args const a{st->x->p,     n,          region,   top_k,          st->ids->p, st->weights->p,
                                   st->dest_of->p, st->send_slot->p, st->send_counts->p, st->view, st->width, st->status->p};
          c->dispatch_async(a, stream);
        } else {  // the received rows go straight back (no expert step): the comm path alone
          c->combine_async(c->received().x, region, stream);
          SPECMOE_CUDA_TRY(kernels::launch_ep_combine_reduce(c->combine_wait(), c->returned(), st->send_slot->p, n, D,
                                                             static_cast<int>(region), hidden, nullptr, st->out->p, hidden,
                                                             st->status->p, sms, stream));
        }
      };
    };
    return bench::with_backend(b, r, *group, comm_handles, o, run);
  };
  measured result;
  result.parts = bench::run_ep_job(D, job);
  result.combine_bytes = *std::max_element(crossing.begin(), crossing.end());
  // fp8 rows: a byte per element and a 4-byte scale per 128
  result.dispatch_bytes = fp8 ? result.combine_bytes / 2 / hidden * (hidden + hidden / kernels::ep_fp8_group * 4) : result.combine_bytes;
  return cache.emplace(key, std::move(result)).first->second;
}

// part: 0 dispatch, 1 combine, 2 both
void ep_bench(benchmark::State& state, backend b, bool fp8, int part) {
  auto const n = state.range(0);
  measured const* m = nullptr;
  try {
    m = &measure(b, fp8, n);
  } catch (std::exception const& e) {
    state.SkipWithError(e.what());
    for (auto _ : state) {
    }
    return;
  }
  std::size_t i = 0;
  double total = 0;
  for (auto _ : state) {
    auto const round = i++ % m->parts[0].size();
    double const t = part == 2 ? m->parts[0][round] + m->parts[1][round] : m->parts[static_cast<std::size_t>(part)][round];
    total += t;
    state.SetIterationTime(t);
  }
  double const mean = total / static_cast<double>(std::max<std::size_t>(i, 1));
  double const bytes = static_cast<double>(part == 0 ? m->dispatch_bytes : part == 1 ? m->combine_bytes : m->dispatch_bytes + m->combine_bytes);
  state.counters["bytes_crossing"] = bytes;
  state.counters["algbw_GBps"] = mean > 0 ? bytes / mean * 1e-9 : 0;
  state.counters["ranks"] = bench::ep_ranks();
  state.counters["gpus"] = bench::gpu_count();
}

int register_all() {
  for (backend b : {backend::nvlink, backend::nccl}) {
    for (bool fp8 : {false, true}) {
      if (fp8 && b != backend::nvlink) continue;  // fp8 dispatch: nvlink_direct only
      for (int part = 0; part < 3; ++part) {
        if (fp8 && part == 1) continue;  // combine stays bf16: the same as the plain rows
        char const* what = part == 0 ? "dispatch" : part == 1 ? "combine" : "dispatch_combine";
        auto* bm = benchmark::RegisterBenchmark((std::string(fp8 ? "ep_fp8/" : "ep/") + what + "/" + bench::name(b)).c_str(),
                                                [b, fp8, part](benchmark::State& s) { ep_bench(s, b, fp8, part); });
        bm->ArgName("tokens")->UseManualTime()->Unit(benchmark::kMicrosecond)->Iterations(12);
        for (long long n : {1, 16, 128, 512, 2048, 8192}) bm->Arg(n);
      }
    }
  }
  return 0;
}
int const registered = register_all();

}  // namespace

BENCHMARK_MAIN();
