// SP-MoE speculative-decoding steps with offloaded experts (issue 7): time per output token of the
// offloaded verification, on-demand LRU vs draft-driven prefetch vs a look-ahead-gate stand-in,
// plus a `profile` benchmark that measures the latency model's inputs.
//
//   specmoe_offload_offload_bench --benchmark_out=offload.json --benchmark_out_format=json
//   SPECMOE_PROFILE_OUT=dir specmoe_offload_offload_bench --benchmark_filter=profile
//
// Shapes (random bf16 weights, experts in pinned host memory):
//   dsv2_lite  DeepSeek-V2-Lite: hidden 2048, expert FFN 1408, 64 routed (16.5 MiB each) + 2 shared,
//              top-6 softmax, 26 MoE layers. Draft: a quantised self-draft stand-in, half the
//              target's active bytes per layer (bf16 GEMMs of 45 M weights per layer).
//   mixtral    Mixtral-8x7B: hidden 4096, FFN 14336, 8 experts (336 MiB each) top-2, 4 layers (as
//              many as fit comfortably in host memory beside the other shape). Draft: Mistral-7B
//              layers (QKV 6144, O, MLP 14336), one per target layer.
// One step = the draft phase (gamma draft tokens, each a dense forward of every draft layer, one
// token at a time) + verification of gamma + 1 tokens through the offloaded stack, layer by layer,
// each layer preceded by an attention stand-in (QKV and O projections) and a stream sync (the host
// learns a layer's routing only when its input exists, as with the gate). Routing is replayed from a
// synthetic trace (synthetic/trace_generator.hpp) whose draft agrees with the target at a set rate.
// Every mode starts warm: the cache's use counts are seeded from the trace's second half and its
// most used experts copied in until the cache is full (offloaded_moe_stack::warm_start, untimed);
// the steps replay the first half. Modes:
//   0 on_demand  LRU cache, no prefetch: every miss is a demand copy (the issue's baseline).
//   5 on_demand_frequency  no prefetch, frequency_replacement (uses counted over the run and the
//                seed): what the cache order alone gives.
//   1 draft      after each draft layer (its routing read back, one sync per draft layer) the
//                trace's draft routing of that layer goes to speculate(): cutoff = all layers.
//                Modes 1 and 3 (and the cutoff sweep) use protect_predicted<frequency_replacement>:
//                the step's guesses are kept until their layer has run (unprotected, the frequency
//                order ranks a cold prefetch lowest, so each one evicted the one before; on the
//                GPU, 2026-12-07, only ~9 of a step's ~140 oracle prefetches ever crossed). Modes
//                2, 4 and 5 use frequency_replacement (look-ahead's 30% wrong guesses, protected,
//                would hold slots for the whole step: in simulation 30.3 against 28.5 ms).
//   2 lookahead  during verification layer l, layer l + 1's experts are predicted from the trace's
//                truth corrupted to 70% accuracy (the look-ahead gate of earlier offloading systems).
//   3 draft, model cutoff  as 1, but only target layers below the latency model's cutoff
//                (choose_cutoff on the profile measured here, the run's draft accuracy, its cache).
//   4 oracle     the verification's own experts speculated at the first draft pass (what no
//                predictor can beat); its floor_tpot_us = the bytes it still copied over the
//                measured link plus the all-resident compute (the issue's floor).
// offload_cutoff sweeps the cutoff of mode 1 (counters: the model's TPOT at that cutoff and its
// choice), the measured curve beside the model's.
// Args: model (0 dsv2_lite, 1 mixtral), gamma, cache percent of all routed experts, mode, draft
// agreement percent. Each timed iteration is one step (wall clock, host round trips included).
// Counters: tpot_us = step time / (1 + sum_{i<=gamma} 0.97^i) expected tokens per step,
// prefetch_hit_rate (acquired experts whose copy was issued before they were needed), stolen,
// speculative_GB / demand_GB per step.
#include <specmoe/offload/expert_cache.hpp>
#include <specmoe/offload/expert_uses.hpp>
#include <specmoe/offload/measure_profile.cuh>
#include <specmoe/offload/offloaded_moe_stack.cuh>
#include <specmoe/prefetch/latency_model.hpp>
#include <specmoe/prefetch/offload_profile.hpp>
#include <specmoe/synthetic/trace_generator.hpp>

#include "gpu_bench_support.cuh"

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iterator>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <vector>

