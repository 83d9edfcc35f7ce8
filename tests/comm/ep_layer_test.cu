// The multi-rank cuda layer (expert parallelism through a device CommBackend) against the host
// dense reference, one thread per rank. With one GPU the ranks share it (nvlink_direct then writes
// within the device: the same kernels, flags and protocol); with several, rank r runs on GPU r.
#include "support/cuda_testbed.cuh"
#include "support/ep_testbed.cuh"
#include "support/testbed.hpp"

#include <specmoe/comm/nccl_alltoallv.cuh>
#include <specmoe/comm/nvlink_direct.cuh>
#include <specmoe/layer/cuda_ep_layer.cuh>
#include <specmoe/layer/dense_reference.hpp>

#include <cstdlib>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <thread>

using namespace specmoe;
using specmoe::test::dev_buf;
using specmoe::test::device_count;
using specmoe::test::error_code;
using specmoe::test::error_text;
using specmoe::test::rank_weights;

namespace {

struct rank_input {
  std::vector<bf16> x;                    // [n, H]
  std::int64_t n = 0;
  std::optional<routing> given{};         // engine routing (else the gate runs)
};

struct rank_result {
  std::vector<bf16> out;
  routing used;
  std::vector<std::int32_t> sent;
  std::exception_ptr error;
};

enum class backend_kind { nvlink, nccl };

struct group_run {
  moe_config cfg;
  std::optional<expert_placement> placement{};  // default: contiguous blocks
  std::int64_t max_tokens = 256;
  std::chrono::milliseconds timeout{5000};
  std::function<bool(int)> forwards = [](int) { return true; };  // ranks that call forward
  std::function<moe_config(int)> rank_config{};                   // per-rank config (mismatch tests)
  int graph_replays = 0;  // > 0: capture the forward in a CUDA graph and replay it
  bool fp8_dispatch = false;  // nvlink_direct: rows cross as fp8
  std::function<void(int, moe_weights<bf16>&)> edit_weights{};  // per-rank weight views (local-failure tests)
};

template <class Comm>
using ep_layer = moe_layer<cuda_space, no_prediction, stay, explicit_placement, all_resident, Comm>;

// Runs one forward on every rank (a thread each) and returns each rank's output and routing.
std::vector<rank_result> run_group(group_run const& g, backend_kind kind, moe_weights<bf16> const& host,
                                   std::vector<rank_input> const& inputs) {
  int const D = static_cast<int>(inputs.size());
  int const devices = device_count();
  auto const placement = g.placement ? *g.placement : contiguous_blocks{}.place(g.cfg, 0);
  std::vector<rank_result> results(static_cast<std::size_t>(D));
  auto group = in_process_group::create(D, std::chrono::seconds(30));
  std::vector<cudaStream_t> streams(static_cast<std::size_t>(D));
  for (int r = 0; r < D; ++r) {
    SPECMOE_CUDA_TRY(cudaSetDevice(r % std::max(devices, 1)));
    SPECMOE_CUDA_TRY(cudaStreamCreateWithFlags(&streams[static_cast<std::size_t>(r)], cudaStreamNonBlocking));
  }
#if SPECMOE_HAS_NCCL
  std::vector<ncclComm_t> comms(static_cast<std::size_t>(D));
  if (kind == backend_kind::nccl) {
    std::vector<int> devs(static_cast<std::size_t>(D));
    for (int r = 0; r < D; ++r) devs[static_cast<std::size_t>(r)] = r % std::max(devices, 1);
    SPECMOE_NCCL_TRY(ncclCommInitAll(comms.data(), D, devs.data()));
  }
#endif
  auto body = [&](int r) {
    auto& res = results[static_cast<std::size_t>(r)];
    try {
      SPECMOE_CUDA_TRY(cudaSetDevice(r % std::max(devices, 1)));
      auto const cfg = g.rank_config ? g.rank_config(r) : g.cfg;
      auto const& in = inputs[static_cast<std::size_t>(r)];
      rank_weights w(g.cfg, host, placement.local_experts(r));
      if (g.edit_weights) g.edit_weights(r, w.views);
      cudaStream_t const stream = streams[static_cast<std::size_t>(r)];
      auto run = [&](auto comm) {
        using C = decltype(comm);
        ep_layer<C> layer(cfg, w.views, {.grouping = explicit_placement(placement), .comm = comm},
                          {.max_tokens = g.max_tokens});
        auto const H = cfg.hidden_size, k = cfg.top_k;
        dev_buf<bf16> x(in.x), out(static_cast<std::size_t>(in.n * H), 0xff);
        dev_buf<std::int32_t> ids(static_cast<std::size_t>(in.n * k), 0xff);
        dev_buf<float> wts(static_cast<std::size_t>(in.n * k), 0xff);
        std::unique_ptr<dev_buf<std::int32_t>> gids;
        std::unique_ptr<dev_buf<float>> gw;
        cuda_batch batch{matrix_view<bf16 const>(x.p, in.n, H)};
        if (in.given) {
          gids = std::make_unique<dev_buf<std::int32_t>>(in.given->topk_ids);
          gw = std::make_unique<dev_buf<float>>(in.given->topk_weights);
          batch.routing = routing_view{std::span<std::int32_t const>(gids->p, gids->n), std::span<float const>(gw->p, gw->n),
                                       in.n, k};
        }
        matrix_view<bf16> const out_view(out.p, in.n, H);
        // The gate once alone, for this shape: a library's first call may load code, which on a
        // shared GPU waits behind a peer's spinning kernels (one GPU per rank: no such wait).
        if (!in.given && in.n > 0) {
          layer.route_async(batch.x, {ids.p, wts.p}, stream);
          layer.check(stream);
        }
        // Every rank's buffers exist before any rank's kernels wait on peers (ranks sharing a GPU:
        // an allocation may wait for the device, whose spinning kernels wait for this rank).
        int token = r, tokens[kernels::ep_max_ranks];
        layer.comm().allgather(&token, sizeof token, tokens);
        std::exception_ptr failed;
        try {
          if (g.forwards(r) && g.graph_replays > 0) {
            cudaGraph_t graph;
            cudaGraphExec_t exec;
            SPECMOE_CUDA_TRY(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
            layer.forward_async(batch, out_view, stream, {ids.p, wts.p});
            SPECMOE_CUDA_TRY(cudaStreamEndCapture(stream, &graph));
            SPECMOE_CUDA_TRY(cudaGraphInstantiate(&exec, graph, 0));
            for (int i = 0; i < g.graph_replays; ++i) {
              SPECMOE_CUDA_TRY(cudaMemsetAsync(out.p, 0xff, out.n * sizeof(bf16), stream));
              SPECMOE_CUDA_TRY(cudaGraphLaunch(exec, stream));
            }
            layer.check(stream);
            cudaGraphExecDestroy(exec);
            cudaGraphDestroy(graph);
          } else if (g.forwards(r)) {
            // two forwards on the same buffers (the protocol's epochs advance), then the checks
            layer.forward_async(batch, out_view, stream, {ids.p, wts.p});
            SPECMOE_CUDA_TRY(cudaMemsetAsync(out.p, 0xff, out.n * sizeof(bf16), stream));
            layer.forward_async(batch, out_view, stream, {ids.p, wts.p});
            layer.check(stream);
          }
        } catch (...) {
          failed = std::current_exception();
        }
        res.out = out.host();
        res.used = routing(in.n, k);
        if (in.given) {
          res.used = *in.given;
        } else {
          res.used.topk_ids = ids.host();
          res.used.topk_weights = wts.host();
        }
        res.sent = layer.sent_rows(stream);
        // Nobody frees buffers a peer may still write into: meet before the layer and backend go.
        layer.comm().allgather(&token, sizeof token, tokens);
        if (failed) std::rethrow_exception(failed);
      };
      if (kind == backend_kind::nvlink) {
        nvlink_direct_options o;
        o.max_tokens = g.max_tokens;
        o.hidden = cfg.hidden_size;
        o.top_k = cfg.top_k;
        o.timeout = g.timeout;
        o.fp8_dispatch = g.fp8_dispatch;
        run(nvlink_direct(std::make_shared<in_process_group::member>(group->join(r)), o));
      } else {
#if SPECMOE_HAS_NCCL
        run(nccl_alltoallv(comms[static_cast<std::size_t>(r)], {g.max_tokens, cfg.hidden_size, cfg.top_k}, g.timeout));
#endif
      }
    } catch (...) {
      res.error = std::current_exception();
    }
  };
  std::vector<std::thread> threads;
  for (int r = 0; r < D; ++r) threads.emplace_back(body, r);
  for (auto& t : threads) t.join();
  for (auto st : streams) cudaStreamDestroy(st);
#if SPECMOE_HAS_NCCL
  if (kind == backend_kind::nccl)
    for (auto c : comms) ncclCommDestroy(c);
#endif
  return results;
}

// Each rank's output against the dense reference with the routing that rank used.
void require_matches_reference(moe_config const& cfg, moe_weights<bf16> const& host, std::vector<rank_input> const& in,
                               std::vector<rank_result> const& got) {
  auto const H = cfg.hidden_size;
  for (std::size_t r = 0; r < in.size(); ++r) {
    INFO("rank " << r << ": " << error_text(got[r].error));
    REQUIRE(!got[r].error);
    auto const n = in[r].n;
    REQUIRE(got[r].out.size() == static_cast<std::size_t>(n * H));
    std::vector<bf16> want(static_cast<std::size_t>(n * H));
    dense_reference<bf16>(cfg, host, matrix_view<bf16 const>(in[r].x.data(), n, H), matrix_view<bf16>(want.data(), n, H),
                          got[r].used.view());
    test::require_close(got[r].out, want, n, H);
  }
}

// Rows as the experts see them under fp8 dispatch: each group of 128 elements through e4m3 with
// its scale and back to bf16, by the same arithmetic as the kernels (kernels/ep_dispatch.cuh).
std::vector<bf16> fp8_rounded(std::vector<bf16> const& x, int H) {
  REQUIRE(H % kernels::ep_fp8_group == 0);
  std::vector<bf16> r(x.size());
  for (std::size_t base = 0; base < x.size(); base += kernels::ep_fp8_group) {
    float amax = 0.0f;
    for (int c = 0; c < kernels::ep_fp8_group; ++c) amax = std::max(amax, kernels::ep_fp8_magnitude(static_cast<float>(x[base + c])));
    float const inverse = kernels::ep_fp8_inverse(amax), scale = kernels::ep_fp8_scale(amax);
    for (int c = 0; c < kernels::ep_fp8_group; ++c)
      r[base + c] = bf16(kernels::ep_fp8_decode(kernels::ep_fp8_encode(static_cast<float>(x[base + c]), inverse), scale));
  }
  return r;
}

// Rows whose scale groups differ in magnitude (2^-8 .. 2^8), with an all-zero group and a group of
// values so small that 448 / amax overflows: a scale read from the wrong group, or one scale a
// row, would be off by powers of two; the tiny group would turn into NaN without the cap.
void vary_group_magnitudes(std::vector<bf16>& x, int H) {
  auto const groups = H / kernels::ep_fp8_group;
  auto const rows = static_cast<std::int64_t>(x.size()) / H;
  for (std::int64_t t = 0; t < rows; ++t)
    for (int g = 0; g < groups; ++g) {
      float const m = t == 0 && g == 1 ? 0.0f : t == 2 && g == 0 ? 1e-37f : std::ldexp(1.0f, static_cast<int>((t * 5 + g * 7) % 17) - 8);
      for (int c = 0; c < kernels::ep_fp8_group; ++c) {
        auto& v = x[static_cast<std::size_t>(t * H + g * kernels::ep_fp8_group + c)];
        v = bf16(static_cast<float>(v) * m);
      }
    }
}

std::vector<rank_input> random_inputs(moe_config const& cfg, std::vector<std::int64_t> const& tokens, std::uint64_t seed) {
  std::vector<rank_input> in;
  for (std::size_t r = 0; r < tokens.size(); ++r)
    in.push_back({synthetic::random_activations<bf16>(tokens[r], cfg.hidden_size, seed + r), tokens[r]});
  return in;
}

// Routing whose experts all come from `pool` (distinct per token), random weights.
routing routing_from(std::vector<int> const& pool, std::int64_t n, int k, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  routing r(n, k);
  for (std::int64_t t = 0; t < n; ++t) {
    auto p = pool;
    std::shuffle(p.begin(), p.end(), rng);
    for (int j = 0; j < k; ++j) {
      r.topk_ids[static_cast<std::size_t>(t * k + j)] = p[static_cast<std::size_t>(j)];
      r.topk_weights[static_cast<std::size_t>(t * k + j)] = std::uniform_real_distribution<float>(0.05f, 1.0f)(rng);
    }
  }
  return r;
}

moe_config softmax_config(int E, int k, int D) {
  moe_config c{.hidden_size = 256, .ffn_size = 128, .num_experts = E, .top_k = k};
  c.num_ranks = D;
  return c;
}

moe_config grouped_config(int D) {  // DeepSeek-V3's recipe, small: sigmoid + bias, groups, one shared expert
  moe_config c{.hidden_size = 256, .ffn_size = 128, .num_experts = 64, .top_k = 8};
  c.gate = {.kind = gate_kind::sigmoid_grouped_topk, .renormalize = true, .num_groups = 8, .topk_groups = 4,
            .routed_scaling_factor = 2.5f, .has_score_bias = true};
  c.num_shared_experts = 1;
  c.shared_ffn_size = 64;
  c.num_ranks = D;
  return c;
}

}  // namespace

TEST_CASE("ep layer (nvlink_direct) equals the host reference: gate routing, 1 to 4 ranks", "[comm][ep][cuda]") {
  for (int D : {1, 2, 4}) {
    for (int variant = 0; variant < 3; ++variant) {
      auto const cfg = variant == 0 ? softmax_config(64, 8, D) : variant == 1 ? softmax_config(8, 2, D) : grouped_config(D);
      INFO("ranks " << D << " " << cfg);
      synthetic::random_layer<bf16> host(cfg, static_cast<std::uint64_t>(D * 10 + variant));
      std::vector<std::int64_t> tokens;
      for (int r = 0; r < D; ++r) tokens.push_back(r == 1 ? 1 : 37 + 50 * r);  // rank 1: decode-sized
      auto const in = random_inputs(cfg, tokens, 100 + static_cast<std::uint64_t>(variant));
      group_run g{cfg};
      auto const got = run_group(g, backend_kind::nvlink, host.weights(), in);
      require_matches_reference(cfg, host.weights(), in, got);
      // de-duplication: a token reaches a rank once, so no rank receives more rows than tokens sent
      for (int r = 0; r < D; ++r)
        for (int d = 0; d < D; ++d) REQUIRE(got[static_cast<std::size_t>(r)].sent[static_cast<std::size_t>(d)] <= tokens[static_cast<std::size_t>(r)]);
    }
  }
}

TEST_CASE("ep layer: fp8 dispatch equals the host reference on fp8-rounded rows", "[comm][ep][cuda][fp8]") {
  for (int D : {1, 2, 4}) {
    auto const cfg = softmax_config(64, 8, D);  // no shared experts: they read the unrounded rows
    INFO("ranks " << D << " " << cfg);
    synthetic::random_layer<bf16> host(cfg, static_cast<std::uint64_t>(D * 31));
    std::vector<std::int64_t> tokens;
    for (int r = 0; r < D; ++r) tokens.push_back(r == 1 ? 1 : 45 + 20 * r);
    auto in = random_inputs(cfg, tokens, 700 + static_cast<std::uint64_t>(D));
    REQUIRE(cfg.hidden_size / kernels::ep_fp8_group >= 2);
    for (auto& r : in) vary_group_magnitudes(r.x, cfg.hidden_size);
    group_run g{cfg};
    g.fp8_dispatch = true;
    auto const got = run_group(g, backend_kind::nvlink, host.weights(), in);
    auto const H = cfg.hidden_size;
    for (std::size_t r = 0; r < in.size(); ++r) {
      INFO("rank " << r << ": " << error_text(got[r].error));
      REQUIRE(!got[r].error);
      auto const n = in[r].n;
      auto const rounded = fp8_rounded(in[r].x, H);
      std::vector<bf16> want(static_cast<std::size_t>(n * H)), plain(want.size());
      dense_reference<bf16>(cfg, host.weights(), matrix_view<bf16 const>(rounded.data(), n, H), matrix_view<bf16>(want.data(), n, H),
                            got[r].used.view());
      test::require_close(got[r].out, want, n, H);
      // and the rounding did happen: the plain layer's output is measurably farther away
      dense_reference<bf16>(cfg, host.weights(), matrix_view<bf16 const>(in[r].x.data(), n, H),
                            matrix_view<bf16>(plain.data(), n, H), got[r].used.view());
      double num = 0, den = 0;
      for (std::size_t i = 0; i < plain.size(); ++i) {
        double const a = static_cast<float>(got[r].out[i]), b = static_cast<float>(plain[i]);
        num += (a - b) * (a - b);
        den += b * b;
      }
      REQUIRE(std::sqrt(num / std::max(den, 1e-30)) > 2e-3);
    }
  }
}

TEST_CASE("ep layer: fp8 dispatch is refused where it cannot run", "[comm][ep][cuda][fp8][errors]") {
  // hidden not a multiple of 128: refused at construction, naming the rule
  auto cfg = softmax_config(8, 2, 2);
  cfg.hidden_size = 200;
  synthetic::random_layer<bf16> host(cfg, 5);
  group_run g{cfg};
  g.fp8_dispatch = true;
  auto const got = run_group(g, backend_kind::nvlink, host.weights(), random_inputs(cfg, {3, 3}, 1));
  for (auto const& r : got) {
    REQUIRE(r.error);
    CHECK(error_code(r.error) == errc::unsupported);
    CHECK(error_text(r.error).find("multiple of 128") != std::string::npos);
  }
}

TEST_CASE("ep layer: skewed routing, empty ranks, one rank holding every expert, replicas", "[comm][ep][cuda]") {
  int const D = 4;
  auto const cfg = softmax_config(32, 4, D);
  synthetic::random_layer<bf16> host(cfg, 9);
  auto const blocks = contiguous_blocks{}.place(cfg, 0);
  std::vector<int> rank0(blocks.local_experts(0).begin(), blocks.local_experts(0).end());
  std::vector<int> all(32);
  std::iota(all.begin(), all.end(), 0);

  SECTION("all tokens to one rank's experts") {
    auto in = random_inputs(cfg, {64, 64, 64, 64}, 1);
    for (int r = 0; r < D; ++r) in[static_cast<std::size_t>(r)].given = routing_from(rank0, 64, 4, 10 + r);
    auto const got = run_group({cfg}, backend_kind::nvlink, host.weights(), in);
    require_matches_reference(cfg, host.weights(), in, got);
    for (int r = 0; r < D; ++r) {
      REQUIRE(got[static_cast<std::size_t>(r)].sent[0] == 64);
      for (int d = 1; d < D; ++d) REQUIRE(got[static_cast<std::size_t>(r)].sent[static_cast<std::size_t>(d)] == 0);
    }
  }
  SECTION("a rank with zero tokens") {
    auto in = random_inputs(cfg, {50, 0, 80, 3}, 2);
    for (int r = 0; r < D; ++r) in[static_cast<std::size_t>(r)].given = routing_from(all, in[static_cast<std::size_t>(r)].n, 4, 20 + r);
    require_matches_reference(cfg, host.weights(), in, run_group({cfg}, backend_kind::nvlink, host.weights(), in));
  }
  SECTION("every expert on one rank") {
    group_run g{cfg};
    g.placement = expert_placement::from_owners(D, std::vector<int>(32, 2));
    auto const in = random_inputs(cfg, {40, 7, 1, 90}, 3);
    auto const got = run_group(g, backend_kind::nvlink, host.weights(), in);
    require_matches_reference(cfg, host.weights(), in, got);
    for (int r = 0; r < D; ++r) REQUIRE(got[static_cast<std::size_t>(r)].sent[2] == in[static_cast<std::size_t>(r)].n);
  }
  SECTION("replicated experts") {
    std::vector<std::vector<int>> owners(32);
    for (int e = 0; e < 32; ++e) owners[static_cast<std::size_t>(e)] = e < 8 ? std::vector<int>{0, 1, 2, 3} : std::vector<int>{e % D, (e + 1) % D};
    group_run g{cfg};
    g.placement = expert_placement(D, owners);
    auto in = random_inputs(cfg, {70, 33, 5, 128}, 4);
    auto const got = run_group(g, backend_kind::nvlink, host.weights(), in);
    require_matches_reference(cfg, host.weights(), in, got);
  }
}

TEST_CASE("ep layer: forwards replayed from a CUDA graph stay in step", "[comm][ep][cuda][graph]") {
  auto const cfg = grouped_config(2);
  synthetic::random_layer<bf16> host(cfg, 5);
  auto const in = random_inputs(cfg, {100, 64}, 6);
  group_run g{cfg};
  g.graph_replays = 3;
  require_matches_reference(cfg, host.weights(), in, run_group(g, backend_kind::nvlink, host.weights(), in));
}

TEST_CASE("ep layer: errors are specmoe errors and leave outputs untouched", "[comm][ep][cuda][errors]") {
  auto const cfg = softmax_config(16, 2, 2);
  synthetic::random_layer<bf16> host(cfg, 8);

  SECTION("a rank that never calls forward: the peer times out, no hang") {
    group_run g{cfg};
    g.timeout = std::chrono::milliseconds(300);
    g.forwards = [](int r) { return r == 0; };
    auto const got = run_group(g, backend_kind::nvlink, host.weights(), random_inputs(cfg, {20, 20}, 1));
    INFO(error_text(got[0].error));
    REQUIRE(error_code(got[0].error) == errc::timeout);
    REQUIRE(!got[1].error);
  }
  SECTION("configs that disagree across ranks fail on every rank") {
    group_run g{cfg};
    g.rank_config = [&](int r) {
      auto c = cfg;
      if (r == 1) c.ffn_size = 64;
      return c;
    };
    auto const got = run_group(g, backend_kind::nvlink, host.weights(), random_inputs(cfg, {5, 5}, 2));
    for (auto const& r : got) {
      INFO(error_text(r.error));
      REQUIRE(error_code(r.error) == errc::rank_mismatch);
      REQUIRE(error_text(r.error).find("ffn_size 128 vs 64") != std::string::npos);
    }
  }
  SECTION("a local check that fails on one rank only fails on every rank, at once") {
    group_run g{cfg};
    g.edit_weights = [](int r, moe_weights<bf16>& views) {
      if (r == 1) --views.experts.gate.count;  // one routed expert short
    };
    auto const t0 = std::chrono::steady_clock::now();
    auto const got = run_group(g, backend_kind::nvlink, host.weights(), random_inputs(cfg, {5, 5}, 4));
    CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(20));  // nobody waited out the 30 s timeout
    for (auto const& r : got) {
      INFO(error_text(r.error));
      REQUIRE(error_code(r.error) == errc::shape_mismatch);
      REQUIRE(error_text(r.error).find("rank 1 holds 8 routed experts under the placement, but its weights have 7") !=
              std::string::npos);
    }
    REQUIRE(error_text(got[0].error).find("rank 1 could not build the layer, so neither can rank 0") != std::string::npos);
  }
  SECTION("an expert id out of range on one rank: that rank throws, its output stays poisoned; the other is right") {
    auto in = random_inputs(cfg, {12, 9}, 3);
    std::vector<int> all(16);
    std::iota(all.begin(), all.end(), 0);
    in[0].given = routing_from(all, 12, 2, 1);
    in[1].given = routing_from(all, 9, 2, 2);
    in[1].given->topk_ids[5] = 16;
    auto got = run_group({cfg}, backend_kind::nvlink, host.weights(), in);
    INFO(error_text(got[1].error));
    REQUIRE(error_code(got[1].error) == errc::expert_out_of_range);
    REQUIRE(std::all_of(got[1].out.begin(), got[1].out.end(), [](bf16 v) { return v.bits == 0xffff; }));
    REQUIRE(error_text(got[1].error).find("token 2") != std::string::npos);
    std::vector<rank_input> first{in[0]};
    std::vector<rank_result> first_got{got[0]};
    require_matches_reference(cfg, host.weights(), first, first_got);
  }
}

