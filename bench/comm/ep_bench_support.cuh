// bench/comm/ep_bench_support.cuh: runs one measurement on every rank of an expert-parallel group,
// a thread per rank (rank r on GPU r % GPUs), in lockstep rounds; shared by the EP benchmarks.
#pragma once

#include "gpu_bench_support.cuh"

#include <specmoe/comm/bootstrap.hpp>
#include <specmoe/comm/nvlink_direct.cuh>
#include <specmoe/core/cuda_error.cuh>
#include <specmoe/core/expert_weights.hpp>
#include <specmoe/core/moe_config.hpp>

#include <cuda_runtime.h>
#if SPECMOE_HAS_NCCL
#include <specmoe/comm/nccl_alltoallv.cuh>
#endif

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdlib>
#include <exception>
#include <functional>
#include <string>
#include <thread>
#include <vector>

namespace specmoe::bench {

// Ranks sharing a GPU spin-wait on each other's kernels: CUDA's lazy module loading would stall a
// first launch behind a spinning peer, so the EP benchmarks load eagerly (the environment wins).
inline int const eager_loading = setenv("CUDA_MODULE_LOADING", "EAGER", 0);
// ... and ranks' streams must not share a hardware queue (8 by default): one rank's kernel would
// wait behind another's spinning one.
inline int const hardware_queues = setenv("CUDA_DEVICE_MAX_CONNECTIONS", "32", 0);

inline int gpu_count() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

/// Ranks of the group: every GPU, or SPECMOE_EP_RANKS (more ranks than GPUs share them: a
/// functional run, not a measurement of links).
inline int ep_ranks() {
  if (char const* env = std::getenv("SPECMOE_EP_RANKS")) return std::max(1, std::atoi(env));
  return std::max(1, gpu_count());
}

#if SPECMOE_HAS_NCCL
/// One NCCL communicator per rank of this process (rank r on GPU r; none unless `wanted`), freed
/// with the object. NCCL runs one rank per GPU: more ranks than GPUs is an error.
struct nccl_comms {
  std::vector<ncclComm_t> comms;
  nccl_comms(int ranks, bool wanted) : comms(static_cast<std::size_t>(ranks)) {
    if (!wanted) return;
    SPECMOE_EXPECTS(ranks <= gpu_count(), errc::unsupported, "NCCL runs one rank per GPU: ", ranks, " ranks on ",
                    gpu_count(), " GPUs");
    std::vector<int> devs(static_cast<std::size_t>(ranks));
    for (int r = 0; r < ranks; ++r) devs[static_cast<std::size_t>(r)] = r;
    SPECMOE_NCCL_TRY(ncclCommInitAll(comms.data(), ranks, devs.data()));
  }
  nccl_comms(nccl_comms const&) = delete;
  [[nodiscard]] std::vector<void*> handles() const {
    return std::vector<void*>(comms.begin(), comms.end());
  }
  ~nccl_comms() {
    for (auto c : comms)
      if (c) ncclCommDestroy(c);
  }
};
#endif

enum class backend { nvlink, nccl };
inline char const* name(backend b) { return b == backend::nvlink ? "nvlink_direct" : "nccl_alltoallv"; }

/// Builds rank r's backend of kind `b` (collectively) and returns run(backend).
template <class Run>
auto with_backend(backend b, int r, in_process_group& group, [[maybe_unused]] std::vector<void*> const& nccl,
                  ep_buffer_options const& o, Run&& run) {
  if (b == backend::nvlink) {
    nvlink_direct_options no;
    static_cast<ep_buffer_options&>(no) = o;
    return run(nvlink_direct(std::make_shared<in_process_group::member>(group.join(r)), no));
  }
#if SPECMOE_HAS_NCCL
  return run(nccl_alltoallv(static_cast<ncclComm_t>(nccl[static_cast<std::size_t>(r)]), o));
#else
  SPECMOE_FAIL(errc::unsupported, "built without NCCL");
#endif
}

// One rank's device weights: router, shared experts, and its own routed experts (random).
struct rank_model {
  std::vector<__nv_bfloat16*> buffers;
  std::vector<float> bias;
  moe_weights<bf16> weights;