namespace {

using namespace specmoe;
namespace so = specmoe::offload;
using specmoe_bench::random_device_bf16;
using dbf16 = __nv_bfloat16;

struct shape {
  char const* name;
  moe_config cfg;
  int layers;
  int attn_qkv;   // target attention stand-in: QKV width
  int draft_qkv;  // draft layer: QKV width
  int draft_ffn;  // draft layer: MLP width
};

shape dsv2_lite() {
  moe_config c{.hidden_size = 2048, .ffn_size = 1408, .num_experts = 64, .top_k = 6,
               .gate = {.kind = gate_kind::softmax_topk, .renormalize = false}, .num_shared_experts = 2, .shared_ffn_size = 1408};
  return {"dsv2_lite", c, 26, 3 * 2048, 3072, 5632};
}
shape mixtral() { return {"mixtral", models::mixtral_8x7b(), 4, 6144, 6144, 14336}; }

void check_cublas(cublasStatus_t st, char const* what) {
  if (st != CUBLAS_STATUS_SUCCESS) {
    std::fprintf(stderr, "%s failed: %s\n", what, cublasGetStatusName(st));
    std::exit(1);
  }
}

/// y [n, rows_out] = x [n, K] . W^T, W [rows_out, K] (row-major, bf16, fp32 accumulation).
void gemm(cublasHandle_t h, dbf16 const* w, dbf16 const* x, dbf16* y, int rows_out, int n, int K) {
  float const one = 1.0f, zero = 0.0f;
  check_cublas(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, rows_out, n, K, &one, w, CUDA_R_16BF, K, x, CUDA_R_16BF, K, &zero, y,
                            CUDA_R_16BF, rows_out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
               "cublasGemmEx");
}

/// Everything of one shape that outlives a benchmark: the pinned expert store, resident weights,
/// the dense stand-ins' weights and scratch.
struct bench_model {
  shape sh;
  std::unique_ptr<so::host_expert_store> store;
  std::vector<dbf16*> buffers;
  std::vector<moe_weights<bf16>> resident;
  std::vector<dbf16*> attn_qkv, attn_o;                          // [layers]
  std::vector<dbf16*> draft_qkv, draft_o, draft_gu, draft_down;  // [layers]
  dbf16 *x = nullptr, *out = nullptr, *scratch = nullptr;
  cublasHandle_t cublas = nullptr;
  cudaStream_t stream = nullptr;

  explicit bench_model(shape s) : sh(s) {
    auto const& c = sh.cfg;
    int const H = c.hidden_size, E = c.num_experts, L = sh.layers;
    auto make = [&](std::size_t n, float scale) {
      buffers.push_back(random_device_bf16(n, buffers.size() + 101, scale));
      return buffers.back();
    };
    store = std::make_unique<so::host_expert_store>(so::expert_layout::of(c, L));
    {  // random experts, made on the device one layer at a time and copied into the pinned store
      std::size_t const layer_bytes = static_cast<std::size_t>(E) * store->expert_bytes();
      dbf16* scratch_layer = nullptr;
      SPECMOE_BENCH_CUDA(cudaMalloc(&scratch_layer, layer_bytes));
      for (int l = 0; l < L; ++l) {
        specmoe_bench::fill_random(scratch_layer, layer_bytes / 2, 1000 + static_cast<std::uint64_t>(l), 0.03f);
        SPECMOE_BENCH_CUDA(cudaMemcpy(store->expert(l, 0), scratch_layer, layer_bytes, cudaMemcpyDeviceToHost));
      }
      cudaFree(scratch_layer);
    }
    for (int l = 0; l < L; ++l) {
      moe_weights<bf16> w;
      w.router.weight = matrix_view<bf16 const>(reinterpret_cast<bf16 const*>(make(static_cast<std::size_t>(E) * H, 0.05f)), E, H);
      if (c.num_shared_experts > 0) {
        auto const S = c.num_shared_experts, SF = c.shared_ffn_size;
        auto const* sg = reinterpret_cast<bf16 const*>(make(static_cast<std::size_t>(S) * SF * H, 0.03f));
        auto const* su = reinterpret_cast<bf16 const*>(make(static_cast<std::size_t>(S) * SF * H, 0.03f));
        auto const* sd = reinterpret_cast<bf16 const*>(make(static_cast<std::size_t>(S) * H * SF, 0.03f));
        w.shared = ffn_weights<bf16>::dense(sg, su, sd, S, H, SF);
      }
      resident.push_back(w);
      attn_qkv.push_back(make(static_cast<std::size_t>(sh.attn_qkv) * H, 0.02f));
      attn_o.push_back(make(static_cast<std::size_t>(H) * H, 0.02f));
      draft_qkv.push_back(make(static_cast<std::size_t>(sh.draft_qkv) * H, 0.02f));
      draft_o.push_back(make(static_cast<std::size_t>(H) * H, 0.02f));
      draft_gu.push_back(make(static_cast<std::size_t>(2) * sh.draft_ffn * H, 0.02f));
      draft_down.push_back(make(static_cast<std::size_t>(H) * sh.draft_ffn, 0.02f));
    }
    x = make(static_cast<std::size_t>(8) * H, 1.0f);
    out = make(static_cast<std::size_t>(8) * H, 0.0f);
    scratch = make(static_cast<std::size_t>(8) * std::max({sh.attn_qkv, sh.draft_qkv, 2 * sh.draft_ffn}), 0.0f);
    check_cublas(cublasCreate(&cublas), "cublasCreate");
    SPECMOE_BENCH_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    check_cublas(cublasSetStream(cublas, stream), "cublasSetStream");
    SPECMOE_BENCH_CUDA(cudaDeviceSynchronize());
  }
  ~bench_model() {
    cublasDestroy(cublas);
    cudaStreamDestroy(stream);
    for (auto* p : buffers) cudaFree(p);
  }

