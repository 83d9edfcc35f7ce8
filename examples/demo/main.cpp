// specmoe-demo: two MoE layers (Mixtral-like and DeepSeek-V3-like shapes) on the host reference
// over D simulated expert-parallel ranks, checked against a dense per-token reference.
//
//   specmoe-demo [--ranks D] [--tokens-per-rank N] [--seed S]
#include <specmoe/specmoe.hpp>
#include <specmoe/synthetic/random_layer.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

namespace {

using specmoe::bf16;
using clock_type = std::chrono::steady_clock;

struct options {
  int ranks = 4;
  std::int64_t tokens_per_rank = 128;
  std::uint64_t seed = 2026;
};

options parse(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; ++i) {
    std::string const a = argv[i];
    auto value = [&]() -> long long {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "specmoe-demo: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      char* end = nullptr;
      long long const v = std::strtoll(argv[++i], &end, 10);
      if (*end != '\0' || v < 0) {
        std::fprintf(stderr, "specmoe-demo: %s wants a non-negative integer, got '%s'\n", a.c_str(), argv[i]);
        std::exit(2);
      }
      return v;
    };
    if (a == "--ranks") {
      o.ranks = static_cast<int>(value());
    } else if (a == "--tokens-per-rank") {
      o.tokens_per_rank = value();
    } else if (a == "--seed") {
      o.seed = static_cast<std::uint64_t>(value());
    } else if (a == "--help" || a == "-h") {
      std::printf("usage: specmoe-demo [--ranks D] [--tokens-per-rank N] [--seed S]\n");
      std::exit(0);
    } else {
      std::fprintf(stderr, "specmoe-demo: unknown option '%s' (try --help)\n", a.c_str());
      std::exit(2);
    }
  }
  if (o.ranks < 1 || o.ranks > 64) {
    std::fprintf(stderr, "specmoe-demo: --ranks must be in [1, 64], got %d\n", o.ranks);
    std::exit(2);
  }
  return o;
}

double seconds_since(clock_type::time_point t0) {
  return std::chrono::duration<double>(clock_type::now() - t0).count();
}

std::string human_bytes(std::int64_t b) {
  char buf[32];
  if (b >= 1 << 20) {
    std::snprintf(buf, sizeof buf, "%.1f MiB", static_cast<double>(b) / (1 << 20));
  } else if (b >= 1 << 10) {
    std::snprintf(buf, sizeof buf, "%.1f KiB", static_cast<double>(b) / (1 << 10));
  } else {
    std::snprintf(buf, sizeof buf, "%lld B", static_cast<long long>(b));
  }
  return buf;
}

void print_traffic(char const* what, specmoe::traffic_matrix const& m) {
  std::printf("  %s bytes sent, row = sender, column = receiver:\n        ", what);
  for (int d = 0; d < m.num_ranks; ++d) std::printf("%11s%-2d", "rank ", d);
  std::printf("\n");
  for (int s = 0; s < m.num_ranks; ++s) {
    std::printf("  rank %-2d", s);
    for (int d = 0; d < m.num_ranks; ++d) {
      if (s == d) {
        std::printf("%13s", "-");
      } else {
        std::printf("%13s", human_bytes(m.bytes(s, d)).c_str());
      }
    }
    std::printf("\n");
  }
}

float max_abs_diff(std::vector<bf16> const& a, std::vector<bf16> const& b) {
  float m = 0.0f;
  for (std::size_t i = 0; i < a.size(); ++i) m = std::fmax(m, std::fabs(static_cast<float>(a[i]) - static_cast<float>(b[i])));
  return m;
}

