// Grouped expert GEMMs (kernels/grouped_gemm.cuh) against the host arithmetic of detail/host/ffn.hpp.
// Host-compiled: the launches go through grouped_gemm_gpu.cu (no Catch2 under nvcc, see
// tests/CMakeLists.txt).
#include "catch.hpp"
#include "kernels/grouped_gemm_gpu.hpp"

#include <specmoe/core/bfloat16.hpp>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

namespace {

using specmoe::bf16;
using gg_test::path;
using dptr = void const*;  // a device bf16 pointer, as the wrapper takes it

#define GG_CHECK(call)                                                          \
  do {                                                                          \
    cudaError_t const gg_err_ = (call);                                         \
    INFO(#call << " -> " << cudaGetErrorString(gg_err_));                       \
    REQUIRE(gg_err_ == cudaSuccess);                                            \
  } while (false)

template <class T>
struct dev_buf {
  T* p = nullptr;
  std::size_t n = 0;
  explicit dev_buf(std::size_t count) : n(count) {
    if (cudaMalloc(&p, std::max<std::size_t>(count, 1) * sizeof(T)) != cudaSuccess) p = nullptr;
  }
  dev_buf(dev_buf const&) = delete;
  dev_buf& operator=(dev_buf const&) = delete;
  ~dev_buf() { cudaFree(p); }
};

bf16 random_bf16(std::mt19937_64& rng, float scale) {
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  for (;;) {
    bf16 const v(d(rng) * scale);
    if (static_cast<float>(v) != 0.0f) return v;
  }
}

std::vector<bf16> random_vec(std::mt19937_64& rng, std::size_t n, float scale) {
  std::vector<bf16> v(n);
  for (auto& e : v) e = random_bf16(rng, scale);
  return v;
}

enum class sizes_kind { random, with_empty, one_holds_all };

/// Group sizes summing to `used` (<= M_total).
std::vector<std::int64_t> make_offsets(std::mt19937_64& rng, int G, std::int64_t used, sizes_kind kind) {
  std::vector<std::int64_t> count(static_cast<std::size_t>(G), 0);
  if (kind == sizes_kind::one_holds_all) {
    count[std::uniform_int_distribution<int>(0, G - 1)(rng)] = used;
  } else {
    std::vector<int> allowed;
    for (int g = 0; g < G; ++g) {
      if (kind == sizes_kind::random || G == 1 || g % 3 != 1) allowed.push_back(g);  // with_empty: every third group empty
    }
    std::vector<double> w(allowed.size());
    std::exponential_distribution<double> ex(1.0);
    for (auto& x : w) x = ex(rng);  // uneven, like real routing
    std::discrete_distribution<std::size_t> pick(w.begin(), w.end());
    for (std::int64_t i = 0; i < used; ++i) ++count[static_cast<std::size_t>(allowed[pick(rng)])];
  }
  std::vector<std::int64_t> off(static_cast<std::size_t>(G) + 1, 0);
  for (int g = 0; g < G; ++g) off[static_cast<std::size_t>(g) + 1] = off[static_cast<std::size_t>(g)] + count[static_cast<std::size_t>(g)];
  return off;
}

float to_f(bf16 v) { return static_cast<float>(v); }

/// Host reference, the arithmetic of detail/host/ffn.hpp: fp32 sums of products, h rounded to bf16.
void ref_gate_up(std::vector<bf16> const& x, std::vector<std::int64_t> const& off, std::vector<bf16> const& wg,
                 std::vector<bf16> const& wu, std::int64_t ld, std::int64_t expert_stride, int K, int F, std::vector<bf16>& h) {
  int const G = static_cast<int>(off.size()) - 1;
  std::vector<float> xf(static_cast<std::size_t>(K));
  for (int g = 0; g < G; ++g) {
    for (std::int64_t m = off[static_cast<std::size_t>(g)]; m < off[static_cast<std::size_t>(g) + 1]; ++m) {
      for (int k = 0; k < K; ++k) xf[static_cast<std::size_t>(k)] = to_f(x[static_cast<std::size_t>(m * K + k)]);
      for (int f = 0; f < F; ++f) {
        bf16 const* pg = wg.data() + g * expert_stride + f * ld;
        bf16 const* pu = wu.data() + g * expert_stride + f * ld;
        float sg = 0.0f, su = 0.0f;
        for (int k = 0; k < K; ++k) {
          sg += to_f(pg[k]) * xf[static_cast<std::size_t>(k)];
          su += to_f(pu[k]) * xf[static_cast<std::size_t>(k)];
        }
        h[static_cast<std::size_t>(m * F + f)] = bf16(sg / (1.0f + std::exp(-sg)) * su);
      }
    }
  }
}

void ref_down(std::vector<bf16> const& h, std::vector<std::int64_t> const& off, std::vector<bf16> const& wd, std::int64_t ld,
              std::int64_t expert_stride, int F, int N, std::vector<float>& y) {
  int const G = static_cast<int>(off.size()) - 1;
  std::vector<float> hf(static_cast<std::size_t>(F));
  for (int g = 0; g < G; ++g) {
    for (std::int64_t m = off[static_cast<std::size_t>(g)]; m < off[static_cast<std::size_t>(g) + 1]; ++m) {
      for (int f = 0; f < F; ++f) hf[static_cast<std::size_t>(f)] = to_f(h[static_cast<std::size_t>(m * F + f)]);
      for (int n = 0; n < N; ++n) {
        bf16 const* pw = wd.data() + g * expert_stride + n * ld;
        float s = 0.0f;
        for (int f = 0; f < F; ++f) s += to_f(pw[f]) * hf[static_cast<std::size_t>(f)];
        y[static_cast<std::size_t>(m * N + n)] = s;
      }
    }
  }
}

/// How many elements disagree, and a description of the first one.
struct mismatch_report {
  std::int64_t bad = 0;
  std::string first;
};

/// |a - b| <= 1e-2 (|b| + mean |b|) over the rows < used, no NaN; rows >= used must still hold the
/// poison pattern.
template <class Get, class Poisoned>
mismatch_report compare_rows(std::int64_t M_total, std::int64_t used, int cols, Get const& got_at, std::vector<float> const& ref,
                             Poisoned const& poisoned_at, std::string const& what) {
  double mean = 0.0;
  for (std::int64_t i = 0; i < used * cols; ++i) mean += std::fabs(ref[static_cast<std::size_t>(i)]);
  mean = used > 0 ? mean / static_cast<double>(used * cols) : 0.0;
  mismatch_report r;
  for (std::int64_t i = 0; i < used * cols; ++i) {
    double const a = got_at(i), b = ref[static_cast<std::size_t>(i)];
    if (!(std::fabs(a - b) <= 1e-2 * (std::fabs(b) + mean))) {
      if (r.bad == 0) {
        r.first = what + ": first mismatch at row " + std::to_string(i / cols) + " col " + std::to_string(i % cols) + ": got " +
                  std::to_string(a) + " want " + std::to_string(b);
      }
      ++r.bad;
    }
  }
  for (std::int64_t i = used * cols; i < M_total * cols; ++i) {
    if (!poisoned_at(i)) {
      if (r.bad == 0) r.first = what + ": padding row " + std::to_string(i / cols) + " was written";
      ++r.bad;
    }
  }
  return r;
}

struct problem {
  int G;
  std::int64_t M_total;
  std::int64_t used;  // offsets[G]
  int K, F, N;
  sizes_kind kind;
  bool fused_w13;  // w_up = w_gate + F * ld inside one [2F, K] block per expert; else separate, ld > K
};

std::string describe(problem const& p) {
  return "G=" + std::to_string(p.G) + " M_total=" + std::to_string(p.M_total) + " used=" + std::to_string(p.used) + " K=" +
         std::to_string(p.K) + " F=" + std::to_string(p.F) + " N=" + std::to_string(p.N) + " kind=" + std::to_string(static_cast<int>(p.kind)) +
         (p.fused_w13 ? " w13" : " separate");
}

char const* path_name(path p) {
  switch (p) {
    case path::stream: return "stream";
    case path::stream_registers: return "stream_registers";
    case path::mma: return "mma";
    case path::wgmma: return "wgmma";
    default: return "automatic";
  }
}

/// Everything on the device for one problem, with the host reference of h.
struct fixture {
  problem p;
  std::int64_t ld_up, ld_down, stride_up, stride_down;
  std::vector<bf16> x, wgu, wu_sep, wd;
  std::vector<std::int64_t> off;
  std::vector<bf16> h_ref;
  dev_buf<bf16> d_x, d_wgu, d_wu, d_wd, d_h;
  dev_buf<float> d_yf;
  dev_buf<bf16> d_y;
  dev_buf<std::int64_t> d_off;
  dev_buf<dptr> d_pg, d_pu, d_pd;
  gg_test::weight_maps_ptr maps_up, maps_down;  // the same pointers as tensor maps (wgmma path)

  static std::int64_t pad(int k, bool fused) { return fused ? k : k + 24; }

  fixture(problem const& pr, std::mt19937_64& rng)
      : p(pr),
        ld_up(pad(pr.K, pr.fused_w13)),
        ld_down(pad(pr.F, pr.fused_w13)),
        stride_up((pr.fused_w13 ? 2 : 1) * static_cast<std::int64_t>(pr.F) * ld_up),
        stride_down(static_cast<std::int64_t>(pr.N) * ld_down),
        d_x(static_cast<std::size_t>(pr.M_total * pr.K)),
        d_wgu(static_cast<std::size_t>(pr.G * stride_up)),
        d_wu(pr.fused_w13 ? 1 : static_cast<std::size_t>(pr.G * stride_up)),
        d_wd(static_cast<std::size_t>(pr.G * stride_down)),
        d_h(static_cast<std::size_t>(pr.M_total * pr.F)),
        d_yf(static_cast<std::size_t>(pr.M_total * pr.N)),
        d_y(static_cast<std::size_t>(pr.M_total * pr.N)),
        d_off(static_cast<std::size_t>(pr.G) + 1),
        d_pg(static_cast<std::size_t>(pr.G)),
        d_pu(static_cast<std::size_t>(pr.G)),
        d_pd(static_cast<std::size_t>(pr.G)) {
    REQUIRE(d_x.p);
    REQUIRE(d_wgu.p);
    REQUIRE(d_wu.p);
    REQUIRE(d_wd.p);
    REQUIRE(d_h.p);
    REQUIRE(d_yf.p);
    REQUIRE(d_y.p);
    REQUIRE(d_off.p);
    REQUIRE(d_pg.p);
    REQUIRE(d_pu.p);
    REQUIRE(d_pd.p);
    x = random_vec(rng, d_x.n, 1.0f);
    wgu = random_vec(rng, d_wgu.n, 2.0f / std::sqrt(static_cast<float>(p.K)));
    if (!p.fused_w13) wu_sep = random_vec(rng, d_wu.n, 2.0f / std::sqrt(static_cast<float>(p.K)));
    wd = random_vec(rng, d_wd.n, 2.0f / std::sqrt(static_cast<float>(p.F)));
    off = make_offsets(rng, p.G, p.used, p.kind);
    GG_CHECK(cudaMemcpy(d_x.p, x.data(), x.size() * 2, cudaMemcpyHostToDevice));
    GG_CHECK(cudaMemcpy(d_wgu.p, wgu.data(), wgu.size() * 2, cudaMemcpyHostToDevice));
    if (!p.fused_w13) GG_CHECK(cudaMemcpy(d_wu.p, wu_sep.data(), wu_sep.size() * 2, cudaMemcpyHostToDevice));
    GG_CHECK(cudaMemcpy(d_wd.p, wd.data(), wd.size() * 2, cudaMemcpyHostToDevice));
    GG_CHECK(cudaMemcpy(d_off.p, off.data(), off.size() * sizeof(std::int64_t), cudaMemcpyHostToDevice));
    // groups point at their slots in reverse order: the kernels must follow the pointers
    std::vector<dptr> pg(static_cast<std::size_t>(p.G)), pu(pg.size()), pd(pg.size());
    bf16 const* gu = d_wgu.p;
    bf16 const* us = d_wu.p;
    bf16 const* dd = d_wd.p;
    for (int g = 0; g < p.G; ++g) {
      int const slot = p.G - 1 - g;
      pg[static_cast<std::size_t>(g)] = gu + slot * stride_up;
      pu[static_cast<std::size_t>(g)] = p.fused_w13 ? gu + slot * stride_up + static_cast<std::int64_t>(p.F) * ld_up : us + slot * stride_up;
      pd[static_cast<std::size_t>(g)] = dd + slot * stride_down;
    }
    GG_CHECK(cudaMemcpy(d_pg.p, pg.data(), pg.size() * sizeof(void*), cudaMemcpyHostToDevice));
    GG_CHECK(cudaMemcpy(d_pu.p, pu.data(), pu.size() * sizeof(void*), cudaMemcpyHostToDevice));
    GG_CHECK(cudaMemcpy(d_pd.p, pd.data(), pd.size() * sizeof(void*), cudaMemcpyHostToDevice));
    maps_up = gg_test::make_gate_up_maps(pg.data(), pu.data(), p.G, p.F, p.K, ld_up);
    maps_down = gg_test::make_down_maps(pd.data(), p.G, p.N, p.F, ld_down);
    GG_CHECK(gg_test::maps_status(maps_up.get()));
    GG_CHECK(gg_test::maps_status(maps_down.get()));

    compute_h_ref();
  }

  /// Replaces x (host and device) and its reference h.
  void set_x(std::vector<bf16> const& nx) {
    REQUIRE(nx.size() == x.size());
    x = nx;
    GG_CHECK(cudaMemcpy(d_x.p, x.data(), x.size() * 2, cudaMemcpyHostToDevice));
    compute_h_ref();
  }

  /// The host reference of h, on the weights as the groups see them (reversed slots).
  void compute_h_ref() {
    std::vector<bf16> wg_g(static_cast<std::size_t>(p.G * stride_up)), wu_g(wg_g.size());
    for (int g = 0; g < p.G; ++g) {
      auto const slot = static_cast<std::size_t>(p.G - 1 - g);
      auto const dst = static_cast<std::size_t>(g) * static_cast<std::size_t>(stride_up);
      std::copy_n(wgu.begin() + static_cast<std::ptrdiff_t>(slot * stride_up), stride_up, wg_g.begin() + static_cast<std::ptrdiff_t>(dst));
      if (p.fused_w13) {
        std::copy_n(wgu.begin() + static_cast<std::ptrdiff_t>(slot * stride_up + p.F * ld_up), p.F * ld_up,
                    wu_g.begin() + static_cast<std::ptrdiff_t>(dst));
      } else {
        std::copy_n(wu_sep.begin() + static_cast<std::ptrdiff_t>(slot * stride_up), stride_up, wu_g.begin() + static_cast<std::ptrdiff_t>(dst));
      }
    }
    h_ref.assign(static_cast<std::size_t>(p.M_total * p.F), bf16::from_bits(0xFFFF));
    ref_gate_up(x, off, wg_g, wu_g, ld_up, stride_up, p.K, p.F, h_ref);
  }

  std::vector<bf16> down_weights_by_group() const {
    std::vector<bf16> w(wd.size());
    for (int g = 0; g < p.G; ++g) {
      auto const slot = static_cast<std::size_t>(p.G - 1 - g);
      std::copy_n(wd.begin() + static_cast<std::ptrdiff_t>(slot * stride_down), stride_down,
                  w.begin() + static_cast<std::ptrdiff_t>(static_cast<std::size_t>(g) * stride_down));
    }
    return w;
  }

  cudaError_t gate_up(path pa, cudaStream_t s) {
    return gg_test::gate_up(d_x.p, d_off.p, p.G, p.M_total, d_pg.p, d_pu.p, ld_up, p.K, p.F, d_h.p, s, pa, maps_up.get());
  }
  cudaError_t down(path pa, cudaStream_t s) {
    return gg_test::down(d_h.p, d_off.p, p.G, p.M_total, d_pd.p, ld_down, p.F, p.N, d_y.p, s, pa, maps_down.get());
  }
  cudaError_t gate_up_wgmma(bool staged) { return gg_test::gate_up_wgmma(d_x.p, d_off.p, p.G, p.M_total, p.K, p.F, d_h.p, maps_up.get(), staged); }
  cudaError_t down_wgmma(bool staged) { return gg_test::down_wgmma(d_h.p, d_off.p, p.G, p.M_total, p.F, p.N, d_y.p, maps_down.get(), staged); }
  cudaError_t down_f32(path pa, cudaStream_t s) {
    return gg_test::down_f32(d_h.p, d_off.p, p.G, p.M_total, d_pd.p, ld_down, p.F, p.N, d_yf.p, s, pa, maps_down.get());
  }
  /// The fused decode FFN's arguments on this fixture's buffers (dense expert-major rows of d_x).
  gg_test::decode_ffn_args decode_args() const {
    gg_test::decode_ffn_args a;
    a.x = d_x.p;
    a.offsets = d_off.p;
    a.G = p.G;
    a.M_total = p.M_total;
    a.w_gate = d_pg.p;
    a.w_up = d_pu.p;
    a.gate_up_ld = ld_up;
    a.w_down = d_pd.p;
    a.down_ld = ld_down;
    a.K = p.K;
    a.F = p.F;
    a.N = p.N;
    a.h = d_h.p;
    return a;
  }
  void poison() {
    GG_CHECK(cudaMemset(d_h.p, 0xFF, d_h.n * 2));
    GG_CHECK(cudaMemset(d_y.p, 0xFF, d_y.n * 2));
    GG_CHECK(cudaMemset(d_yf.p, 0xFF, d_yf.n * 4));
  }

  /// Checks h, y (bf16) and y (fp32) on the device against the host; y's reference is computed
  /// from the device's h, so the down GEMM is checked on its own input.
  void check(std::string const& what) {
    std::vector<bf16> h(d_h.n), y(d_y.n);
    std::vector<float> yf(d_yf.n);
    GG_CHECK(cudaMemcpy(h.data(), d_h.p, h.size() * 2, cudaMemcpyDeviceToHost));
    GG_CHECK(cudaMemcpy(y.data(), d_y.p, y.size() * 2, cudaMemcpyDeviceToHost));
    GG_CHECK(cudaMemcpy(yf.data(), d_yf.p, yf.size() * 4, cudaMemcpyDeviceToHost));
    std::int64_t const used = off.back();
    std::vector<float> href(h_ref.size());
    for (std::size_t i = 0; i < href.size(); ++i) href[i] = to_f(h_ref[i]);
    auto const bad_h = compare_rows(
        p.M_total, used, p.F, [&](std::int64_t i) { return static_cast<double>(to_f(h[static_cast<std::size_t>(i)])); }, href,
        [&](std::int64_t i) { return h[static_cast<std::size_t>(i)].bits == 0xFFFF; }, what + " h");
    INFO(bad_h.first);
    CHECK(bad_h.bad == 0);
    std::vector<float> yref(static_cast<std::size_t>(p.M_total * p.N), 0.0f);
    ref_down(h, off, down_weights_by_group(), ld_down, stride_down, p.F, p.N, yref);
    auto const bad_y = compare_rows(
        p.M_total, used, p.N, [&](std::int64_t i) { return static_cast<double>(to_f(y[static_cast<std::size_t>(i)])); }, yref,
        [&](std::int64_t i) { return y[static_cast<std::size_t>(i)].bits == 0xFFFF; }, what + " y");
    INFO(bad_y.first);
    CHECK(bad_y.bad == 0);
    auto const bad_yf = compare_rows(
        p.M_total, used, p.N, [&](std::int64_t i) { return static_cast<double>(yf[static_cast<std::size_t>(i)]); }, yref,
        [&](std::int64_t i) {
          std::uint32_t b;
          std::memcpy(&b, &yf[static_cast<std::size_t>(i)], 4);
          return b == 0xFFFFFFFFu;
        },
        what + " y fp32");
    INFO(bad_yf.first);
    CHECK(bad_yf.bad == 0);
  }
};

std::vector<problem> problems() {
  return {
      {1, 1, 1, 64, 64, 64, sizes_kind::random, true},
      {1, 16384, 16384, 128, 128, 128, sizes_kind::random, true},
      {8, 3, 2, 256, 192, 128, sizes_kind::random, false},
      {8, 37, 37, 200, 136, 72, sizes_kind::with_empty, false},
      {8, 600, 512, 520, 264, 136, sizes_kind::one_holds_all, true},
      {8, 1000, 1000, 256, 128, 256, sizes_kind::random, true},
      {32, 77, 70, 128, 256, 128, sizes_kind::with_empty, true},
      {32, 4096, 4000, 192, 128, 64, sizes_kind::with_empty, false},
      {128, 128, 100, 128, 96, 64, sizes_kind::random, true},
      {128, 1024, 1024, 64, 64, 64, sizes_kind::with_empty, true},
      {128, 16384, 16000, 64, 64, 128, sizes_kind::random, false},
      {128, 2000, 2000, 128, 128, 128, sizes_kind::one_holds_all, true},
      {16, 4096, 4000, 576, 392, 520, sizes_kind::with_empty, false},
      {4, 2100, 2048, 1032, 264, 1096, sizes_kind::random, true},
      // stream path on grids of >= 4096 blocks (many small groups, long outputs)
      {64, 128, 120, 256, 2000, 136, sizes_kind::random, true},
      {64, 128, 128, 256, 136, 2000, sizes_kind::with_empty, false},
      // wgmma: too many groups for the staged epilogue's buffer, so the direct one (bf16 and fp32)
      {2000, 6000, 5800, 64, 136, 72, sizes_kind::with_empty, true},
  };
}

/// problems() and decode shapes for the stream kernels: one token's 8 groups of 128, 16 tokens' 1-2
/// rows a group, a long k in few groups; then G up, down and up again (the bulk kernel's
/// shared-memory limit must not stay at a smaller G's size).
std::vector<problem> stream_problems() {
  auto p = problems();
  p.push_back({128, 8, 8, 2048, 768, 2048, sizes_kind::random, true});
  p.push_back({128, 128, 128, 2048, 768, 2048, sizes_kind::with_empty, false});
  p.push_back({8, 2, 2, 4096, 1024, 4096, sizes_kind::random, true});
  p.push_back({16, 16, 16, 256, 128, 256, sizes_kind::random, true});
  p.push_back({128, 64, 64, 256, 128, 256, sizes_kind::with_empty, true});
  return p;
}

/// The wgmma path runs on sm_90 devices only (and needs an sm_90a build, which the tests are).
bool device_is_sm90() {
  int dev = 0, major = 0, minor = 0;
  return cudaGetDevice(&dev) == cudaSuccess && cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
         cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) == cudaSuccess && major == 9 && minor == 0;
}

}  // namespace