  /// One draft layer for one token (the draft's router output is what speculate() gets).
  void draft_layer(int l) {
    int const H = sh.cfg.hidden_size;
    auto const i = static_cast<std::size_t>(l);
    gemm(cublas, draft_qkv[i], x, scratch, sh.draft_qkv, 1, H);
    gemm(cublas, draft_o[i], x, out, H, 1, H);
    gemm(cublas, draft_gu[i], out, scratch, 2 * sh.draft_ffn, 1, H);
    gemm(cublas, draft_down[i], scratch, out, H, 1, sh.draft_ffn);
  }
  /// The target's dense part of layer l for n verification tokens.
  void attention(int l, int n) {
    int const H = sh.cfg.hidden_size;
    gemm(cublas, attn_qkv[static_cast<std::size_t>(l)], x, scratch, sh.attn_qkv, n, H);
    gemm(cublas, attn_o[static_cast<std::size_t>(l)], x, out, H, n, H);
  }
};

bench_model& get_model(int which) {
  static std::unique_ptr<bench_model> current;
  static int current_id = -1;
  if (current_id != which) {
    current.reset();  // free the other shape's pinned store first
    current = std::make_unique<bench_model>(which == 0 ? dsv2_lite() : mixtral());
    current_id = which;
  }
  return *current;
}

inline constexpr int warm_steps = 2;  // untimed steps before the timed ones

enum mode { on_demand = 0, draft_prefetch = 1, lookahead = 2, draft_model_cutoff = 3, oracle_prefetch = 4, on_demand_frequency = 5 };

/// A trace of the shape whose draft agrees with the target at `agreement` (the timed steps' and the
/// profile's: the same seed).
trace::routing_trace step_trace(bench_model const& m, double agreement) {
  synthetic::trace_params tp;
  tp.layers = m.sh.layers;
  tp.experts = m.sh.cfg.num_experts;
  tp.top_k = m.sh.cfg.top_k;
  tp.tokens = 512;
  tp.requests = 1;
  tp.min_request = tp.max_request = tp.tokens;
  tp.draft_layers = m.sh.layers;
  tp.draft_agreement = agreement;
  tp.seed = 42;
  return synthetic::generate_trace(tp);
}

/// Per layer, the share of target slots the draft's top-k names (the profile's `accuracy`).
std::vector<double> draft_slot_accuracy(trace::routing_trace const& tr) {
  int const k = tr.meta.top_k;
  std::vector<double> accuracy;
  for (int l = 0; l < tr.meta.layers; ++l) {
    std::int64_t hit = 0, all = 0;
    for (std::int64_t t = 0; t < tr.meta.tokens; ++t) {
      auto const* d = &tr.draft_topk_ids[static_cast<std::size_t>((l * tr.meta.tokens + t) * k)];
      for (int j = 0; j < k; ++j, ++all) hit += std::count(d, d + k, tr.topk_ids[static_cast<std::size_t>((l * tr.meta.tokens + t) * k + j)]);
    }
    accuracy.push_back(static_cast<double>(hit) / static_cast<double>(all));
  }
  return accuracy;
}

/// measure_profile on this GPU for the shape at gamma (draft accuracy of a 0.8-agreement trace).
prefetch::offload_profile measure_shape_profile(bench_model& m, int gamma) {
  so::profile_options opt;
  opt.gamma = gamma;
  opt.model = m.sh.name;
  opt.attn_qkv_out = m.sh.attn_qkv;
  opt.accuracy = draft_slot_accuracy(step_trace(m, 0.8));
  auto p = so::measure_profile(m.sh.cfg, m.resident, *m.store, [&](cudaStream_t s) {
    check_cublas(cublasSetStream(m.cublas, s), "cublasSetStream");
    for (int l = 0; l < m.sh.layers; ++l) m.draft_layer(l);
    check_cublas(cublasSetStream(m.cublas, m.stream), "cublasSetStream");
  }, opt);
  // The draft modes read each layer's routing back (a stream sync between draft layers): what that
  // adds to a pass, per layer, medians of 5 (the host's speculate() work itself is not included).
  auto pass = [&](bool sync_each) {
    SPECMOE_BENCH_CUDA(cudaStreamSynchronize(m.stream));
    auto const t0 = std::chrono::steady_clock::now();
    for (int l = 0; l < m.sh.layers; ++l) {
      m.draft_layer(l);
      if (sync_each) SPECMOE_BENCH_CUDA(cudaStreamSynchronize(m.stream));
    }
    SPECMOE_BENCH_CUDA(cudaStreamSynchronize(m.stream));
    return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
  };
  std::vector<double> plain, synced;
  for (int r = 0; r < 5; ++r) {
    plain.push_back(pass(false));
    synced.push_back(pass(true));
  }
  std::sort(plain.begin(), plain.end());
  std::sort(synced.begin(), synced.end());
  p.draft_readback_us = std::max(0.0, (synced[2] - plain[2]) / m.sh.layers);
  return p;
}

/// The latency model's inputs for a run: measured once per shape and gamma, with the draft
/// accuracy of the run's own trace.
prefetch::offload_profile const& run_profile(bench_model& m, int gamma, trace::routing_trace const& tr) {
  static std::string shape_of;
  static std::vector<std::pair<int, prefetch::offload_profile>> measured;
  if (shape_of != m.sh.name) {
    measured.clear();
    shape_of = m.sh.name;
  }
  auto it = std::find_if(measured.begin(), measured.end(), [&](auto const& e) { return e.first == gamma; });
  if (it == measured.end()) {
    measured.emplace_back(gamma, measure_shape_profile(m, gamma));
    it = std::prev(measured.end());
  }
  it->second.accuracy = draft_slot_accuracy(tr);
  return it->second;
}

/// The latency model's resident share: the routing of the run's steps (`warm` untimed, then
/// `timed`, at the positions the timed loop takes) replayed on demand through the same cache book, warm-started
/// as the stack is (counts from [replayed, tokens), the most used experts resident). Counting only
/// the warm set's coverage overstated it where the cache is a few slots: Mixtral at 50%, 0.67
/// against 0.51 measured on the GPU (2026-12-07), and the model expected 16 ms where 23 ran.
double replayed_resident_hit(trace::routing_trace const& tr, std::int64_t replayed, int slots, int gamma, int warm, std::int64_t timed) {
  int const L = tr.meta.layers, E = tr.meta.experts, k = tr.meta.top_k, n = gamma + 1;
  so::expert_cache<so::frequency_replacement> cache(L, E, slots);
  auto const seed = so::uses_from_trace(tr, replayed, tr.meta.tokens);
  cache.seed_uses(seed);
  for (std::size_t const i : so::most_used(seed, static_cast<std::size_t>(slots))) {
    (void)cache.admit({static_cast<int>(i / static_cast<std::size_t>(E)), static_cast<int>(i % static_cast<std::size_t>(E))}, false);
  }
  std::int64_t hits = 0, needed = 0;
  std::vector<int> distinct;
  for (std::int64_t step = 0; step < warm + timed; ++step) {
    std::int64_t const p0 = (step * n) % (replayed - n);  // as run_steps
    for (int l = 0; l < L; ++l) {
      distinct.clear();
      for (std::int64_t t = p0; t < p0 + n; ++t) {
        for (int j = 0; j < k; ++j) {
          int const e = tr.topk_ids[static_cast<std::size_t>((l * tr.meta.tokens + t) * k + j)];
          if (e >= 0 && std::find(distinct.begin(), distinct.end(), e) == distinct.end()) distinct.push_back(e);
        }
      }
      // as prefetcher::acquire: the resident ones pinned first, then the misses admitted and
      // pinned (a layer's misses never evict each other), all unpinned after the layer
      bool const counted = step >= warm;
      for (int const e : distinct) {
        if (!cache.resident({l, e})) continue;
        (void)cache.use({l, e});
        cache.pin({l, e});
        hits += counted;
      }
      for (int const e : distinct) {
        if (cache.resident({l, e})) continue;
        (void)cache.use({l, e});
        (void)cache.admit({l, e}, false);
        cache.pin({l, e});
      }
      needed += counted ? static_cast<std::int64_t>(distinct.size()) : 0;
      for (int const e : distinct) cache.unpin({l, e});
    }
  }
  return needed > 0 ? static_cast<double>(hits) / static_cast<double>(needed) : 0.0;
}

/// The routing of one step and the predictions each mode makes, from the trace.
struct step_routing {
  std::vector<std::int32_t> ids;          // [layers][n * k]
  std::vector<float> weights;             // [layers][n * k]
  std::vector<std::vector<int>> draft;    // [gamma * layers] draft experts of token i at layer l
  std::vector<std::vector<int>> ahead;    // [layers] look-ahead prediction of layer l
};

step_routing routing_of_step(trace::routing_trace const& tr, std::int64_t p0, int n, int gamma, int L, std::mt19937_64& rng,
                             double lookahead_accuracy) {
  int const k = tr.meta.top_k, E = tr.meta.experts;
  step_routing r;
  for (int l = 0; l < L; ++l) {
    for (int t = 0; t < n; ++t) {
      for (int j = 0; j < k; ++j) {
        auto const idx = static_cast<std::size_t>((l * tr.meta.tokens + p0 + t) * k + j);
        r.ids.push_back(tr.topk_ids[idx]);
        r.weights.push_back(tr.topk_weights[idx]);
      }
    }
  }
  for (int i = 0; i < gamma; ++i) {  // draft pass i runs position p0 + i
    for (int l = 0; l < L; ++l) {
      std::vector<int> e;
      for (int j = 0; j < k; ++j) e.push_back(tr.draft_topk_ids[static_cast<std::size_t>((l * tr.meta.tokens + p0 + i) * k + j)]);
      r.draft.push_back(std::move(e));
    }
  }
  std::bernoulli_distribution keep(lookahead_accuracy);
  for (int l = 0; l < L; ++l) {
    std::vector<int> e;
    for (int t = 0; t < n * k; ++t) {
      int const truth = r.ids[static_cast<std::size_t>(l * n * k + t)];
      int guess = truth;
      if (!keep(rng)) {
        do guess = static_cast<int>(rng() % static_cast<unsigned>(E));
        while (guess == truth);
      }
      e.push_back(guess);
    }
    r.ahead.push_back(std::move(e));
  }
  return r;
}

/// Copies the prefetcher commits to the link at once (a demand load cannot overtake them).
int inflight_copies(so::prefetcher_config const& c, std::size_t expert_bytes) {
  auto const by_bytes = std::max<std::size_t>(1, c.max_inflight_bytes / expert_bytes);
  return static_cast<int>(std::min<std::size_t>(static_cast<std::size_t>(c.max_batch), by_bytes)) * c.max_inflight_batches;
}

/// `cutoff` (draft modes): target layers below it take the draft's predictions; -1: the latency
/// model's choice from the profile measured on this GPU (mode draft_model_cutoff).
template <class Policy>
void run_steps(benchmark::State& state, bench_model& m, int gamma, int cache_percent, int mode, double agreement, int cutoff) {
  auto const& cfg = m.sh.cfg;
  int const L = m.sh.layers, E = cfg.num_experts, k = cfg.top_k, H = cfg.hidden_size, n = gamma + 1;
  auto const tr = step_trace(m, agreement);
  std::int64_t const tokens = tr.meta.tokens;

  so::offloaded_stack_options opt;
  opt.max_tokens = n;
  opt.prefetch.slots = std::max(1, L * E * cache_percent / 100);
  bool const from_draft = mode == draft_prefetch || mode == draft_model_cutoff;
  std::int64_t const replayed = tokens / 2;  // steps replay [0, replayed); the warm start counts the rest
  if (from_draft) {  // the model's view of this run, beside the measurement
    auto const& profile = run_profile(m, gamma, tr);
    // (the resident share the warm start gives, not the capacity share: a frequency order with a
    // quarter of the experts resident finds about half of them; without it the model expected
    // 1.5x the measured TPOT at cutoff 0, 2026-12-07)
    prefetch::model_options const mo{.cache_experts = opt.prefetch.slots,
                                      .resident_hit = replayed_resident_hit(tr, replayed, opt.prefetch.slots, gamma, warm_steps,
                                                                            state.max_iterations),
                                      .protects = Policy::protects,
                                      .inflight_copies = inflight_copies(opt.prefetch, m.store->expert_bytes())};
    state.counters["model_resident_hit"] = mo.resident_hit;
    auto const choice = prefetch::choose_cutoff(profile, mo);
    if (cutoff < 0) cutoff = choice.cutoff;
    state.counters["cutoff"] = cutoff;
    state.counters["model_cutoff"] = choice.cutoff;
    state.counters["model_tpot_us"] = prefetch::estimate_step(profile, cutoff, mo).tpot_us;
    state.counters["model_best_tpot_us"] = choice.best().tpot_us;
  }
  so::offloaded_moe_stack<Policy> stack(cfg, m.resident, *m.store, opt);
  auto& pf = stack.prefetcher();
  stack.warm_start(so::uses_from_trace(tr, replayed, tokens));

  std::int32_t* host_ids = nullptr;
  float* host_w = nullptr;
  std::int32_t* dev_ids = nullptr;
  float* dev_w = nullptr;
  auto const per_layer = static_cast<std::size_t>(n * k);
  SPECMOE_BENCH_CUDA(cudaHostAlloc(&host_ids, per_layer * L * 4, cudaHostAllocDefault));
  SPECMOE_BENCH_CUDA(cudaHostAlloc(&host_w, per_layer * L * 4, cudaHostAllocDefault));
  SPECMOE_BENCH_CUDA(cudaMalloc(&dev_ids, per_layer * L * 4));
  SPECMOE_BENCH_CUDA(cudaMalloc(&dev_w, per_layer * L * 4));

  std::mt19937_64 rng(7);
  std::int64_t step_no = 0;
  auto step = [&] {
    std::int64_t const p0 = (step_no++ * n) % (replayed - n);
    auto const r = routing_of_step(tr, p0, n, gamma, L, rng, 0.7);
    std::copy(r.ids.begin(), r.ids.end(), host_ids);
    std::copy(r.weights.begin(), r.weights.end(), host_w);
    stack.new_step();
    // draft phase: gamma tokens, each through every draft layer
    for (int i = 0; i < gamma; ++i) {
      for (int l = 0; l < L; ++l) {
        m.draft_layer(l);
        if (from_draft && l < cutoff) {
          SPECMOE_BENCH_CUDA(cudaStreamSynchronize(m.stream));  // the draft's router output is read back
          stack.speculate(l, r.draft[static_cast<std::size_t>(i * L + l)]);
        }
        if (mode == oracle_prefetch && i == 0) {  // the verification's own experts, as early as the draft's first guess
          auto const* ids = r.ids.data() + static_cast<std::size_t>(l) * n * k;
          stack.speculate(l, std::vector<int>(ids, ids + n * k));
        }
      }
    }
    // verification: gamma + 1 tokens through every target layer
    SPECMOE_BENCH_CUDA(cudaMemcpyAsync(dev_ids, host_ids, per_layer * L * 4, cudaMemcpyHostToDevice, m.stream));
    SPECMOE_BENCH_CUDA(cudaMemcpyAsync(dev_w, host_w, per_layer * L * 4, cudaMemcpyHostToDevice, m.stream));
    for (int l = 0; l < L; ++l) {
      m.attention(l, n);
      // The host learns layer l's routing only once its input exists (the gate's round trip, as in
      // the gate-driven forward_layer): no demand copy may start before that.
      SPECMOE_BENCH_CUDA(cudaStreamSynchronize(m.stream));
      auto const off = static_cast<std::size_t>(l) * per_layer;
      routing_view const dr{std::span<std::int32_t const>(dev_ids + off, per_layer), std::span<float const>(dev_w + off, per_layer), n, k};
      stack.forward_layer(l, matrix_view<bf16 const>(reinterpret_cast<bf16 const*>(m.x), n, H),
                          dr, std::span<std::int32_t const>(host_ids + off, per_layer),
                          matrix_view<bf16>(reinterpret_cast<bf16*>(m.out), n, H), m.stream);
      // the look-ahead gate: layer l + 1's guess is known with layer l's input; its copies overlap
      // layer l's compute, behind layer l's own demand copies
      if (mode == lookahead && l + 1 < L) stack.speculate(l + 1, r.ahead[static_cast<std::size_t>(l + 1)]);
    }
    SPECMOE_BENCH_CUDA(cudaStreamSynchronize(m.stream));
  };

  for (int w = 0; w < warm_steps; ++w) step();  // warm the cache and the handles
  pf.drain();
  auto const c0 = pf.counters();
  double total_s = 0;
  for (auto _ : state) {
    auto const t0 = std::chrono::steady_clock::now();
    step();
    double const s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    total_s += s;
    state.SetIterationTime(s);
  }
  stack.check(L - 1, m.stream);
  pf.drain();
  auto const c1 = pf.counters();
  double tokens_per_step = 1;
  for (int i = 1; i <= gamma; ++i) tokens_per_step += std::pow(0.97, i);
  double const steps = static_cast<double>(state.iterations());
  double const acquired = static_cast<double>(c1.acquired - c0.acquired);
  state.counters["tpot_us"] = total_s / steps / tokens_per_step * 1e6;
  state.counters["step_us"] = total_s / steps * 1e6;
  state.counters["prefetch_hit_rate"] = acquired > 0 ? static_cast<double>(c1.ready_hits - c0.ready_hits) / acquired : 0.0;
  state.counters["experts_per_step"] = acquired / steps;
  state.counters["stolen_per_step"] = static_cast<double>(c1.stolen_jobs - c0.stolen_jobs) / steps;
  state.counters["speculative_GB_per_step"] = static_cast<double>(c1.speculative_bytes - c0.speculative_bytes) / steps * 1e-9;
  state.counters["demand_GB_per_step"] = static_cast<double>(c1.demand_bytes - c0.demand_bytes) / steps * 1e-9;
  state.counters["cache_slots"] = opt.prefetch.slots;
  if (mode == on_demand_frequency) {  // the model's estimate of this mode's share found resident, beside the measured one
    state.counters["model_resident_hit"] = replayed_resident_hit(tr, replayed, opt.prefetch.slots, gamma, warm_steps, state.iterations());
  }
  if (mode == oracle_prefetch) {  // the issue's floor: the copies the oracle could not avoid at the measured link, plus the resident compute
    auto const& profile = run_profile(m, gamma, tr);
    double const copied = static_cast<double>(c1.speculative_bytes - c0.speculative_bytes + c1.demand_bytes - c0.demand_bytes) / steps;
    state.counters["floor_tpot_us"] = (copied / profile.link_bytes_per_us + profile.resident_compute_us()) / tokens_per_step;
  }
  state.SetLabel(std::string(m.sh.name) + (mode == on_demand           ? " on_demand_lru"
                                           : mode == on_demand_frequency ? " on_demand_frequency"
                                           : mode == draft_prefetch      ? " draft_prefetch"
                                           : mode == draft_model_cutoff  ? " draft_model_cutoff"
                                           : mode == oracle_prefetch     ? " oracle_prefetch"
                                                                         : " lookahead_0.7"));

  cudaFreeHost(host_ids);
  cudaFreeHost(host_w);
  cudaFree(dev_ids);
  cudaFree(dev_w);
}

void offload_step(benchmark::State& state) {
  auto& m = get_model(static_cast<int>(state.range(0)));
  int const gamma = static_cast<int>(state.range(1)), cache = static_cast<int>(state.range(2)), mode = static_cast<int>(state.range(3));
  double const agreement = static_cast<double>(state.range(4)) / 100.0;
  if (mode == on_demand) {
    run_steps<so::lru_replacement>(state, m, gamma, cache, mode, agreement, 0);
  } else if (mode == draft_prefetch || mode == draft_model_cutoff) {
    run_steps<so::protect_predicted<so::frequency_replacement>>(state, m, gamma, cache, mode, agreement,
                                                                mode == draft_prefetch ? m.sh.layers : -1);
  } else {
    run_steps<so::frequency_replacement>(state, m, gamma, cache, mode, agreement, -1);
  }
}

/// The measured curve over the cutoff (draft prefetch at 80% agreement, the protected frequency order), each row with
/// the latency model's TPOT at that cutoff and its chosen cutoff (issue 7: the choice within 5% of
/// the sweep's best).
void offload_cutoff(benchmark::State& state) {
  auto& m = get_model(static_cast<int>(state.range(0)));
  run_steps<so::protect_predicted<so::frequency_replacement>>(state, m, static_cast<int>(state.range(1)),
                                                              static_cast<int>(state.range(2)), draft_prefetch, 0.8,
                                                              static_cast<int>(state.range(3)));
}

/// One shape's configurations (a shape's pinned store is made once: its benchmarks run together).
template <int Model>
void offload_step_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"model", "gamma", "cache_pct", "mode", "agree_pct"});
  for (int gamma : {1, 2, 4}) {
    for (int cache : {25, 50}) {
      b->Args({Model, gamma, cache, on_demand, 80});
      b->Args({Model, gamma, cache, on_demand_frequency, 80});
      b->Args({Model, gamma, cache, lookahead, 80});
      for (int agree : {60, 80, 90}) b->Args({Model, gamma, cache, draft_prefetch, agree});
      b->Args({Model, gamma, cache, draft_model_cutoff, 80});
      b->Args({Model, gamma, cache, oracle_prefetch, 80});
    }
  }
}

