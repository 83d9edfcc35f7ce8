// The cuda_space layer against the host dense reference on the same inputs (bf16 tolerance).
#include "support/cuda_testbed.cuh"
#include "support/testbed.hpp"

#include <specmoe/layer/cuda_moe_layer.cuh>

#include <cmath>
#include <limits>
#include <random>

using namespace specmoe;
using specmoe::test::device_vector;

namespace {

// Device copies of a random layer's weights, and the views the cuda layer takes.
struct device_weights {
  std::vector<std::unique_ptr<device_vector<bf16>>> tensors;
  std::unique_ptr<device_vector<float>> bias;
  moe_weights<bf16> views;

  explicit device_weights(moe_weights<bf16> const& host) : views(host) {
    auto up = [&](bf16 const* data, std::int64_t count) -> bf16 const* {
      if (count == 0) return nullptr;
      tensors.push_back(std::make_unique<device_vector<bf16>>(std::vector<bf16>(data, data + count)));
      return tensors.back()->data();
    };
    auto tensor = [&](expert_tensor<bf16>& t) { t.data = up(t.data, t.count * t.rows * t.cols); };
    views.router.weight.data = up(host.router.weight.data, host.router.weight.rows * host.router.weight.cols);
    if (!host.router.score_bias.empty()) {
      bias = std::make_unique<device_vector<float>>(
          std::vector<float>(host.router.score_bias.begin(), host.router.score_bias.end()));
      views.router.score_bias = host.router.score_bias;  // the layer copies the bias from wherever it is
    }
    tensor(views.experts.gate);
    tensor(views.experts.up);
    tensor(views.experts.down);
    tensor(views.shared.gate);
    tensor(views.shared.up);
    tensor(views.shared.down);
  }
};

struct gpu_run {
  std::vector<bf16> out;
  routing routed;
};

gpu_run run_gpu(moe_layer<cuda_space>& layer, std::vector<bf16> const& x, std::int64_t n) {
  auto const H = layer.config().hidden_size, k = layer.config().top_k;
  device_vector<bf16> dx(x), dout(x.size(), 0xff);
  device_vector<std::int32_t> ids(static_cast<std::size_t>(n * k), 0xff);
  device_vector<float> w(static_cast<std::size_t>(n * k), 0xff);
  layer.forward({matrix_view<bf16 const>(dx.data(), n, H)}, matrix_view<bf16>(dout.data(), n, H), nullptr,
                {ids.data(), w.data()});
  gpu_run r{dout.to_host(), routing(n, k)};
  r.routed.topk_ids = ids.to_host();
  r.routed.topk_weights = w.to_host();
  return r;
}

using specmoe::test::require_close;

moe_config gpu_config(int E, int k, bool grouped, int shared) {
  moe_config c{.hidden_size = 256, .ffn_size = 128, .num_experts = E, .top_k = k};
  if (grouped) {
    c.gate = {.kind = gate_kind::sigmoid_grouped_topk, .renormalize = true, .num_groups = E >= 8 ? 8 : 1,
              .topk_groups = E >= 8 ? 4 : 1, .routed_scaling_factor = 2.5f, .has_score_bias = true};
    while (c.gate.topk_groups * (E / c.gate.num_groups) < k) ++c.gate.topk_groups;
    c.num_shared_experts = shared;
    c.shared_ffn_size = shared ? 64 : 0;
  } else {
    c.gate.renormalize = k > 1;
  }
  return c;
}

}  // namespace

TEST_CASE("cuda layer equals the host reference within bf16 tolerance", "[layer][cuda]") {
  for (int E : {8, 64, 128, 256}) {
    for (int k : {1, 2, 8}) {
      for (bool grouped : {false, true}) {
        for (std::int64_t n : {std::int64_t{1}, std::int64_t{37}, std::int64_t{1000}}) {
          if (k > E) continue;
          auto const cfg = gpu_config(E, k, grouped, grouped ? 1 : 0);
          INFO(cfg << " tokens " << n);
          synthetic::random_layer<bf16> host(cfg, static_cast<std::uint64_t>(E * 100 + k * 10 + n));
          device_weights dev(host.weights());
          moe_layer<cuda_space> layer(cfg, dev.views, {}, {.max_tokens = 1024});
          auto const x = synthetic::random_activations<bf16>(n, cfg.hidden_size, static_cast<std::uint64_t>(n) + 5);
          auto const got = run_gpu(layer, x, n);
          // The reference with the GPU's routing: checks experts, permute and combine exactly.
          std::vector<bf16> want(x.size());
          dense_reference<bf16>(cfg, host.weights(), matrix_view<bf16 const>(x.data(), n, cfg.hidden_size),
                                matrix_view<bf16>(want.data(), n, cfg.hidden_size), got.routed.view());
          require_close(got.out, want, n, cfg.hidden_size);
          // The GPU gate agrees with the host gate except at near-ties (logits summed in another order).
          routing host_routing;
          std::vector<bf16> unused(x.size());
          dense_reference<bf16>(cfg, host.weights(), matrix_view<bf16 const>(x.data(), n, cfg.hidden_size),
                                matrix_view<bf16>(unused.data(), n, cfg.hidden_size), std::nullopt, &host_routing);
          std::int64_t differing = 0;
          for (std::int64_t t = 0; t < n; ++t) {
            bool same = true;
            for (int j = 0; j < k; ++j) same = same && got.routed.id(t, j) == host_routing.id(t, j);
            differing += !same;
          }
          REQUIRE(differing <= std::max<std::int64_t>(1, n / 100));
          if (n == 1) {  // the one-launch decode FFN against the three launches: the same bits
            moe_layer<cuda_space> one(cfg, dev.views, {}, {.max_tokens = 1024, .one_launch_decode_ffn = true});
            REQUIRE(specmoe::test::bit_equal(run_gpu(one, x, n).out, got.out));
          }
        }
      }
    }
  }
}