TEST_CASE("grouped_gemm: gate_up+swiglu and down match the host reference on every path") {
  int dev_count = 0;
  REQUIRE((cudaGetDeviceCount(&dev_count) == cudaSuccess && dev_count > 0));  // a GPU test: no GPU is a failure
  bool const sm90 = device_is_sm90();
  std::mt19937_64 rng(20261123);
  int staged_runs = 0;  // problems that ran the wgmma kernels with the staged epilogue forced
  for (auto const& pr : problems()) {
    fixture fx(pr, rng);
    for (auto const path : {path::automatic, path::stream, path::stream_registers, path::mma, path::wgmma}) {
      if (path == path::wgmma && !sm90) continue;
      std::string const what = describe(pr) + " path=" + path_name(path);
      INFO(what);
      fx.poison();
      GG_CHECK(fx.gate_up(path, nullptr));
      GG_CHECK(fx.down(path, nullptr));
      GG_CHECK(fx.down_f32(path, nullptr));
      GG_CHECK(cudaDeviceSynchronize());
      fx.check(what);
    }
    // the wgmma path's two bf16 epilogues, each forced (the automatic choice runs one of them above)
    for (bool const staged : {false, true}) {
      if (!sm90) break;
      std::string const what = describe(pr) + (staged ? " wgmma staged" : " wgmma direct");
      INFO(what);
      fx.poison();
      cudaError_t const gu = fx.gate_up_wgmma(staged), dn = fx.down_wgmma(staged);
      if (staged && (gu == cudaErrorNotSupported || dn == cudaErrorNotSupported)) continue;  // too many groups for its buffer
      GG_CHECK(gu);
      GG_CHECK(dn);
      GG_CHECK(fx.down_f32(path::wgmma, nullptr));
      GG_CHECK(cudaDeviceSynchronize());
      fx.check(what);
      staged_runs += staged;
    }
  }
  if (sm90) CHECK(staged_runs >= 10);
}

