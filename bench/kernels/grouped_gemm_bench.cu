// Grouped expert GEMMs (kernels/grouped_gemm.cuh) on the issue-4 shapes, beside their floors and
// beside cuBLAS doing the same GEMMs one expert at a time (the host-synchronising way).
//
//   specmoe_kernels_grouped_gemm_bench --benchmark_out=gemm.json --benchmark_out_format=json
//
// Rows:   <shape>/<kernel>/<impl>/tokens:<t>
//   shape:  mixtral (H 4096, F 14336, 8 experts, top-2), qwen3 (2048, 768, 128, top-8),
//           dsv3 (7168, 2048, 256, top-8), dsv3_slice32 (the 32 local experts of one rank of 8;
//           the rows are the slots of the random top-8 routing over 256 that land on them)
//   kernel: gate_up (w13 fused [2F, H] per expert; + SwiGLU for ours) | down ([H, F] per expert)
//   impl:   ours (automatic path, with the tensor maps) | stream / mma / wgmma (forced path;
//           stream is the bulk-copy kernel on sm_90) | stream_registers (the register-fed stream
//           kernel, forced) |
//           cublas (one cublasGemmEx per non-empty expert with host-known counts; gate_up without
//           the SwiGLU)
// Also <shape>/gate_up/gathered|gather_then/tokens:<t>: gate/up reading token-order rows through
//   the routing's slots, the gather folded into the GEMM (where the bulk stream kernel or the
//   wgmma kernel runs; an error row elsewhere) against the gather kernel and then gate/up (the layer's two ways).
// Also <shape>/ffn/chain|fused|fused_chunk8/tokens:<t> (shapes with F <= 2048): the whole decode
//   FFN, kernels/decode_expert_ffn.cuh in one launch (rows one at a time, or in chunks of 8)
//   against the two GEMMs (automatic paths);
//   floor = the activated experts' three matrices / HBM BW.
// Counters: TFLOPs, weight_GBps (bytes of the activated experts' weights / time), floor_ratio =
//   time / max(bytes / measured HBM BW, flops / measured cuBLAS GEMM rate) where bytes = activated
//   weights + activations in + out; vs_cublas = time / the cublas row's time (same run);
//   tile_rows = rows the 128-row tiles span (padding included), short_last_tiles = groups whose
//   last row tile has at most 64 rows (half of it or more is padding).
// The ceilings are measured at start (bench/gpu_bench_support.cuh, medians of 7): a 1 GiB cudaMemcpy D2D (read + write bytes) and one
// 8192^3 bf16 cublasGemmEx on random data. L2 is flushed (256 MiB memset) before each timed launch.
#include "gpu_bench_support.cuh"

#include <specmoe/kernels/decode_expert_ffn.cuh>
#include <specmoe/kernels/grouped_gemm.cuh>
#include <specmoe/kernels/permute.cuh>

#include <benchmark/benchmark.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