TEST_CASE("cuda layer: large batches, experts without tokens, graph capture", "[layer][cuda]") {
  auto const cfg = gpu_config(256, 8, true, 1);
  synthetic::random_layer<bf16> host(cfg, 77);
  device_weights dev(host.weights());
  moe_layer<cuda_space> layer(cfg, dev.views, {}, {.max_tokens = 16384, .one_launch_decode_ffn = true});
  for (std::int64_t n : {std::int64_t{3}, std::int64_t{16384}}) {  // 3 tokens: most experts get none
    auto const x = synthetic::random_activations<bf16>(n, cfg.hidden_size, 9);
    auto const got = run_gpu(layer, x, n);
    std::vector<bf16> want(x.size());
    dense_reference<bf16>(cfg, host.weights(), matrix_view<bf16 const>(x.data(), n, cfg.hidden_size),
                          matrix_view<bf16>(want.data(), n, cfg.hidden_size), got.routed.view());
    require_close(got.out, want, n, cfg.hidden_size);
  }
  // Captured in a CUDA graph and replayed: the same bits as a direct run. One token takes the
  // fused routing and the fused expert FFN, whose counters must be back to zero after each replay.
  for (std::int64_t const n : {std::int64_t{500}, std::int64_t{1}}) {
    INFO("tokens " << n);
    auto const x = synthetic::random_activations<bf16>(n, cfg.hidden_size, 10 + static_cast<std::uint64_t>(n));
    auto const direct = run_gpu(layer, x, n);
    device_vector<bf16> dx(x), dout(x.size(), 0xff);
    cudaStream_t stream;
    SPECMOE_TEST_CUDA(cudaStreamCreate(&stream));
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    SPECMOE_TEST_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    layer.forward_async({matrix_view<bf16 const>(dx.data(), n, cfg.hidden_size)},
                        matrix_view<bf16>(dout.data(), n, cfg.hidden_size), stream);
    SPECMOE_TEST_CUDA(cudaStreamEndCapture(stream, &graph));
    SPECMOE_TEST_CUDA(cudaGraphInstantiate(&exec, graph, 0));
    for (int replay = 0; replay < 3; ++replay) {
      SPECMOE_TEST_CUDA(cudaMemset(dout.data(), 0xff, x.size() * sizeof(bf16)));
      SPECMOE_TEST_CUDA(cudaGraphLaunch(exec, stream));
      layer.check(stream);
      REQUIRE(specmoe::test::bit_equal(dout.to_host(), direct.out));
    }
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    cudaStreamDestroy(stream);
  }
}

TEST_CASE("cuda layer: fp32 activations equal the fp32 host reference within bf16 tolerance", "[layer][cuda][fp32]") {
  for (bool grouped : {false, true}) {
    auto const cfg = grouped ? gpu_config(64, 8, true, 1) : gpu_config(8, 2, false, 0);
    synthetic::random_layer<bf16> host(cfg, grouped ? 31 : 32);
    device_weights dev(host.weights());
    moe_layer<cuda_space> layer(cfg, dev.views, {}, {.max_tokens = 512, .fp32_activations = true});
    auto const H = cfg.hidden_size, k = cfg.top_k;
    for (std::int64_t n : {std::int64_t{1}, std::int64_t{333}}) {
      INFO(cfg << " tokens " << n);
      auto const x = synthetic::random_activations<float>(n, H, static_cast<std::uint64_t>(n) + 40);
      device_vector<float> dx(x), dout(x.size(), 0xff);
      device_vector<std::int32_t> ids(static_cast<std::size_t>(n * k), 0xff);
      device_vector<float> w(static_cast<std::size_t>(n * k), 0xff);
      layer.forward(cuda_batch_f32{matrix_view<float const>(dx.data(), n, H)}, matrix_view<float>(dout.data(), n, H), nullptr,
                    {ids.data(), w.data()});
      routing routed(n, k);
      routed.topk_ids = ids.to_host();
      routed.topk_weights = w.to_host();
      std::vector<float> want(x.size());
      dense_reference<float>(cfg, host.weights(), matrix_view<float const>(x.data(), n, H), matrix_view<float>(want.data(), n, H),
                             routed.view());
      require_close(dout.to_host(), want, n, H);
      // The fp32 router: the same choices as the fp32 host gate except at near-ties.
      routing host_routing;
      std::vector<float> unused(x.size());
      dense_reference<float>(cfg, host.weights(), matrix_view<float const>(x.data(), n, H), matrix_view<float>(unused.data(), n, H),
                             std::nullopt, &host_routing);
      std::int64_t differing = 0;
      for (std::int64_t t = 0; t < n; ++t) {
        for (int j = 0; j < k; ++j) {
          if (routed.id(t, j) != host_routing.id(t, j)) {
            ++differing;
            break;
          }
        }
      }
      REQUIRE(differing <= std::max<std::int64_t>(1, n / 100));
    }
  }
  // A bf16-only layer refuses fp32 activations before enqueueing anything.
  auto const cfg = gpu_config(8, 2, false, 0);
  synthetic::random_layer<bf16> host(cfg, 33);
  device_weights dev(host.weights());
  moe_layer<cuda_space> layer(cfg, dev.views, {}, {.max_tokens = 8});
  device_vector<float> dx(std::vector<float>(static_cast<std::size_t>(4 * cfg.hidden_size), 1.0f)), dout(static_cast<std::size_t>(4 * cfg.hidden_size), 0xff);
  specmoe::test::require_error(
      [&] { layer.forward(cuda_batch_f32{matrix_view<float const>(dx.data(), 4, cfg.hidden_size)}, matrix_view<float>(dout.data(), 4, cfg.hidden_size)); },
      errc::invalid_argument, "fp32_activations");
}