TEST_CASE("grouped_gemm: the bulk-copy and the register-fed stream kernels give the same bits") {
  int dev_count = 0;
  REQUIRE((cudaGetDeviceCount(&dev_count) == cudaSuccess && dev_count > 0));  // a GPU test: no GPU is a failure
  std::mt19937_64 rng(99);
  auto const problems_here = stream_problems();
  bool const sm90 = device_is_sm90();
  for (auto const& pr : problems_here) {
    fixture fx(pr, rng);
    std::string const what = describe(pr);
    INFO(what);
    bool const bulk_expected = sm90 && pr.G <= 1024;  // within both kernels' shared memory
    if (bulk_expected) {
      CHECK(gg_test::stream_bulk_runs(pr.G, 2));
      CHECK(gg_test::stream_bulk_runs(pr.G, 1));
    }
    std::vector<std::vector<unsigned char>> got[2];
    for (int v = 0; v < 2; ++v) {
      auto const pa = v == 0 ? path::stream : path::stream_registers;
      fx.poison();
      GG_CHECK(fx.gate_up(pa, nullptr));
      GG_CHECK(fx.down(pa, nullptr));
      GG_CHECK(fx.down_f32(pa, nullptr));
      GG_CHECK(cudaDeviceSynchronize());
      if (v == 0) fx.check(what + " path=stream");
      if (v == 0 && bulk_expected) {  // the launches went through the bulk kernel's launch path
        CHECK(gg_test::stream_bulk_launched_for(pr.G, 2));
        CHECK(gg_test::stream_bulk_launched_for(pr.G, 1));
      }
      for (auto const& [ptr, bytes] : {std::pair<void const*, std::size_t>{fx.d_h.p, fx.d_h.n * 2}, {fx.d_y.p, fx.d_y.n * 2},
                                       {fx.d_yf.p, fx.d_yf.n * 4}}) {
        std::vector<unsigned char> b(bytes);
        GG_CHECK(cudaMemcpy(b.data(), ptr, bytes, cudaMemcpyDeviceToHost));
        got[v].push_back(std::move(b));
      }
    }
    for (std::size_t i = 0; i < got[0].size(); ++i) {
      INFO("output " << (i == 0 ? "h" : i == 1 ? "y" : "y fp32"));
      CHECK(got[0][i] == got[1][i]);
    }
  }
}