  rank_model(moe_config const& cfg, int local_experts, std::uint64_t seed) {
    auto const H = cfg.hidden_size, F = cfg.ffn_size, E = cfg.num_experts;
    auto make = [&](std::size_t n, float scale) {
      buffers.push_back(specmoe_bench::random_device_bf16(std::max<std::size_t>(n, 8), seed + buffers.size(), scale));
      return reinterpret_cast<bf16 const*>(buffers.back());
    };
    float const in_h = 2.0f / std::sqrt(static_cast<float>(H)), in_f = 2.0f / std::sqrt(static_cast<float>(F));
    weights.router.weight = matrix_view<bf16 const>(make(std::size_t(E) * H, 4.0f / std::sqrt(float(H))), E, H);
    if (cfg.gate.has_score_bias) {
      bias.assign(static_cast<std::size_t>(E), 0.0f);
      for (int e = 0; e < E; ++e) bias[static_cast<std::size_t>(e)] = 0.01f * static_cast<float>(e % 7);
      weights.router.score_bias = bias;
    }
    auto const L = static_cast<std::size_t>(local_experts);
    weights.experts = ffn_weights<bf16>::dense(make(L * F * H, in_h), make(L * F * H, in_h), make(L * H * F, in_f),
                                               local_experts, H, F);
    if (cfg.num_shared_experts > 0) {
      auto const S = cfg.num_shared_experts, SF = cfg.shared_ffn_size;
      weights.shared = ffn_weights<bf16>::dense(make(std::size_t(S) * SF * H, in_h), make(std::size_t(S) * SF * H, in_h),
                                                make(std::size_t(S) * H * SF, 2.0f / std::sqrt(float(SF))), S, H, SF);
    }
  }
  rank_model(rank_model const&) = delete;
  ~rank_model() {
    for (auto* p : buffers) cudaFree(p);
  }
};

/// Per rank and round: the seconds each timed part took (averaged over the inner repetitions).
struct rank_times {
  std::vector<std::vector<double>> parts;  // [part][round]
};

/// One rank's work: `setup(rank)` builds its state (collectively), `step(part, stream)` enqueues
/// timed part `part` (0..parts-1) of one repetition. Rounds start together (host barrier); each
/// part is timed with events on the rank's stream; the slowest rank's time counts.
struct ep_job {
  int parts = 1;
  int rounds = 10;
  int inner = 10;
  std::function<std::function<void(int, cudaStream_t)>(int rank)> setup;  // returns the step
  /// After the rounds, step(-1, stream) once: the step checks what the device flagged (a peer
  /// timeout means the figures are void) and throws.
  bool check = false;
};

/// Runs `job` on `ranks` threads; returns [part][round] = max over ranks of the part's mean time.
inline std::vector<std::vector<double>> run_ep_job(int ranks, ep_job const& job) {
  int const gpus = std::max(1, gpu_count());
  std::vector<rank_times> times(static_cast<std::size_t>(ranks));
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(ranks));
  std::barrier sync(ranks);
  std::vector<cudaStream_t> streams(static_cast<std::size_t>(ranks));
  for (int r = 0; r < ranks; ++r) {  // one after another: distinct hardware queues
    SPECMOE_CUDA_TRY(cudaSetDevice(r % gpus));
    SPECMOE_CUDA_TRY(cudaStreamCreateWithFlags(&streams[static_cast<std::size_t>(r)], cudaStreamNonBlocking));
  }
  auto body = [&](int r) {
    bool arrived_final = false;
    try {
      SPECMOE_CUDA_TRY(cudaSetDevice(r % gpus));
      cudaStream_t const stream = streams[static_cast<std::size_t>(r)];
      auto step = job.setup(r);
      std::vector<cudaEvent_t> ev(static_cast<std::size_t>(job.inner * job.parts + 1));
      for (auto& e : ev) SPECMOE_CUDA_TRY(cudaEventCreate(&e));
      auto& t = times[static_cast<std::size_t>(r)];
      t.parts.assign(static_cast<std::size_t>(job.parts), {});
      sync.arrive_and_wait();  // every rank set up before any rank's kernels wait on peers
      for (int warm = 0; warm < 3; ++warm)
        for (int p = 0; p < job.parts; ++p) step(p, stream);
      SPECMOE_CUDA_TRY(cudaStreamSynchronize(stream));
      for (int round = 0; round < job.rounds; ++round) {
        sync.arrive_and_wait();
        SPECMOE_CUDA_TRY(cudaEventRecord(ev[0], stream));
        for (int i = 0; i < job.inner; ++i) {
          for (int p = 0; p < job.parts; ++p) {
            step(p, stream);
            SPECMOE_CUDA_TRY(cudaEventRecord(ev[static_cast<std::size_t>(i * job.parts + p + 1)], stream));
          }
        }
        SPECMOE_CUDA_TRY(cudaStreamSynchronize(stream));
        for (int p = 0; p < job.parts; ++p) {
          double sum = 0;
          for (int i = 0; i < job.inner; ++i) {
            float ms = 0;
            auto const at = static_cast<std::size_t>(i * job.parts + p);
            SPECMOE_CUDA_TRY(cudaEventElapsedTime(&ms, ev[at], ev[at + 1]));
            sum += ms;
          }
          t.parts[static_cast<std::size_t>(p)].push_back(sum / job.inner * 1e-3);
        }
      }
      if (job.check) step(-1, stream);
      sync.arrive_and_wait();  // nobody frees buffers a peer may still write into
      arrived_final = true;
      for (auto& e : ev) cudaEventDestroy(e);
      step = {};
    } catch (...) {
      errors[static_cast<std::size_t>(r)] = std::current_exception();
      if (!arrived_final) sync.arrive_and_drop();
    }
  };
  std::vector<std::thread> threads;
  for (int r = 0; r < ranks; ++r) threads.emplace_back(body, r);
  for (auto& th : threads) th.join();
  for (auto st : streams) cudaStreamDestroy(st);
  for (auto const& e : errors)
    if (e) std::rethrow_exception(e);
  std::vector<std::vector<double>> out(static_cast<std::size_t>(job.parts), std::vector<double>(static_cast<std::size_t>(job.rounds)));
  for (int p = 0; p < job.parts; ++p)
    for (int round = 0; round < job.rounds; ++round)
      for (auto const& t : times)
        out[static_cast<std::size_t>(p)][static_cast<std::size_t>(round)] =
            std::max(out[static_cast<std::size_t>(p)][static_cast<std::size_t>(round)],
                     t.parts[static_cast<std::size_t>(p)][static_cast<std::size_t>(round)]);
  return out;
}

}  // namespace specmoe::bench