#if SPECMOE_HAS_NCCL
TEST_CASE("ep layer (nccl_alltoallv) equals the reference and nvlink_direct bit for bit", "[comm][ep][cuda][nccl]") {
  // NCCL runs one rank per GPU: as many ranks as there are GPUs, up to 4.
  int const D = std::min(std::max(device_count(), 1), 4);
  for (int variant = 0; variant < 2; ++variant) {
    auto const cfg = variant == 0 ? softmax_config(64, 8, D) : grouped_config(D);
    INFO("ranks " << D << " " << cfg);
    synthetic::random_layer<bf16> host(cfg, 31 + static_cast<std::uint64_t>(variant));
    std::vector<std::int64_t> tokens;
    for (int r = 0; r < D; ++r) tokens.push_back(r == 0 ? 77 : 13 * r);
    auto const in = random_inputs(cfg, tokens, 200);
    group_run const g{cfg};
    auto const nccl = run_group(g, backend_kind::nccl, host.weights(), in);
    require_matches_reference(cfg, host.weights(), in, nccl);
    auto const direct = run_group(g, backend_kind::nvlink, host.weights(), in);
    for (int r = 0; r < D; ++r) {
      REQUIRE(!direct[static_cast<std::size_t>(r)].error);
      REQUIRE(test::bit_equal(direct[static_cast<std::size_t>(r)].out, nccl[static_cast<std::size_t>(r)].out));
    }
  }
}
#endif