TEST_CASE("grouped_gemm: gate_up with the gather folded in equals gather then gate_up, bit for bit, on every path") {
  int dev_count = 0;
  REQUIRE((cudaGetDeviceCount(&dev_count) == cudaSuccess && dev_count > 0));  // a GPU test: no GPU is a failure
  std::mt19937_64 rng(5);
  bool const sm90 = device_is_sm90();
  auto const problems_here = stream_problems();
  int streamed_automatic = 0;
  int wgmma_folded = 0;  // problems that ran the gathered wgmma kernel with the staged epilogue
  for (auto const& pr : problems_here) {
    for (int top_k : {1, 3}) {
      if (top_k == 3 && pr.M_total > 4096) continue;  // (the large problems once)
      fixture fx(pr, rng);
      std::string const what = describe(pr) + " top_k=" + std::to_string(top_k);
      INFO(what);
      // x in token order: expert-major row m is token slots[m] / top_k, each token's row once
      std::vector<std::int32_t> perm(static_cast<std::size_t>(pr.M_total));
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), rng);
      std::vector<std::int32_t> slots(perm.size());
      std::vector<bf16> x_tokens(fx.x.size());
      for (std::size_t m = 0; m < perm.size(); ++m) {
        slots[m] = perm[m] * top_k + static_cast<std::int32_t>(rng() % static_cast<std::uint64_t>(top_k));
        std::copy_n(fx.x.begin() + static_cast<std::ptrdiff_t>(m * static_cast<std::size_t>(pr.K)), pr.K,
                    x_tokens.begin() + static_cast<std::ptrdiff_t>(static_cast<std::size_t>(perm[m]) * static_cast<std::size_t>(pr.K)));
      }
      dev_buf<bf16> d_xt(x_tokens.size());
      dev_buf<std::int32_t> d_slots(slots.size());
      REQUIRE(d_xt.p);
      REQUIRE(d_slots.p);
      GG_CHECK(cudaMemcpy(d_xt.p, x_tokens.data(), x_tokens.size() * 2, cudaMemcpyHostToDevice));
      GG_CHECK(cudaMemcpy(d_slots.p, slots.data(), slots.size() * 4, cudaMemcpyHostToDevice));
      auto gathered = [&](path pa) {
        return gg_test::gate_up_gathered(d_xt.p, d_slots.p, top_k, fx.d_off.p, pr.G, pr.M_total, fx.d_pg.p, fx.d_pu.p, fx.ld_up, pr.K,
                                         pr.F, fx.d_h.p, nullptr, pa, fx.maps_up.get());
      };
      std::vector<bf16> want(fx.d_h.n), got(fx.d_h.n);
      auto same_bits = [&](auto&& plain, auto&& folded) {
        fx.poison();
        GG_CHECK(plain());
        GG_CHECK(cudaMemcpy(want.data(), fx.d_h.p, want.size() * 2, cudaMemcpyDeviceToHost));
        fx.poison();
        GG_CHECK(folded());
        GG_CHECK(cudaMemcpy(got.data(), fx.d_h.p, got.size() * 2, cudaMemcpyDeviceToHost));
        CHECK(std::memcmp(want.data(), got.data(), want.size() * 2) == 0);
      };
      for (auto const pa : {path::stream, path::stream_registers, path::wgmma}) {
        if (pa == path::wgmma && !sm90) continue;
        INFO("path=" << path_name(pa));
        same_bits([&] { return fx.gate_up(pa, nullptr); }, [&] { return gathered(pa); });
      }
      // the wgmma kernel's two epilogues, each forced, with one-row TMA boxes for A
      for (bool const staged : {false, true}) {
        if (!sm90) break;
        INFO((staged ? "wgmma staged" : "wgmma direct"));
        if (staged && fx.gate_up_wgmma(true) == cudaErrorNotSupported) continue;  // too many groups for its buffer
        same_bits([&] { return fx.gate_up_wgmma(staged); },
                  [&] {
                    return gg_test::gate_up_wgmma_gathered(d_xt.p, d_slots.p, top_k, fx.d_off.p, pr.G, pr.M_total, pr.K, pr.F, fx.d_h.p,
                                                           fx.maps_up.get(), staged);
                  });
        wgmma_folded += staged;
      }
      // the mma path reads A in place: refused, nothing written
      fx.poison();
      CHECK(gathered(path::mma) == cudaErrorInvalidValue);
      bool const streams = gg_test::gemm_streams(pr.G, pr.M_total, pr.F, 2, fx.maps_up.get());
      bool const folds = streams || sm90;  // (on sm_90 the automatic choice is a stream or the wgmma kernel)
      if (sm90) CHECK(gg_test::gate_up_gather_pays(pr.G, pr.M_total, pr.F, fx.maps_up.get()) ==
                      (streams ? gg_test::stream_bulk_runs(pr.G, 2) : gg_test::wgmma_gather_in_layer));
      fx.poison();
      GG_CHECK(fx.gate_up(path::automatic, nullptr));
      GG_CHECK(cudaMemcpy(want.data(), fx.d_h.p, want.size() * 2, cudaMemcpyDeviceToHost));
      fx.poison();
      CHECK(gathered(path::automatic) == (folds ? cudaSuccess : cudaErrorInvalidValue));
      GG_CHECK(cudaDeviceSynchronize());
      GG_CHECK(cudaMemcpy(got.data(), fx.d_h.p, got.size() * 2, cudaMemcpyDeviceToHost));
      if (folds) {
        CHECK(std::memcmp(want.data(), got.data(), want.size() * 2) == 0);
        streamed_automatic += streams;
      } else {
        CHECK(std::all_of(got.begin(), got.end(), [](bf16 v) { return v.bits == 0xFFFF; }));
      }
    }
  }
  CHECK(streamed_automatic >= 4);  // the decode-sized problems take the fold automatically
  if (sm90) CHECK(wgmma_folded >= 10);
}