TEST_CASE("cuda layer: bad input is a specmoe error and the output stays untouched", "[layer][cuda][errors]") {
  auto const cfg = gpu_config(64, 8, false, 0);
  synthetic::random_layer<bf16> host(cfg, 5);
  device_weights dev(host.weights());
  moe_layer<cuda_space> layer(cfg, dev.views, {}, {.max_tokens = 64});
  std::int64_t const n = 40;
  auto x = synthetic::random_activations<bf16>(n, cfg.hidden_size, 6);
  x[static_cast<std::size_t>(17 * cfg.hidden_size + 3)] = bf16(std::numeric_limits<float>::quiet_NaN());
  device_vector<bf16> dx(x), dout(x.size(), 0xff);
  specmoe::test::require_error(
      [&] { layer.forward({matrix_view<bf16 const>(dx.data(), n, cfg.hidden_size)}, matrix_view<bf16>(dout.data(), n, cfg.hidden_size)); },
      errc::non_finite, "router logits of token 17");
  for (auto v : dout.to_host()) REQUIRE(v.bits == 0xffff);

  // Engine routing naming expert 64 of 64 at token 5.
  std::vector<std::int32_t> ids(static_cast<std::size_t>(n * 8));
  std::vector<float> w(ids.size(), 0.125f);
  for (std::size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<std::int32_t>(i % 8 * 8 + i / 8 % 8);
  ids[5 * 8 + 2] = 64;
  device_vector<std::int32_t> dids(ids);
  device_vector<float> dw(w);
  auto const clean = synthetic::random_activations<bf16>(n, cfg.hidden_size, 7);
  device_vector<bf16> dclean(clean);
  routing_view r{std::span<std::int32_t const>(dids.data(), ids.size()), std::span<float const>(dw.data(), w.size()), n, 8};
  specmoe::test::require_error(
      [&] { layer.forward({matrix_view<bf16 const>(dclean.data(), n, cfg.hidden_size), r}, matrix_view<bf16>(dout.data(), n, cfg.hidden_size)); },
      errc::expert_out_of_range, "at token 5");
  for (auto v : dout.to_host()) REQUIRE(v.bits == 0xffff);

  // The same expert twice in token 9 (engine routing that would double-count an expert).
  for (std::size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<std::int32_t>(i % 8 * 8 + i / 8 % 8);
  ids[9 * 8 + 6] = ids[9 * 8 + 1];
  SPECMOE_TEST_CUDA(cudaMemcpy(dids.data(), ids.data(), ids.size() * sizeof(std::int32_t), cudaMemcpyHostToDevice));
  specmoe::test::require_error(
      [&] { layer.forward({matrix_view<bf16 const>(dclean.data(), n, cfg.hidden_size), r}, matrix_view<bf16>(dout.data(), n, cfg.hidden_size)); },
      errc::expert_out_of_range, "same expert twice for token 9");
  for (auto v : dout.to_host()) REQUIRE(v.bits == 0xffff);

  specmoe::test::require_error(
      [&] { layer.forward({matrix_view<bf16 const>(dclean.data(), 65, cfg.hidden_size)}, matrix_view<bf16>(dout.data(), 65, cfg.hidden_size)); },
      errc::invalid_argument, "65 tokens exceed max_tokens 64");
  // The layer still works after an error.
  auto const ok = run_gpu(layer, clean, n);
  std::vector<bf16> want(clean.size());
  dense_reference<bf16>(cfg, host.weights(), matrix_view<bf16 const>(clean.data(), n, cfg.hidden_size),
                        matrix_view<bf16>(want.data(), n, cfg.hidden_size), ok.routed.view());
  require_close(ok.out, want, n, cfg.hidden_size);
}