// Runs one layer shape: plain expert parallelism, then with an oracle predictor moving tokens.
bool run_model(char const* title, specmoe::moe_config cfg, options const& o) {
  using namespace specmoe;
  auto const N = o.tokens_per_rank * cfg.num_ranks;
  auto const H = cfg.hidden_size;
  std::printf("\n== %s\n   %s\n", title, [&] {
    std::ostringstream os;
    os << cfg;
    return os.str();
  }().c_str());

  synthetic::random_layer<bf16> weights(cfg, o.seed);
  auto const x = synthetic::random_activations<bf16>(N, H, o.seed + 1);
  std::vector<std::int64_t> tokens_per_rank(static_cast<std::size_t>(cfg.num_ranks), o.tokens_per_rank);
  host_batch<bf16> batch{matrix_view<bf16 const>(x.data(), N, H), tokens_per_rank};

  auto t0 = clock_type::now();
  std::vector<bf16> expected(x.size());
  routing routed;
  dense_reference<bf16>(cfg, weights.weights(), batch.x, matrix_view<bf16>(expected.data(), N, H), std::nullopt, &routed);
  double const t_ref = seconds_since(t0);

  moe_layer<host_space> plain(cfg, weights.weights());
  std::vector<bf16> out(x.size());
  t0 = clock_type::now();
  plain.forward(batch, matrix_view<bf16>(out.data(), N, H));
  double const t_layer = seconds_since(t0);
  auto const& c = plain.last_counters();

  int experts_hit = 0;
  for (auto n : c.tokens_per_expert) experts_hit += n > 0;
  std::printf("   tokens %lld (%lld per rank)   activations %lld   experts hit %d of %d   local activation rate %.3f\n",
              static_cast<long long>(N), static_cast<long long>(o.tokens_per_rank),
              static_cast<long long>(c.activations), experts_hit, cfg.num_experts, c.lar());
  print_traffic("dispatch", c.dispatch);
  std::printf("  de-duplication: %lld token rows cross ranks instead of %lld (saves %.1f%% of dispatch bytes)\n",
              static_cast<long long>(c.dispatch_rows), static_cast<long long>(c.dispatch_rows_without_dedup),
              100.0 * c.dedup_saving());
  std::printf("  dispatch %s + routing metadata %s + combine %s = %s across ranks\n",
              human_bytes(c.dispatch.total()).c_str(), human_bytes(c.metadata_bytes).c_str(),
              human_bytes(c.combine.total()).c_str(), human_bytes(c.total_bytes()).c_str());
  bool const exact = std::memcmp(out.data(), expected.data(), out.size() * sizeof(bf16)) == 0;
  std::printf("  max |layer - dense reference| = %g (%s)\n", max_abs_diff(out, expected),
              exact ? "bit-identical" : "DIFFERENT");
  std::printf("  time: layer %.3f s, dense reference %.3f s\n", t_layer, t_ref);

  // Speculation: an oracle predictor and a placement that follows it move tokens before the gate.
  moe_layer<host_space, oracle_prediction<bf16>, follow_prediction> spec(
      cfg, weights.weights(), {.predictor = oracle_prediction<bf16>(weights.weights().router)});
  std::vector<bf16> out_spec(x.size());
  spec.forward(batch, matrix_view<bf16>(out_spec.data(), N, H));
  auto const& s = spec.last_counters();
  bool const exact_spec = std::memcmp(out_spec.data(), expected.data(), out.size() * sizeof(bf16)) == 0;
  std::printf("  with an oracle predictor moving tokens first: LAR %.3f -> %.3f, dispatch+combine %s -> %s "
              "(+ %s of token moves), output %s\n",
              c.lar(), s.lar(), human_bytes(c.dispatch.total() + c.combine.total()).c_str(),
              human_bytes(s.dispatch.total() + s.combine.total()).c_str(), human_bytes(s.shuffle.total()).c_str(),
              exact_spec ? "bit-identical" : "DIFFERENT");
  return exact && exact_spec;
}

}  // namespace

int main(int argc, char** argv) {
  auto const o = parse(argc, argv);
  std::printf("specmoe %d.%d.%d demo: host reference over %d simulated expert-parallel ranks (bf16 storage, fp32 math)\n",
              specmoe::version.major, specmoe::version.minor, specmoe::version.patch, o.ranks);
  std::printf("(the GPU layer is not part of this build yet: every rank runs on the CPU)\n");
  try {
    auto mixtral = specmoe::models::mixtral_8x7b(o.ranks);
    mixtral.hidden_size = 256;  // scaled down from 4096 x 14336 so the CPU reference runs in seconds
    mixtral.ffn_size = 512;
    auto deepseek = specmoe::models::deepseek_v3(o.ranks);
    deepseek.hidden_size = 256;  // scaled down from 7168 x 2048
    deepseek.ffn_size = 128;
    deepseek.shared_ffn_size = 128;
    bool ok = run_model("Mixtral-like: 8 experts, top-2, softmax", mixtral, o);
    ok = run_model("DeepSeek-V3-like: 256 experts in 8 groups (4 kept), top-8, sigmoid + bias, 1 shared expert",
                   deepseek, o) && ok;
    std::printf("\n%s\n", ok ? "OK: every output equals the dense reference bit for bit"
                             : "FAILED: an output differs from the dense reference");
    return ok ? 0 : 1;
  } catch (specmoe::error const& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}