TEST_CASE("grouped_gemm: launches captured in a CUDA graph give the same result") {
  int dev_count = 0;
  REQUIRE((cudaGetDeviceCount(&dev_count) == cudaSuccess && dev_count > 0));  // a GPU test: no GPU is a failure
  bool const sm90 = device_is_sm90();
  std::mt19937_64 rng(7);
  for (auto const& pr : {problem{32, 300, 290, 256, 128, 128, sizes_kind::with_empty, true},
                         problem{8, 4, 4, 256, 128, 128, sizes_kind::random, true},
                         problem{8, 2048, 2000, 256, 256, 256, sizes_kind::with_empty, true}}) {
    fixture fx(pr, rng);
    for (auto const path : {path::automatic, path::wgmma}) {
      if (path == path::wgmma && !sm90) continue;
      std::string const what = describe(pr) + " path=" + path_name(path) + " graph";
      INFO(what);
      cudaStream_t s = nullptr;
      GG_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
      fx.poison();
      cudaGraph_t graph = nullptr;
      GG_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
      GG_CHECK(fx.gate_up(path, s));
      GG_CHECK(fx.down(path, s));
      GG_CHECK(fx.down_f32(path, s));
      GG_CHECK(cudaStreamEndCapture(s, &graph));
      cudaGraphExec_t exec = nullptr;
      GG_CHECK(cudaGraphInstantiate(&exec, graph, 0));
      GG_CHECK(cudaGraphLaunch(exec, s));
      GG_CHECK(cudaStreamSynchronize(s));
      fx.check(what);
      // a second replay over re-poisoned outputs gives the same bits
      std::vector<bf16> y1(fx.d_y.n), y2(fx.d_y.n);
      GG_CHECK(cudaMemcpy(y1.data(), fx.d_y.p, y1.size() * 2, cudaMemcpyDeviceToHost));
      fx.poison();
      GG_CHECK(cudaGraphLaunch(exec, s));
      GG_CHECK(cudaStreamSynchronize(s));
      GG_CHECK(cudaMemcpy(y2.data(), fx.d_y.p, y2.size() * 2, cudaMemcpyDeviceToHost));
      CHECK(std::memcmp(y1.data(), y2.data(), y1.size() * 2) == 0);
      GG_CHECK(cudaGraphExecDestroy(exec));
      GG_CHECK(cudaGraphDestroy(graph));
      GG_CHECK(cudaStreamDestroy(s));
    }
  }
}