/// The cutoff sweeps: DeepSeek-V2-Lite (26 layers) at gamma 1 and 25% / 50% resident; Mixtral (4
/// layers) at gamma 1 and 25% / 50%.
template <int Model>
void offload_cutoff_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"model", "gamma", "cache_pct", "cutoff"});
  std::vector<int> const cutoffs = Model == 0 ? std::vector<int>{0, 1, 2, 3, 4, 6, 9, 13, 19, 26} : std::vector<int>{0, 1, 2, 3, 4};
  for (int cache : {25, 50})
    for (int c : cutoffs) b->Args({Model, 1, cache, c});
}

/// measure_profile on this GPU; writes $SPECMOE_PROFILE_OUT/<model>_gamma<g>.json when set.
void profile(benchmark::State& state) {
  auto& m = get_model(static_cast<int>(state.range(0)));
  int const gamma = static_cast<int>(state.range(1));
  prefetch::offload_profile p;
  for (auto _ : state) {
    auto const t0 = std::chrono::steady_clock::now();
    p = measure_shape_profile(m, gamma);
    state.SetIterationTime(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  state.counters["link_GBps"] = p.link_bytes_per_us * 1e-3;
  state.counters["copy_latency_us"] = p.copy_latency_us;
  state.counters["expert_copy_us"] = p.expert_copy_us();
  state.counters["draft_pass_us"] = p.draft_pass_us;
  state.counters["draft_readback_us"] = p.draft_readback_us;
  state.counters["moe_us_layer0"] = p.moe_us.front();
  state.counters["attn_us"] = p.attn_us.front();
  state.counters["resident_compute_us"] = p.resident_compute_us();
  state.SetLabel(m.sh.name);
  if (char const* dir = std::getenv("SPECMOE_PROFILE_OUT")) {
    std::filesystem::create_directories(dir);
    auto const path = std::filesystem::path(dir) / (std::string(m.sh.name) + "_gamma" + std::to_string(gamma) + ".json");
    prefetch::write_profile(path, p);
    std::fprintf(stderr, "profile written to %s\n", path.string().c_str());
  }
}

}  // namespace

BENCHMARK(offload_step)->Apply(offload_step_args<0>)->Iterations(5)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(offload_cutoff)->Apply(offload_cutoff_args<0>)->Iterations(5)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(profile)->ArgNames({"model", "gamma"})->Args({0, 1})->Iterations(1)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(offload_step)->Apply(offload_step_args<1>)->Iterations(5)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(offload_cutoff)->Apply(offload_cutoff_args<1>)->Iterations(5)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(profile)->ArgNames({"model", "gamma"})->Args({1, 1})->Iterations(1)->UseManualTime()->Unit(benchmark::kMillisecond);