namespace {

namespace sk = specmoe::kernels;
using bf16 = __nv_bfloat16;

void check(cudaError_t e, char const* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "CUDA error %s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}
void check(cublasStatus_t e, char const* what) {
  if (e != CUBLAS_STATUS_SUCCESS) {
    std::fprintf(stderr, "cuBLAS error %s: %d\n", what, static_cast<int>(e));
    std::exit(1);
  }
}
#define CK(x) check((x), #x)

void fill(bf16* p, std::size_t n, std::uint64_t seed, float scale) { specmoe_bench::fill_random(p, n, seed, scale); }

struct shape {
  char const* name;
  int H, F, E, top_k, G;  // G local experts: 0 .. G-1 of E
};
shape const shapes[] = {
    {"mixtral", 4096, 14336, 8, 2, 8},
    {"qwen3", 2048, 768, 128, 8, 128},
    {"dsv3", 7168, 2048, 256, 8, 256},
    {"dsv3_slice32", 7168, 2048, 256, 8, 32},
};
int const token_counts[] = {1, 16, 128, 1024, 8192};

double g_hbm_bw = 0.0;     // bytes / s
double g_gemm_rate = 0.0;  // flop / s
cublasHandle_t g_cublas = nullptr;
cudaStream_t g_stream = nullptr;
cudaEvent_t g_e0 = nullptr, g_e1 = nullptr;
std::map<std::string, double> g_cublas_time;

/// Weights of one model: w13 [E_alloc, 2F, H], wd [E_alloc, H, F]; pointer tables on the device.
struct weights {
  int H = 0, F = 0, E = 0;
  bf16* w13 = nullptr;
  bf16* wd = nullptr;
  bf16 const** pg = nullptr;
  bf16 const** pu = nullptr;
  bf16 const** pd = nullptr;
  std::vector<bf16 const*> hg, hd;
  sk::grouped_weight_maps maps_up, maps_down;  // all E experts; a launch uses the first G
  weights(int H_, int F_, int E_) : H(H_), F(F_), E(E_) {
    std::size_t const n13 = static_cast<std::size_t>(E) * 2 * F * H, nd = static_cast<std::size_t>(E) * H * F;
    CK(cudaMalloc(&w13, n13 * 2));
    CK(cudaMalloc(&wd, nd * 2));
    fill(w13, n13, 1234 + E, 2.0f / std::sqrt(static_cast<float>(H)));
    fill(wd, nd, 4321 + E, 2.0f / std::sqrt(static_cast<float>(F)));
    std::vector<bf16 const*> hu(static_cast<std::size_t>(E));
    hg.resize(static_cast<std::size_t>(E));
    hd.resize(static_cast<std::size_t>(E));
    for (int e = 0; e < E; ++e) {
      hg[static_cast<std::size_t>(e)] = w13 + static_cast<std::size_t>(e) * 2 * F * H;
      hu[static_cast<std::size_t>(e)] = hg[static_cast<std::size_t>(e)] + static_cast<std::size_t>(F) * H;
      hd[static_cast<std::size_t>(e)] = wd + static_cast<std::size_t>(e) * H * F;
    }
    CK(cudaMalloc(&pg, E * sizeof(void*)));
    CK(cudaMalloc(&pu, E * sizeof(void*)));
    CK(cudaMalloc(&pd, E * sizeof(void*)));
    CK(cudaMemcpy(pg, hg.data(), E * sizeof(void*), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(pu, hu.data(), E * sizeof(void*), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(pd, hd.data(), E * sizeof(void*), cudaMemcpyHostToDevice));
    maps_up = sk::grouped_weight_maps(hg.data(), hu.data(), E, F, H, H);
    maps_down = sk::grouped_weight_maps(hd.data(), E, H, F, F);
    CK(maps_up.status());
    CK(maps_down.status());
  }
};

weights& model_weights(shape const& s) {
  static std::map<std::string, std::unique_ptr<weights>> cache;
  std::string const key = std::to_string(s.H) + "x" + std::to_string(s.F) + "x" + std::to_string(s.E);
  auto& w = cache[key];
  if (!w) w = std::make_unique<weights>(s.H, s.F, s.E);  // dsv3_slice32 uses dsv3's first 32 experts
  return *w;
}

/// Activations and a random routing for (shape, tokens).
struct case_data {
  std::vector<std::int64_t> counts, off;
  std::int64_t M = 0;
  std::int64_t* d_off = nullptr;
  bf16* x = nullptr;
  bf16* h = nullptr;
  bf16* y = nullptr;
  bf16* gu = nullptr;  // cuBLAS gate_up output [M, 2F]
  bf16* xt = nullptr;            // the tokens' rows in token order [tokens, H] (the gathered rows read them)
  std::int32_t* slots = nullptr;  // the routing's slots (token * top_k + j), expert-major, as a layout sorts them
  int active = 0;
};

case_data& get_case(shape const& s, int tokens) {
  static std::map<std::string, std::unique_ptr<case_data>> cache;
  static std::string last;
  std::string const key = std::string(s.name) + "/" + std::to_string(tokens);
  if (key != last && !last.empty()) {  // free the previous case's buffers (they are large)
    auto& c = cache[last];
    if (c) {
      cudaFree(c->d_off);
      cudaFree(c->x);
      cudaFree(c->h);
      cudaFree(c->y);
      cudaFree(c->gu);
      cudaFree(c->xt);
      cudaFree(c->slots);
      c.reset();
    }
  }
  last = key;
  auto& c = cache[key];
  if (c) return *c;
  c = std::make_unique<case_data>();
  std::mt19937_64 rng(static_cast<std::uint64_t>(tokens) * 7919 + static_cast<std::uint64_t>(s.E));
  c->counts.assign(static_cast<std::size_t>(s.G), 0);
  std::vector<int> ids(static_cast<std::size_t>(s.E));
  std::vector<std::vector<std::int32_t>> slots_of(static_cast<std::size_t>(s.G));
  for (int t = 0; t < tokens; ++t) {
    for (int e = 0; e < s.E; ++e) ids[static_cast<std::size_t>(e)] = e;
    for (int j = 0; j < s.top_k; ++j) {  // top_k distinct experts, uniform
      int const pick = j + static_cast<int>(rng() % static_cast<std::uint64_t>(s.E - j));
      std::swap(ids[static_cast<std::size_t>(j)], ids[static_cast<std::size_t>(pick)]);
      int const e = ids[static_cast<std::size_t>(j)];
      if (e < s.G) {
        ++c->counts[static_cast<std::size_t>(e)];
        slots_of[static_cast<std::size_t>(e)].push_back(t * s.top_k + j);
      }
    }
  }
  std::vector<std::int32_t> sorted_slots;
  for (auto const& v : slots_of) sorted_slots.insert(sorted_slots.end(), v.begin(), v.end());
  if (sorted_slots.empty()) sorted_slots.push_back(0);
  c->off.assign(static_cast<std::size_t>(s.G) + 1, 0);
  for (int g = 0; g < s.G; ++g) {
    c->off[static_cast<std::size_t>(g) + 1] = c->off[static_cast<std::size_t>(g)] + c->counts[static_cast<std::size_t>(g)];
    c->active += c->counts[static_cast<std::size_t>(g)] > 0;
  }
  c->M = std::max<std::int64_t>(c->off.back(), 1);
  CK(cudaMalloc(&c->d_off, c->off.size() * sizeof(std::int64_t)));
  CK(cudaMemcpy(c->d_off, c->off.data(), c->off.size() * sizeof(std::int64_t), cudaMemcpyHostToDevice));
  CK(cudaMalloc(&c->x, static_cast<std::size_t>(c->M) * s.H * 2));
  CK(cudaMalloc(&c->h, static_cast<std::size_t>(c->M) * s.F * 2));
  CK(cudaMalloc(&c->y, static_cast<std::size_t>(c->M) * s.H * 2));
  CK(cudaMalloc(&c->gu, static_cast<std::size_t>(c->M) * 2 * s.F * 2));
  fill(c->x, static_cast<std::size_t>(c->M) * s.H, 99, 1.0f);
  fill(c->h, static_cast<std::size_t>(c->M) * s.F, 98, 1.0f);
  CK(cudaMalloc(&c->xt, static_cast<std::size_t>(tokens) * s.H * 2));
  CK(cudaMalloc(&c->slots, sorted_slots.size() * sizeof(std::int32_t)));
  fill(c->xt, static_cast<std::size_t>(tokens) * s.H, 97, 1.0f);
  CK(cudaMemcpy(c->slots, sorted_slots.data(), sorted_slots.size() * sizeof(std::int32_t), cudaMemcpyHostToDevice));
  CK(cudaDeviceSynchronize());
  return *c;
}

/// row-major C[m, n] = A[m, k] . W[n, k]^T with cuBLAS (column-major: C^T = W^T' . A^T)
void cublas_rowmajor(bf16 const* A, bf16 const* W, bf16* C, int m, int n, int k) {
  float const alpha = 1.0f, beta = 0.0f;
  CK(cublasGemmEx(g_cublas, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &alpha, W, CUDA_R_16BF, k, A, CUDA_R_16BF, k, &beta, C, CUDA_R_16BF, n,
                  CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

/// Times `launch` once per benchmark iteration with a cold L2 (events on g_stream, after one
/// warm-up) and returns the mean in seconds.
template <class Launch>
double timed_launches(benchmark::State& state, Launch const& launch) {
  launch();  // warm-up
  CK(cudaStreamSynchronize(g_stream));
  double total_s = 0.0;
  std::int64_t iters = 0;
  for (auto _ : state) {
    specmoe_bench::l2_flush(g_stream);
    CK(cudaEventRecord(g_e0, g_stream));
    launch();
    CK(cudaEventRecord(g_e1, g_stream));
    CK(cudaEventSynchronize(g_e1));
    float ms = 0.0f;
    CK(cudaEventElapsedTime(&ms, g_e0, g_e1));
    state.SetIterationTime(ms * 1e-3);
    total_s += ms * 1e-3;
    ++iters;
  }
  return total_s / static_cast<double>(std::max<std::int64_t>(iters, 1));
}

enum class impl { ours, stream, mma, wgmma, cublas, stream_registers };
char const* impl_name(impl i) {
  switch (i) {
    case impl::ours: return "ours";
    case impl::stream: return "stream";
    case impl::stream_registers: return "stream_registers";
    case impl::mma: return "mma";
    case impl::wgmma: return "wgmma";
    default: return "cublas";
  }
}

void run_case(benchmark::State& state, shape const& s, bool gate_up, impl which, int tokens) {
  weights& w = model_weights(s);
  case_data& c = get_case(s, tokens);
  auto const path = which == impl::stream             ? sk::grouped_gemm_path::stream
                    : which == impl::stream_registers ? sk::grouped_gemm_path::stream_registers
                    : which == impl::mma    ? sk::grouped_gemm_path::mma
                    : which == impl::wgmma  ? sk::grouped_gemm_path::wgmma
                                            : sk::grouped_gemm_path::automatic;
  auto launch = [&] {
    if (which == impl::cublas) {
      for (int g = 0; g < s.G; ++g) {
        auto const n = static_cast<int>(c.counts[static_cast<std::size_t>(g)]);
        if (n == 0) continue;
        auto const m0 = c.off[static_cast<std::size_t>(g)];
        if (gate_up) {
          cublas_rowmajor(c.x + m0 * s.H, w.hg[static_cast<std::size_t>(g)], c.gu + m0 * 2 * s.F, n, 2 * s.F, s.H);
        } else {
          cublas_rowmajor(c.h + m0 * s.F, w.hd[static_cast<std::size_t>(g)], c.y + m0 * s.H, n, s.H, s.F);
        }
      }
    } else if (gate_up) {
      CK(sk::launch_grouped_gate_up_swiglu(c.x, c.d_off, s.G, c.M, w.pg, w.pu, s.H, s.H, s.F, c.h, g_stream, path, &w.maps_up));
    } else {
      CK(sk::launch_grouped_down(c.h, c.d_off, s.G, c.M, w.pd, s.F, s.F, s.H, c.y, g_stream, path, &w.maps_down));
    }
  };
  double const mean_s = timed_launches(state, launch);
  double const rows = static_cast<double>(c.off.back());
  double const in = gate_up ? s.H : s.F, out = gate_up ? 2.0 * s.F : s.H;
  double const flops = 2.0 * rows * in * out;
  double const wbytes = static_cast<double>(c.active) * in * out * 2.0;
  double const abytes = rows * (in + (gate_up ? s.F : s.H)) * 2.0;
  double const floor_s = std::max((wbytes + abytes) / g_hbm_bw, flops / g_gemm_rate);
  state.counters["TFLOPs"] = flops / mean_s * 1e-12;
  state.counters["weight_GBps"] = wbytes / mean_s * 1e-9;
  state.counters["floor_us"] = floor_s * 1e6;
  state.counters["floor_ratio"] = mean_s / floor_s;
  state.counters["rows"] = rows;
  double tile_rows = 0, short_last = 0;  // rows the 128-row tiles span; groups whose last tile has <= 64 rows
  for (auto const n : c.counts) {
    tile_rows += static_cast<double>((n + 127) / 128 * 128);
    short_last += n % 128 != 0 && n % 128 <= 64 ? 1 : 0;
  }
  state.counters["tile_rows"] = tile_rows;
  state.counters["short_last_tiles"] = short_last;
  state.counters["experts"] = c.active;
  std::string const key = std::string(s.name) + (gate_up ? "/gate_up/" : "/down/") + std::to_string(tokens);
  if (which == impl::cublas) {
    g_cublas_time[key] = mean_s;
  } else if (auto const it = g_cublas_time.find(key); it != g_cublas_time.end()) {
    state.counters["vs_cublas"] = mean_s / it->second;
  }
}

void bench(benchmark::State& state, shape const* s, bool gate_up, impl which, int tokens) { run_case(state, *s, gate_up, which, tokens); }

/// gate/up reading its rows from token-order x through the routing's slots: the gather folded in
/// (launch_grouped_gate_up_swiglu_gathered, where grouped_gate_up_gather_pays) against the layer's
/// other way, the gather kernel writing expert-major rows and then gate/up (automatic paths both).
void bench_gathered(benchmark::State& state, shape const* sp, bool folded, int tokens) {
  shape const& s = *sp;
  weights& w = model_weights(s);
  case_data& c = get_case(s, tokens);
  bool const streams = sk::grouped_gemm_streams(s.G, c.M, s.F, 2, &w.maps_up);
  if (folded && !(streams ? sk::grouped_gate_up_gather_pays(s.G, c.M, s.F, &w.maps_up)
                          : sk::grouped_gate_up_gathers_in_wgmma(s.G, c.M, s.F, &w.maps_up))) {
    state.SkipWithError("the fold does not apply here (bulk stream kernel or wgmma kernel only)");
    return;
  }
  auto launch = [&] {
    if (folded) {
      CK(sk::launch_grouped_gate_up_swiglu_gathered(c.xt, c.slots, s.top_k, c.d_off, s.G, c.M, w.pg, w.pu, s.H, s.H, s.F, c.h, g_stream,
                                                    sk::grouped_gemm_path::automatic, &w.maps_up));
    } else {
      CK(sk::launch_gather_rows(c.xt, s.H, s.H, c.slots, s.top_k, c.d_off + s.G, c.M, c.x, g_stream));
      CK(sk::launch_grouped_gate_up_swiglu(c.x, c.d_off, s.G, c.M, w.pg, w.pu, s.H, s.H, s.F, c.h, g_stream,
                                           sk::grouped_gemm_path::automatic, &w.maps_up));
    }
  };
  double const mean_s = timed_launches(state, launch);
  double const rows = static_cast<double>(c.off.back());
  double const flops = 2.0 * rows * s.H * 2.0 * s.F;
  double const wbytes = static_cast<double>(c.active) * s.H * 2.0 * s.F * 2.0;
  double const abytes = rows * (s.H + s.F) * 2.0;  // the rows read once (from x) and h written
  double const floor_s = std::max((wbytes + abytes) / g_hbm_bw, flops / g_gemm_rate);
  state.counters["floor_us"] = floor_s * 1e6;
  state.counters["floor_ratio"] = mean_s / floor_s;
  state.counters["rows"] = rows;
}

/// The whole expert FFN of a decode step: the fused decode launch (kernels/decode_expert_ffn.cuh)
/// or the chain of the two grouped GEMMs (automatic paths, as the layer launches them).
/// chunk: 0 = the chain; 1 or 8 = the fused launch with rows in chunks of 1 or 8.
void bench_ffn(benchmark::State& state, shape const* sp, int chunk, int tokens) {
  bool const fused = chunk > 0;
  shape const& s = *sp;
  weights& w = model_weights(s);
  case_data& c = get_case(s, tokens);
  static unsigned* sync = nullptr;
  if (!sync) {
    CK(cudaMalloc(&sync, sk::decode_expert_ffn_sync_words(256) * sizeof(unsigned)));
    CK(cudaMemset(sync, 0, sk::decode_expert_ffn_sync_words(256) * sizeof(unsigned)));
  }
  sk::decode_expert_ffn_args a;
  a.x = c.x;
  a.offsets = c.d_off;
  a.G = s.G;
  a.M_total = c.M;
  a.w_gate = w.pg;
  a.w_up = w.pu;
  a.gate_up_ld = s.H;
  a.w_down = w.pd;
  a.down_ld = s.F;
  a.K = s.H;
  a.F = s.F;
  a.N = s.H;
  a.h = c.h;
  auto launch = [&] {
    if (fused) {
      CK(sk::launch_decode_expert_ffn(a, c.y, sync, g_stream, chunk == 1));
    } else {
      CK(sk::launch_grouped_gate_up_swiglu(c.x, c.d_off, s.G, c.M, w.pg, w.pu, s.H, s.H, s.F, c.h, g_stream,
                                           sk::grouped_gemm_path::automatic, &w.maps_up));
      CK(sk::launch_grouped_down(c.h, c.d_off, s.G, c.M, w.pd, s.F, s.F, s.H, c.y, g_stream, sk::grouped_gemm_path::automatic,
                                 &w.maps_down));
    }
  };
  double const mean_s = timed_launches(state, launch);
  double const wbytes = static_cast<double>(c.active) * 3.0 * s.H * s.F * 2.0;
  double const floor_s = wbytes / g_hbm_bw;
  state.counters["weight_GBps"] = wbytes / mean_s * 1e-9;
  state.counters["floor_us"] = floor_s * 1e6;
  state.counters["floor_ratio"] = mean_s / floor_s;
  state.counters["experts"] = c.active;
}

}  // namespace

int main(int argc, char** argv) {
  CK(cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking));
  CK(cudaEventCreate(&g_e0));
  CK(cudaEventCreate(&g_e1));
  check(cublasCreate(&g_cublas), "cublasCreate");
  check(cublasSetStream(g_cublas, g_stream), "cublasSetStream");
  g_hbm_bw = specmoe_bench::measured_ceilings().hbm_bytes_per_s;
  g_gemm_rate = specmoe_bench::measured_ceilings().gemm_flops_per_s;
  for (auto const& s : shapes) {
    for (int tokens : token_counts) {
      for (bool gate_up : {true, false}) {
        for (impl which : {impl::cublas, impl::ours, impl::stream, impl::stream_registers, impl::mma, impl::wgmma}) {
          // the forced stream paths re-read weights per 8 rows: only where groups are small
          double const rows_per_group = static_cast<double>(tokens) * s.top_k / s.E;
          if ((which == impl::stream || which == impl::stream_registers) && rows_per_group > 64) continue;
          std::string const name = std::string(s.name) + (gate_up ? "/gate_up/" : "/down/") + impl_name(which) + "/tokens:" + std::to_string(tokens);
          benchmark::RegisterBenchmark(name.c_str(), bench, &s, gate_up, which, tokens)->UseManualTime()->Unit(benchmark::kMicrosecond);
        }
      }
    }
  }
  for (auto const& s : shapes) {  // gate/up with its gather folded in, beside gather then gate/up
    for (int tokens : token_counts) {
      for (bool folded : {false, true}) {
        std::string const name = std::string(s.name) + "/gate_up/" + (folded ? "gathered" : "gather_then") + "/tokens:" + std::to_string(tokens);
        benchmark::RegisterBenchmark(name.c_str(), bench_gathered, &s, folded, tokens)->UseManualTime()->Unit(benchmark::kMicrosecond);
      }
    }
  }
  for (auto const& s : shapes) {  // the fused decode FFN where it applies (F <= 2048), beside the chain
    if (s.F > sk::decode_expert_ffn_max_ffn) continue;
    for (int tokens : {1, 2, 4, 16}) {
      for (int chunk : {0, 1, 8}) {
        if (tokens == 1 && chunk == 8) continue;
        std::string const name = std::string(s.name) + "/ffn/" + (chunk == 0 ? "chain" : chunk == 1 ? "fused" : "fused_chunk8") +
                                 "/tokens:" + std::to_string(tokens);
        benchmark::RegisterBenchmark(name.c_str(), bench_ffn, &s, chunk, tokens)->UseManualTime()->Unit(benchmark::kMicrosecond);
      }
    }
  }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  cublasDestroy(g_cublas);
  return 0;
}