TEST_CASE("grouped_gemm: unsupported shapes are refused without launching") {
  int dev_count = 0;
  REQUIRE((cudaGetDeviceCount(&dev_count) == cudaSuccess && dev_count > 0));  // a GPU test: no GPU is a failure
  std::mt19937_64 rng(3);
  fixture fx(problem{8, 16, 16, 64, 64, 64, sizes_kind::random, true}, rng);
  void const* x = fx.d_x.p;
  void* h = fx.d_h.p;
  auto const au = path::automatic;
  CHECK(gg_test::gate_up(x, fx.d_off.p, 8, 16, fx.d_pg.p, fx.d_pu.p, 64, 60, 64, h, nullptr, au, nullptr) == cudaErrorInvalidValue);
  CHECK(gg_test::gate_up(x, fx.d_off.p, 0, 16, fx.d_pg.p, fx.d_pu.p, 64, 64, 64, h, nullptr, au, nullptr) == cudaErrorInvalidValue);
  CHECK(gg_test::gate_up(x, fx.d_off.p, 8, 16, fx.d_pg.p, fx.d_pu.p, 32, 64, 64, h, nullptr, au, nullptr) == cudaErrorInvalidValue);
  CHECK(gg_test::gate_up(x, fx.d_off.p, 8, 0, fx.d_pg.p, fx.d_pu.p, 64, 64, 64, h, nullptr, au, nullptr) == cudaSuccess);
  // wgmma: no maps, or maps built for another shape
  auto const wg = path::wgmma;
  CHECK(gg_test::gate_up(x, fx.d_off.p, 8, 16, fx.d_pg.p, fx.d_pu.p, 64, 64, 64, h, nullptr, wg, nullptr) == cudaErrorInvalidValue);
  CHECK(gg_test::gate_up(x, fx.d_off.p, 8, 16, fx.d_pg.p, fx.d_pu.p, 64, 64, 64, h, nullptr, wg, fx.maps_down.get()) ==
        cudaErrorInvalidValue);
  CHECK(gg_test::gate_up(x, fx.d_off.p, 8, 16, fx.d_pg.p, fx.d_pu.p, 64, 64, 56, h, nullptr, wg, fx.maps_up.get()) ==
        cudaErrorInvalidValue);
  CHECK(gg_test::maps_status(gg_test::make_empty_maps().get()) != cudaSuccess);
  GG_CHECK(cudaGetLastError());
  CHECK(gg_test::workspace_bytes(8, 16) == 0);
}

namespace {

/// The device buffers' bytes, for bit-for-bit comparisons.
template <class T>
std::vector<unsigned char> bytes_of(dev_buf<T> const& b) {
  std::vector<unsigned char> v(b.n * sizeof(T));
  if (cudaMemcpy(v.data(), b.p, v.size(), cudaMemcpyDeviceToHost) != cudaSuccess) v.clear();
  return v;
}

std::vector<problem> decode_problems() {
  return {
      {8, 8, 8, 256, 192, 128, sizes_kind::random, true},           // F: 12 bands of 16, K one step
      {128, 8, 8, 2048, 768, 2048, sizes_kind::random, true},       // Qwen3-30B-A3B's one token
      {8, 37, 37, 200, 136, 72, sizes_kind::with_empty, false},     // partial bands, K past a step
      {32, 77, 70, 128, 256, 128, sizes_kind::with_empty, true},    // padding rows stay untouched
      {16, 40, 40, 576, 1032, 520, sizes_kind::one_holds_all, false},  // 40 rows in one group, 8 steps held
      {256, 64, 64, 512, 2048, 264, sizes_kind::random, true},      // the largest F, G = 256
      {300, 20, 20, 64, 64, 64, sizes_kind::random, true},          // G past one block's scan
  };
}

}  // namespace

TEST_CASE("decode_expert_ffn: one launch equals the two stream GEMMs bit for bit, and the host reference") {
  int dev_count = 0;
  REQUIRE((cudaGetDeviceCount(&dev_count) == cudaSuccess && dev_count > 0));  // a GPU test: no GPU is a failure
  std::mt19937_64 rng(20261206);
  for (auto const& pr : decode_problems()) {
    fixture fx(pr, rng);
    dev_buf<unsigned> sync(gg_test::decode_ffn_sync_words(pr.G));
    REQUIRE(sync.p);
    GG_CHECK(cudaMemset(sync.p, 0, sync.n * sizeof(unsigned)));
    for (bool const through_slots : {false, true}) {
      // through the slots: x holds token rows, and row m of the expert-major order is token
      // slots[m] / top_k (a random stable-looking permutation, as a layout writes)
      int const top_k = 3;
      std::int64_t const used = fx.off.back();
      std::int64_t const tokens = (used + top_k - 1) / top_k + 1;
      dev_buf<bf16> d_tok(static_cast<std::size_t>(tokens * pr.K));
      dev_buf<std::int32_t> d_slots(static_cast<std::size_t>(std::max<std::int64_t>(used, 1)));
      REQUIRE(d_tok.p);
      REQUIRE(d_slots.p);
      if (through_slots) {
        auto const tok = random_vec(rng, d_tok.n, 1.0f);
        std::vector<std::int32_t> slot_ids(static_cast<std::size_t>(tokens * top_k));
        for (std::size_t i = 0; i < slot_ids.size(); ++i) slot_ids[i] = static_cast<std::int32_t>(i);
        std::shuffle(slot_ids.begin(), slot_ids.end(), rng);
        slot_ids.resize(static_cast<std::size_t>(used));
        auto permuted = fx.x;  // rows >= used keep their old values: nobody reads them
        for (std::int64_t m = 0; m < used; ++m) {
          auto const t = slot_ids[static_cast<std::size_t>(m)] / top_k;
          std::copy_n(tok.begin() + t * pr.K, pr.K, permuted.begin() + m * pr.K);
        }
        fx.set_x(permuted);
        GG_CHECK(cudaMemcpy(d_tok.p, tok.data(), tok.size() * 2, cudaMemcpyHostToDevice));
        if (used > 0) GG_CHECK(cudaMemcpy(d_slots.p, slot_ids.data(), slot_ids.size() * 4, cudaMemcpyHostToDevice));
      }
      // the peer: gate_up then down on the stream path, over the expert-major rows
      fx.poison();
      GG_CHECK(fx.gate_up(path::stream, nullptr));
      GG_CHECK(fx.down(path::stream, nullptr));
      GG_CHECK(fx.down_f32(path::stream, nullptr));
      GG_CHECK(cudaDeviceSynchronize());
      auto const h_peer = bytes_of(fx.d_h), y_peer = bytes_of(fx.d_y), yf_peer = bytes_of(fx.d_yf);
      auto args = fx.decode_args();
      if (through_slots) {
        args.x = d_tok.p;
        args.slots = d_slots.p;
        args.top_k = top_k;
      }
      for (bool const one_row_chunks : {true, false}) {
        for (int round = 0; round < 2; ++round) {  // twice: the counters are back to zero after a launch
          std::string const what = describe(pr) + (through_slots ? " slots" : " rows") + (one_row_chunks ? " chunk1" : " chunk8") +
                                   " round " + std::to_string(round);
          INFO(what);
          fx.poison();
          GG_CHECK(gg_test::decode_ffn(args, fx.d_y.p, sync.p, nullptr, one_row_chunks));
          GG_CHECK(gg_test::decode_ffn_f32(args, fx.d_yf.p, sync.p, nullptr, one_row_chunks));
          GG_CHECK(cudaDeviceSynchronize());
          CHECK(bytes_of(fx.d_h) == h_peer);
          CHECK(bytes_of(fx.d_y) == y_peer);
          CHECK(bytes_of(fx.d_yf) == yf_peer);
          fx.check(what);
          std::vector<unsigned> words(sync.n);
          GG_CHECK(cudaMemcpy(words.data(), sync.p, words.size() * sizeof(unsigned), cudaMemcpyDeviceToHost));
          CHECK(std::all_of(words.begin(), words.end(), [](unsigned w) { return w == 0; }));
        }
      }
    }
  }
}

TEST_CASE("decode_expert_ffn: replayed from a CUDA graph, and bad arguments refused") {
  int dev_count = 0;
  REQUIRE((cudaGetDeviceCount(&dev_count) == cudaSuccess && dev_count > 0));  // a GPU test: no GPU is a failure
  std::mt19937_64 rng(11);
  fixture fx(problem{128, 8, 8, 512, 768, 512, sizes_kind::random, true}, rng);
  dev_buf<unsigned> sync(gg_test::decode_ffn_sync_words(128));
  REQUIRE(sync.p);
  GG_CHECK(cudaMemset(sync.p, 0, sync.n * sizeof(unsigned)));
  auto const args = fx.decode_args();
  fx.poison();
  GG_CHECK(gg_test::decode_ffn(args, fx.d_y.p, sync.p, nullptr, true));
  GG_CHECK(cudaDeviceSynchronize());
  auto const y_direct = bytes_of(fx.d_y);
  cudaStream_t s = nullptr;
  GG_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaGraph_t graph = nullptr;
  GG_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
  GG_CHECK(gg_test::decode_ffn(args, fx.d_y.p, sync.p, s, true));
  GG_CHECK(cudaStreamEndCapture(s, &graph));
  cudaGraphExec_t exec = nullptr;
  GG_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  for (int replay = 0; replay < 3; ++replay) {
    fx.poison();
    GG_CHECK(cudaGraphLaunch(exec, s));
    GG_CHECK(cudaStreamSynchronize(s));
    CHECK(bytes_of(fx.d_y) == y_direct);
  }
  GG_CHECK(cudaGraphExecDestroy(exec));
  GG_CHECK(cudaGraphDestroy(graph));
  GG_CHECK(cudaStreamDestroy(s));

  // refused, nothing launched: the outputs keep their poison
  fx.poison();
  auto bad = args;
  bad.F = 2056;  // past decode_expert_ffn_max_ffn
  CHECK(gg_test::decode_ffn(bad, fx.d_y.p, sync.p, nullptr, true) == cudaErrorInvalidValue);
  bad = args;
  bad.K = 508;  // not a multiple of 8
  CHECK(gg_test::decode_ffn(bad, fx.d_y.p, sync.p, nullptr, true) == cudaErrorInvalidValue);
  bad = args;
  bad.down_ld = 760;  // shorter than F
  CHECK(gg_test::decode_ffn(bad, fx.d_y.p, sync.p, nullptr, true) == cudaErrorInvalidValue);
  bad = args;
  bad.w_down = nullptr;
  CHECK(gg_test::decode_ffn(bad, fx.d_y.p, sync.p, nullptr, true) == cudaErrorInvalidValue);
  CHECK(gg_test::decode_ffn(args, fx.d_y.p, nullptr, nullptr, true) == cudaErrorInvalidValue);
  bad = args;
  bad.M_total = 0;
  CHECK(gg_test::decode_ffn(bad, fx.d_y.p, sync.p, nullptr, true) == cudaSuccess);
  GG_CHECK(cudaDeviceSynchronize());
  auto const y_after = bytes_of(fx.d_y);
  CHECK(std::all_of(y_after.begin(), y_after.end(), [](unsigned char b) { return b == 0xFF; }));
}
