// Gate, layout, permute and combine kernels against plain host loops on the same inputs.
#include "support/cuda_testbed.cuh"
#include "support/testbed.hpp"

#include <specmoe/kernels/combine.cuh>
#include <specmoe/kernels/decode_routing.cuh>
#include <specmoe/kernels/gate.cuh>
#include <specmoe/kernels/layout.cuh>
#include <specmoe/kernels/permute.cuh>
#include <specmoe/kernels/router_logits.cuh>
#include <specmoe/router/gate.hpp>

#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>

using namespace specmoe;
using specmoe::test::device_vector;

namespace {

kernels::device_status* new_status(device_vector<kernels::device_status>& s) {
  kernels::device_status clean = kernels::clean_device_status;
  SPECMOE_TEST_CUDA(cudaMemcpy(s.data(), &clean, sizeof clean, cudaMemcpyHostToDevice));
  return s.data();
}

moe_config random_gate_config(int E, int k, bool grouped, std::mt19937_64& rng) {
  moe_config c{.hidden_size = 8, .ffn_size = 8, .num_experts = E, .top_k = k};
  c.gate.renormalize = rng() % 2 == 0;
  if (grouped) {
    c.gate.kind = gate_kind::sigmoid_grouped_topk;
    c.gate.num_groups = E >= 8 ? 8 : 1;
    c.gate.topk_groups = std::max(1, c.gate.num_groups / 2);
    while (c.gate.topk_groups * (E / c.gate.num_groups) < k) ++c.gate.topk_groups;
    c.gate.routed_scaling_factor = 2.5f;
    c.gate.has_score_bias = true;
  }
  return c;
}

}  // namespace

TEST_CASE("gate kernel: ids and weights equal the host gate bit for bit, ties to the lower id", "[kernels][gate]") {
  std::mt19937_64 rng(1);
  for (int E : {8, 64, 128, 256}) {
    for (int k : {1, 2, 8}) {
      for (bool grouped : {false, true}) {
        if (k > E) continue;
        auto const cfg = random_gate_config(E, k, grouped, rng);
        long long const n = static_cast<long long>(rng() % 3000) + 1;
        // Logits on a coarse grid (many exact ties) plus some fine ones.
        std::vector<float> logits(static_cast<std::size_t>(n * E));
        std::uniform_int_distribution<int> grid(-16, 16);
        for (auto& l : logits) l = static_cast<float>(grid(rng)) / 4.0f;
        std::vector<float> bias(static_cast<std::size_t>(E));
        for (auto& b : bias) b = static_cast<float>(grid(rng)) / 64.0f;
        device_vector<float> d_logits(logits), d_bias(bias), d_weights(static_cast<std::size_t>(n * k), 0xff);
        device_vector<std::int32_t> d_ids(static_cast<std::size_t>(n * k), 0xff);
        device_vector<kernels::device_status> status(1, 0);
        auto const p = kernels::gate_params::from(cfg, grouped ? d_bias.data() : nullptr);
        SPECMOE_TEST_CUDA(kernels::launch_topk_gate(d_logits.data(), n, p, d_ids.data(), d_weights.data(),
                                                    new_status(status), nullptr));
        SPECMOE_TEST_CUDA(cudaDeviceSynchronize());
        auto const ids = d_ids.to_host();
        auto const w = d_weights.to_host();
        REQUIRE(status.to_host()[0].bits == 0);
        std::vector<std::int32_t> hid(static_cast<std::size_t>(k));
        std::vector<float> hw(static_cast<std::size_t>(k));
        for (long long t = 0; t < n; ++t) {
          route_token(logits.data() + t * E, grouped ? std::span<float const>(bias) : std::span<float const>(), cfg,
                      hid.data(), hw.data());
          for (int j = 0; j < k; ++j) {
            INFO("E=" << E << " k=" << k << " grouped=" << grouped << " token " << t << " slot " << j);
            REQUIRE(ids[static_cast<std::size_t>(t * k + j)] == hid[static_cast<std::size_t>(j)]);
            REQUIRE(w[static_cast<std::size_t>(t * k + j)] == hw[static_cast<std::size_t>(j)]);
          }
        }
      }
    }
  }
}

TEST_CASE("gate kernel: a NaN or Inf logit is flagged with its token", "[kernels][gate]") {
  std::mt19937_64 rng(2);
  auto const cfg = random_gate_config(64, 8, true, rng);
  std::vector<float> logits(static_cast<std::size_t>(100 * 64), 0.5f);
  logits[static_cast<std::size_t>(37 * 64 + 5)] = std::numeric_limits<float>::quiet_NaN();
  logits[static_cast<std::size_t>(90 * 64 + 1)] = std::numeric_limits<float>::infinity();
  device_vector<float> d_logits(logits), d_weights(800, 0);
  device_vector<std::int32_t> d_ids(800, 0);
  device_vector<kernels::device_status> status(1, 0);
  SPECMOE_TEST_CUDA(kernels::launch_topk_gate(d_logits.data(), 100, kernels::gate_params::from(cfg, nullptr),
                                              d_ids.data(), d_weights.data(), new_status(status), nullptr));
  SPECMOE_TEST_CUDA(cudaDeviceSynchronize());
  auto const s = status.to_host()[0];
  REQUIRE(s.bits == kernels::device_error_non_finite_logit);
  REQUIRE(s.first_token == 37);
}

TEST_CASE("gate kernels: both paths equal the host gate bit for bit at 1 to 16 tokens, outputs poisoned",
          "[kernels][gate]") {
  std::mt19937_64 rng(3);
  constexpr long long max_n = 16;
  for (int E : {8, 64, 128, 256}) {
    for (int k : {1, 2, 8}) {
      for (bool grouped : {false, true}) {
        if (k > E) continue;
        auto cfg = random_gate_config(E, k, grouped, rng);
        if (grouped) {  // any feasible number of kept groups, all of them included (no masking)
          int const least = cfg.gate.topk_groups;
          cfg.gate.topk_groups = least + static_cast<int>(rng() % static_cast<unsigned>(cfg.gate.num_groups - least + 1));
        }
        std::vector<float> logits(static_cast<std::size_t>(max_n * E));
        std::uniform_int_distribution<int> grid(-16, 16);
        std::normal_distribution<float> fine(0.0f, 3.0f);
        bool const ties = rng() % 2 == 0;  // coarse grid (many exact ties) or continuous values
        for (auto& l : logits) l = ties ? static_cast<float>(grid(rng)) / 4.0f : fine(rng);
        std::vector<float> bias(static_cast<std::size_t>(E));
        for (auto& b : bias) b = static_cast<float>(grid(rng)) / 64.0f;
        device_vector<float> d_logits(logits), d_bias(bias), d_weights(static_cast<std::size_t>(max_n * k), 0xff);
        device_vector<std::int32_t> d_ids(static_cast<std::size_t>(max_n * k), 0xff);
        device_vector<kernels::device_status> status(1, 0);
        auto const p = kernels::gate_params::from(cfg, grouped ? d_bias.data() : nullptr);
        std::vector<std::int32_t> hid(static_cast<std::size_t>(k));
        std::vector<float> hw(static_cast<std::size_t>(k));
        for (auto path : {kernels::gate_path::block_per_token, kernels::gate_path::warp_per_token}) {
          for (long long n = 1; n <= max_n; ++n) {
            SPECMOE_TEST_CUDA(cudaMemset(d_ids.data(), 0xff, d_ids.bytes()));  // ids -1, weights NaN
            SPECMOE_TEST_CUDA(cudaMemset(d_weights.data(), 0xff, d_weights.bytes()));
            SPECMOE_TEST_CUDA(kernels::launch_topk_gate(d_logits.data(), n, p, d_ids.data(), d_weights.data(),
                                                        new_status(status), nullptr, path));
            SPECMOE_TEST_CUDA(cudaDeviceSynchronize());
            auto const ids = d_ids.to_host();
            auto const w = d_weights.to_host();
            REQUIRE(status.to_host()[0].bits == 0);
            for (long long t = 0; t < max_n; ++t) {
              if (t < n) {
                route_token(logits.data() + t * E, grouped ? std::span<float const>(bias) : std::span<float const>(), cfg,
                            hid.data(), hw.data());
              }
              for (int j = 0; j < k; ++j) {
                INFO("path=" << static_cast<int>(path) << " E=" << E << " k=" << k << " grouped=" << grouped
                              << " topk_groups=" << cfg.gate.topk_groups << " n=" << n << " token " << t << " slot " << j);
                auto const i = static_cast<std::size_t>(t * k + j);
                if (t < n) {
                  REQUIRE(ids[i] == hid[static_cast<std::size_t>(j)]);
                  REQUIRE(w[i] == hw[static_cast<std::size_t>(j)]);
                } else {  // tokens past n stay untouched
                  REQUIRE(ids[i] == -1);
                  REQUIRE(std::isnan(w[i]));
                }
              }
            }
          }
        }
      }
    }
  }
}

TEST_CASE("gate kernels: the block path flags a NaN or Inf logit with its token; E over its limit is refused",
          "[kernels][gate]") {
  std::mt19937_64 rng(4);
  for (bool grouped : {false, true}) {
    auto const cfg = random_gate_config(128, 8, grouped, rng);
    std::vector<float> logits(static_cast<std::size_t>(12 * 128), 0.25f);
    logits[static_cast<std::size_t>(9 * 128 + 127)] = std::numeric_limits<float>::quiet_NaN();
    logits[static_cast<std::size_t>(5 * 128 + 3)] = -std::numeric_limits<float>::infinity();
    device_vector<float> d_logits(logits), d_weights(96, 0xff);
    device_vector<std::int32_t> d_ids(96, 0xff);
    device_vector<kernels::device_status> status(1, 0);
    SPECMOE_TEST_CUDA(kernels::launch_topk_gate(d_logits.data(), 12, kernels::gate_params::from(cfg, nullptr), d_ids.data(),
                                                d_weights.data(), new_status(status), nullptr,
                                                kernels::gate_path::block_per_token));
    SPECMOE_TEST_CUDA(cudaDeviceSynchronize());
    auto const s = status.to_host()[0];
    REQUIRE(s.bits == kernels::device_error_non_finite_logit);
    REQUIRE(s.first_token == 5);
    auto const ids = d_ids.to_host();
    auto const w = d_weights.to_host();
    for (int j = 0; j < 8; ++j) {
      REQUIRE(ids[static_cast<std::size_t>(5 * 8 + j)] == -1);
      REQUIRE(w[static_cast<std::size_t>(9 * 8 + j)] == 0.0f);
      REQUIRE(ids[static_cast<std::size_t>(4 * 8 + j)] >= 0);  // the finite tokens are routed
    }
  }
  auto cfg = random_gate_config(512, 8, false, rng);
  device_vector<float> d_logits(512, 0), d_weights(8, 0);
  device_vector<std::int32_t> d_ids(8, 0);
  device_vector<kernels::device_status> status(1, 0);
  REQUIRE(kernels::launch_topk_gate(d_logits.data(), 1, kernels::gate_params::from(cfg, nullptr), d_ids.data(),
                                    d_weights.data(), new_status(status), nullptr,
                                    kernels::gate_path::block_per_token) == cudaErrorInvalidValue);
}

TEST_CASE("layout kernels: stable expert-major order, offsets and inverse positions", "[kernels][layout]") {
  std::mt19937_64 rng(3);
  for (int E : {8, 64, 256}) {
    for (int k : {1, 2, 8}) {
      for (long long n : {1ll, 17ll, 1000ll, 1500ll, 4096ll, 16384ll}) {
        if (k > E) continue;
        std::vector<std::int32_t> ids(static_cast<std::size_t>(n * k));
        std::vector<std::int32_t> experts(static_cast<std::size_t>(E));
        for (int e = 0; e < E; ++e) experts[static_cast<std::size_t>(e)] = e;
        for (long long t = 0; t < n; ++t) {
          // k distinct experts; skewed: half of all tokens take expert 3 first; some empty slots.
          for (int j = 0; j < k; ++j) std::swap(experts[static_cast<std::size_t>(j)], experts[static_cast<std::size_t>(j + static_cast<int>(rng() % static_cast<std::uint64_t>(E - j)))]);
          if (rng() % 2 == 0) {
            auto const three = std::find(experts.begin(), experts.end(), 3 % E);
            std::iter_swap(experts.begin(), three);
          }
          for (int j = 0; j < k; ++j) {
            int e = experts[static_cast<std::size_t>(j)];
            if (rng() % 50 == 0) e = -1;
            ids[static_cast<std::size_t>(t * k + j)] = e;
          }
        }
        long long const slots = n * k;
        for (auto const path : {kernels::layout_path::automatic, kernels::layout_path::single_block, kernels::layout_path::device_sort,
                                kernels::layout_path::counting}) {
        if (path == kernels::layout_path::single_block && slots > kernels::layout_single_block_max_slots) continue;
        if (path == kernels::layout_path::counting && !kernels::layout_counting_fits(slots, E)) continue;
        device_vector<std::int32_t> d_ids(ids), keys_in(static_cast<std::size_t>(slots), 0xff),
            keys_out(static_cast<std::size_t>(slots), 0xff), vals_in(static_cast<std::size_t>(slots), 0xff),
            sorted(static_cast<std::size_t>(slots), 0xff), position(static_cast<std::size_t>(slots), 0xff);
        device_vector<std::int64_t> offsets(static_cast<std::size_t>(E + 1), 0xff);
        auto const temp_bytes = kernels::layout_sort_temp_bytes(slots, E);
        device_vector<unsigned char> temp(temp_bytes, 0);
        device_vector<kernels::device_status> status(1, 0);
        kernels::layout_buffers b{keys_in.data(), keys_out.data(), vals_in.data(), sorted.data(), position.data(),
                                  offsets.data(), temp.data(), temp_bytes};
        SPECMOE_TEST_CUDA(kernels::launch_layout(d_ids.data(), nullptr, n, k, E, b, new_status(status), nullptr, path));
        SPECMOE_TEST_CUDA(cudaDeviceSynchronize());
        REQUIRE(status.to_host()[0].bits == 0);
        if (path == kernels::layout_path::counting) {  // a second run over the scratch of the first, outputs poisoned
          SPECMOE_TEST_CUDA(cudaMemset(sorted.data(), 0xff, sizeof(std::int32_t) * static_cast<std::size_t>(slots)));
          SPECMOE_TEST_CUDA(cudaMemset(position.data(), 0xff, sizeof(std::int32_t) * static_cast<std::size_t>(slots)));
          SPECMOE_TEST_CUDA(cudaMemset(offsets.data(), 0xff, sizeof(std::int64_t) * static_cast<std::size_t>(E + 1)));
          SPECMOE_TEST_CUDA(kernels::launch_layout(d_ids.data(), nullptr, n, k, E, b, new_status(status), nullptr, path));
          SPECMOE_TEST_CUDA(cudaDeviceSynchronize());
        }
        // Host: counting sort, stable.
        std::vector<std::int64_t> expect_offsets(static_cast<std::size_t>(E + 1), 0);
        for (auto e : ids) if (e >= 0) ++expect_offsets[static_cast<std::size_t>(e + 1)];
        for (int e = 0; e < E; ++e) expect_offsets[static_cast<std::size_t>(e + 1)] += expect_offsets[static_cast<std::size_t>(e)];
        std::vector<std::int32_t> expect_sorted;
        for (int e = 0; e < E; ++e) {
          for (long long s = 0; s < slots; ++s) if (ids[static_cast<std::size_t>(s)] == e) expect_sorted.push_back(static_cast<std::int32_t>(s));
        }
        INFO("E=" << E << " k=" << k << " n=" << n << " path=" << static_cast<int>(path));
        REQUIRE(offsets.to_host() == expect_offsets);
        auto const got_sorted = sorted.to_host();
        REQUIRE(std::vector<std::int32_t>(got_sorted.begin(), got_sorted.begin() + static_cast<std::ptrdiff_t>(expect_sorted.size())) == expect_sorted);
        auto const pos = position.to_host();
        for (long long s = 0; s < slots; ++s) {
          if (ids[static_cast<std::size_t>(s)] < 0) {
            REQUIRE(pos[static_cast<std::size_t>(s)] == -1);
          } else {
            REQUIRE(got_sorted[static_cast<std::size_t>(pos[static_cast<std::size_t>(s)])] == s);
          }
        }
        }
      }
    }
  }
}

TEST_CASE("layout kernels: an id out of range or an expert twice in a token is flagged with its token", "[kernels][layout]") {
  // 300 tokens, top-2, E = 8 (600 slots: two chunks of the counting path); token 2 names expert 9,
  // or token 3 names expert 0 twice; every other token is valid.
  int const n = 300, k = 2, E = 8;
  std::vector<std::int32_t> valid(static_cast<std::size_t>(n * k));
  for (int t = 0; t < n; ++t) {
    valid[static_cast<std::size_t>(t * k)] = t % E;
    valid[static_cast<std::size_t>(t * k + 1)] = (t + 3) % E;
  }
  auto bad_id = valid, twice = valid;
  bad_id[2 * k] = 9;
  twice[3 * k] = 0;
  twice[3 * k + 1] = 0;
  for (auto const path : {kernels::layout_path::single_block, kernels::layout_path::device_sort, kernels::layout_path::counting}) {
    for (auto const* ids : {&bad_id, &twice}) {
      std::size_t const slots = ids->size();
      device_vector<std::int32_t> d_ids(*ids), a(slots, 0), b2(slots, 0), c(slots, 0), d(slots, 0), e(slots, 0);
      device_vector<std::int64_t> offsets(E + 1, 0);
      auto const bytes = kernels::layout_sort_temp_bytes(static_cast<long long>(slots), E);
      device_vector<unsigned char> temp(bytes, 0);
      device_vector<kernels::device_status> status(1, 0);
      kernels::layout_buffers b{a.data(), b2.data(), c.data(), d.data(), e.data(), offsets.data(), temp.data(), bytes};
      SPECMOE_TEST_CUDA(kernels::launch_layout(d_ids.data(), nullptr, n, k, E, b, new_status(status), nullptr, path));
      SPECMOE_TEST_CUDA(cudaDeviceSynchronize());
      auto const s = status.to_host()[0];
      INFO("path=" << static_cast<int>(path));
      if (ids == &bad_id) {
        REQUIRE(s.bits == kernels::device_error_expert_out_of_range);
        REQUIRE(s.first_token == 2);
      } else {
        REQUIRE(s.bits == kernels::device_error_duplicate_expert);
        REQUIRE(s.first_token == 3);
      }
    }
  }
}

TEST_CASE("permute and combine kernels equal host loops (self-identifying rows)", "[kernels][permute][combine]") {
  std::mt19937_64 rng(4);
  int const H = 64, k = 4, S = 1;
  long long const n = 300;
  // x row t holds (t % 256, column) patterns that bf16 stores exactly.
  std::vector<__nv_bfloat16> x(static_cast<std::size_t>(n * H));
  for (long long t = 0; t < n; ++t)
    for (int c = 0; c < H; ++c) x[static_cast<std::size_t>(t * H + c)] = __float2bfloat16(static_cast<float>(t % 256) + static_cast<float>(c % 4) / 4.0f);
  // A permutation of slots (some empty) standing in for the layout.
  std::vector<std::int32_t> slots(static_cast<std::size_t>(n * k));
  for (std::size_t i = 0; i < slots.size(); ++i) slots[i] = static_cast<std::int32_t>(i);
  std::shuffle(slots.begin(), slots.end(), rng);
  long long const rows = n * k - 7;  // the last 7 slots are "empty"
  std::vector<std::int32_t> position(static_cast<std::size_t>(n * k), -1);
  for (long long i = 0; i < rows; ++i) position[static_cast<std::size_t>(slots[static_cast<std::size_t>(i)])] = static_cast<std::int32_t>(i);
  device_vector<__nv_bfloat16> dx(x), xp(static_cast<std::size_t>(n * k * H), 0xff);
  device_vector<std::int32_t> dslots(slots), dpos(position);
  device_vector<std::int64_t> end(std::vector<std::int64_t>{rows});
  SPECMOE_TEST_CUDA(kernels::launch_gather_rows(dx.data(), H, H, dslots.data(), k, end.data(), n * k, xp.data(), nullptr));
  SPECMOE_TEST_CUDA(cudaDeviceSynchronize());
  auto const gathered = xp.to_host();
  for (long long i = 0; i < n * k; ++i) {
    for (int c = 0; c < H; ++c) {
      auto const got = gathered[static_cast<std::size_t>(i * H + c)];
      if (i < rows) {
        REQUIRE(__bfloat162float(got) == __bfloat162float(x[static_cast<std::size_t>(slots[static_cast<std::size_t>(i)] / k * H + c)]));
      } else {
        REQUIRE(reinterpret_cast<std::uint16_t const&>(got) == 0xffff);  // untouched
      }
    }
  }
  // Combine: y = random rows, weights random, one shared expert.
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<__nv_bfloat16> y(static_cast<std::size_t>(rows * H)), shared(static_cast<std::size_t>(n * H));
  for (auto& v : y) v = __float2bfloat16(u(rng));
  for (auto& v : shared) v = __float2bfloat16(u(rng));
  std::vector<float> w(static_cast<std::size_t>(n * k));
  for (auto& v : w) v = u(rng);
  device_vector<__nv_bfloat16> dy(y), dshared(shared), out(static_cast<std::size_t>(n * H), 0xff);
  device_vector<float> dw(w);
  device_vector<kernels::device_status> status(1, 0);
  SPECMOE_TEST_CUDA(kernels::launch_combine(dy.data(), dpos.data(), dw.data(), n, k, H, dshared.data(), S, out.data(), H,
                                            new_status(status), nullptr));
  SPECMOE_TEST_CUDA(cudaDeviceSynchronize());
  auto const got = out.to_host();
  for (long long t = 0; t < n; ++t) {
    for (int c = 0; c < H; ++c) {
      float acc = 0.0f;
      for (int j = 0; j < k; ++j) {
        auto const row = position[static_cast<std::size_t>(t * k + j)];
        if (row >= 0) acc = acc + w[static_cast<std::size_t>(t * k + j)] * __bfloat162float(y[static_cast<std::size_t>(row * H + c)]);
      }
      acc = acc + __bfloat162float(shared[static_cast<std::size_t>(t * H + c)]);
      REQUIRE(__bfloat162float(got[static_cast<std::size_t>(t * H + c)]) == __bfloat162float(__float2bfloat16(acc)));
    }
  }
  // A flagged status leaves the output untouched.
  device_vector<__nv_bfloat16> out2(static_cast<std::size_t>(n * H), 0xff);
  kernels::device_status bad{kernels::device_error_non_finite_logit, 0, 0};
  SPECMOE_TEST_CUDA(cudaMemcpy(status.data(), &bad, sizeof bad, cudaMemcpyHostToDevice));
  SPECMOE_TEST_CUDA(kernels::launch_combine(dy.data(), dpos.data(), dw.data(), n, k, H, dshared.data(), S, out2.data(), H,
                                            status.data(), nullptr));
  SPECMOE_TEST_CUDA(cudaDeviceSynchronize());
  for (auto v : out2.to_host()) REQUIRE(reinterpret_cast<std::uint16_t const&>(v) == 0xffff);
}

TEST_CASE("gather kernel: every row width a lane loop can end at, wide strides, bf16 and fp32 rows, outputs poisoned",
          "[kernels][permute]") {
  std::mt19937_64 rng(12);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  // 8 elements a vector, a warp 256 vectors of a row (the grid's y takes the rest): widths below,
  // at and one vector past one warp's share, and one that ends mid-way through a warp's share.
  for (int H : {8, 256, 2048, 2056, 7168}) {
    for (int k : {1, 8}) {
      for (bool fp32 : {false, true}) {
        INFO("H " << H << " k " << k << " fp32 " << fp32);
        long long const n = 37, stride = H + 16, slots_n = n * k;
        std::vector<std::int32_t> slots(static_cast<std::size_t>(slots_n));
        for (std::size_t i = 0; i < slots.size(); ++i) slots[i] = static_cast<std::int32_t>(i);
        std::shuffle(slots.begin(), slots.end(), rng);
        long long const rows = slots_n - 5;  // the last 5 rows are past rows_end: untouched
        std::vector<float> xf(static_cast<std::size_t>(n * stride));
        for (auto& v : xf) v = u(rng);
        device_vector<std::int32_t> dslots(slots);
        device_vector<std::int64_t> end(std::vector<std::int64_t>{rows});
        device_vector<__nv_bfloat16> xp(static_cast<std::size_t>(slots_n * H), 0xff);
        if (fp32) {
          device_vector<float> dx(xf);
          SPECMOE_TEST_CUDA(kernels::launch_gather_rows(dx.data(), stride, H, dslots.data(), k, end.data(), slots_n, xp.data(), nullptr));
          SPECMOE_TEST_CUDA(cudaDeviceSynchronize());
        } else {
          std::vector<__nv_bfloat16> xb(xf.size());
          for (std::size_t i = 0; i < xf.size(); ++i) xb[i] = __float2bfloat16(xf[i]);
          device_vector<__nv_bfloat16> dx(xb);
          SPECMOE_TEST_CUDA(kernels::launch_gather_rows(dx.data(), stride, H, dslots.data(), k, end.data(), slots_n, xp.data(), nullptr));
          SPECMOE_TEST_CUDA(cudaDeviceSynchronize());
        }
        auto const got = xp.to_host();
        long long wrong = 0, touched = 0;
        for (long long i = 0; i < slots_n; ++i) {
          for (int c = 0; c < H; ++c) {
            auto const bits = reinterpret_cast<std::uint16_t const&>(got[static_cast<std::size_t>(i * H + c)]);
            if (i < rows) {
              __nv_bfloat16 const want = __float2bfloat16(xf[static_cast<std::size_t>(slots[static_cast<std::size_t>(i)] / k * stride + c)]);
              wrong += bits != reinterpret_cast<std::uint16_t const&>(want);
            } else {
              touched += bits != 0xffff;
            }
          }
        }
        REQUIRE(wrong == 0);
        REQUIRE(touched == 0);
      }
    }
  }
}

TEST_CASE("router logits kernel: a block per expert equals the fp32 dot products, 1 to 16 tokens, outputs poisoned",
          "[kernels][router]") {
  std::mt19937_64 rng(11);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (int E : {8, 128, 256}) {
    for (int H : {64, 2048, 7168}) {
      std::int64_t const stride = H + 8;  // a row stride wider than the row
      std::vector<__nv_bfloat16> router(static_cast<std::size_t>(E * stride));
      for (auto& w : router) w = __float2bfloat16(u(rng));
      for (std::int64_t n = 1; n <= kernels::router_logits_max_tokens; ++n) {
        INFO("E " << E << " H " << H << " n " << n);
        std::vector<__nv_bfloat16> x(static_cast<std::size_t>(n * H));
        for (auto& v : x) v = __float2bfloat16(u(rng));
        device_vector<__nv_bfloat16> d_router(router), d_x(x);
        device_vector<float> d_logits(static_cast<std::size_t>(n * E), 0xff);  // NaN until written
        REQUIRE(kernels::router_logits_supported(d_router.data(), stride, E, H, d_x.data(), n));
        SPECMOE_TEST_CUDA(kernels::launch_router_logits(d_router.data(), stride, E, H, d_x.data(), n, d_logits.data(), nullptr));
        SPECMOE_TEST_CUDA(cudaDeviceSynchronize());
        auto const got = d_logits.to_host();
        for (std::int64_t t = 0; t < n; ++t) {
          for (int e = 0; e < E; ++e) {
            double want = 0, scale = 0;
            for (int h = 0; h < H; ++h) {
              double const p = static_cast<double>(__bfloat162float(router[static_cast<std::size_t>(e * stride + h)])) *
                               static_cast<double>(__bfloat162float(x[static_cast<std::size_t>(t * H + h)]));
              want += p;
              scale += std::abs(p);
            }
            float const g = got[static_cast<std::size_t>(t * E + e)];
            REQUIRE(std::isfinite(g));
            REQUIRE(std::abs(g - want) <= 1e-5 * scale + 1e-6);
          }
        }
      }
    }
  }
  // Outside its range it launches nothing and says so (the layer then runs a GEMM).
  std::int64_t const too_many = kernels::router_logits_max_tokens + 1;
  device_vector<__nv_bfloat16> d_router(std::vector<__nv_bfloat16>(64 * 64)),
      d_x(std::vector<__nv_bfloat16>(static_cast<std::size_t>(too_many * 64)));
  REQUIRE_FALSE(kernels::router_logits_supported(d_router.data(), 64, 64, 64, d_x.data(), too_many));
  REQUIRE(kernels::launch_router_logits(d_router.data(), 64, 64, 64, d_x.data(), too_many, nullptr, nullptr) == cudaErrorInvalidValue);
  REQUIRE_FALSE(kernels::router_logits_supported(d_router.data(), 64, 64, 60, d_x.data(), 1));  // H not a multiple of 8
}

TEST_CASE("decode routing kernel: one launch equals router logits + block gate + tiny layout bit for bit, twice in a row",
          "[kernels][router][gate][layout]") {
  std::mt19937_64 rng(17);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  struct shape {
    int E, k;
    bool grouped;
  };
  for (auto const sh : {shape{8, 2, false}, shape{64, 8, false}, shape{128, 8, false}, shape{256, 8, true}, shape{256, 1, false}}) {
    for (int H : {64, 2048}) {
      auto cfg = random_gate_config(sh.E, sh.k, sh.grouped, rng);
      std::vector<__nv_bfloat16> router(static_cast<std::size_t>(sh.E * H));
      for (auto& w : router) w = __float2bfloat16(u(rng) * 0.2f);
      std::vector<float> bias(static_cast<std::size_t>(sh.E));
      for (auto& b : bias) b = u(rng) * 0.05f;
      device_vector<__nv_bfloat16> d_router(router);
      device_vector<float> d_bias(bias);
      auto const p = kernels::gate_params::from(cfg, sh.grouped ? d_bias.data() : nullptr);
      device_vector<unsigned> arrivals(1, 0);
      long long const max_n = std::min<long long>(kernels::router_logits_max_tokens, kernels::decode_routing_max_slots / sh.k);
      for (long long n = 1; n <= max_n; ++n) {
        for (bool nan_token : {false, true}) {
          INFO("E " << sh.E << " k " << sh.k << " grouped " << sh.grouped << " H " << H << " n " << n << " NaN " << nan_token);
          std::vector<__nv_bfloat16> x(static_cast<std::size_t>(n * H));
          for (auto& v : x) v = __float2bfloat16(u(rng));
          long long const bad = nan_token ? static_cast<long long>(rng() % static_cast<std::uint64_t>(n)) : -1;
          if (bad >= 0) x[static_cast<std::size_t>(bad * H + 5)] = __float2bfloat16(std::numeric_limits<float>::quiet_NaN());
          device_vector<__nv_bfloat16> d_x(x);
          auto const slots = static_cast<std::size_t>(n * sh.k);
          // reference: the three kernels one after another
          device_vector<float> ref_logits(static_cast<std::size_t>(n * sh.E), 0xff), ref_w(slots, 0xff);
          device_vector<std::int32_t> ref_ids(slots, 0xff), ref_sorted(slots, 0xff), ref_pos(slots, 0xff);
          device_vector<std::int64_t> ref_off(static_cast<std::size_t>(sh.E + 1), 0xff);
          device_vector<kernels::device_status> ref_status(1, 0);
          kernels::layout_buffers rb{};
          rb.sorted_slots = ref_sorted.data();
          rb.position = ref_pos.data();
          rb.offsets = ref_off.data();
          SPECMOE_TEST_CUDA(kernels::launch_router_logits(d_router.data(), H, sh.E, H, d_x.data(), n, ref_logits.data(), nullptr));
          SPECMOE_TEST_CUDA(kernels::launch_topk_gate(ref_logits.data(), n, p, ref_ids.data(), ref_w.data(), new_status(ref_status),
                                                      nullptr, kernels::gate_path::block_per_token));
          SPECMOE_TEST_CUDA(kernels::launch_layout(ref_ids.data(), ref_w.data(), n, sh.k, sh.E, rb, ref_status.data(), nullptr));
          REQUIRE(kernels::decode_routing_supported(d_router.data(), H, H, d_x.data(), n, p));
          for (int rep = 0; rep < 2; ++rep) {  // the second launch finds the block counter reset by the first
            device_vector<float> logits(static_cast<std::size_t>(n * sh.E), 0xff), w(slots, 0xff);
            device_vector<std::int32_t> ids(slots, 0xff), sorted(slots, 0xff), pos(slots, 0xff);
            device_vector<std::int64_t> off(static_cast<std::size_t>(sh.E + 1), 0xff);
            device_vector<kernels::device_status> status(1, 0xff);  // dirty: the kernel writes it whole
            kernels::layout_buffers b{};
            b.sorted_slots = sorted.data();
            b.position = pos.data();
            b.offsets = off.data();
            SPECMOE_TEST_CUDA(kernels::launch_decode_routing(d_router.data(), H, H, d_x.data(), n, logits.data(), p, ids.data(),
                                                             w.data(), b, status.data(), arrivals.data(), nullptr));
            SPECMOE_TEST_CUDA(cudaDeviceSynchronize());
            REQUIRE(ids.to_host() == ref_ids.to_host());
            auto const gw = w.to_host(), rw = ref_w.to_host();
            REQUIRE(std::memcmp(gw.data(), rw.data(), slots * sizeof(float)) == 0);
            REQUIRE(sorted.to_host() == ref_sorted.to_host());
            REQUIRE(pos.to_host() == ref_pos.to_host());
            REQUIRE(off.to_host() == ref_off.to_host());
            auto const st = status.to_host()[0], rst = ref_status.to_host()[0];
            REQUIRE(st.bits == rst.bits);
            REQUIRE(st.first_token == rst.first_token);
            REQUIRE(st.bits == (bad >= 0 ? int{kernels::device_error_non_finite_logit} : 0));
            if (bad >= 0) REQUIRE(st.first_token == bad);
            REQUIRE(arrivals.to_host()[0] == 0u);
          }
        }
      }
    }
  }
  // Outside its range it launches nothing and says so.
  device_vector<__nv_bfloat16> d_router(std::vector<__nv_bfloat16>(512 * 64)), d_x(std::vector<__nv_bfloat16>(9 * 64));
  device_vector<unsigned> arrivals(1, 0);
  moe_config wide{.hidden_size = 64, .ffn_size = 8, .num_experts = 512, .top_k = 8};
  REQUIRE_FALSE(kernels::decode_routing_supported(d_router.data(), 64, 64, d_x.data(), 1, kernels::gate_params::from(wide, nullptr)));
  moe_config many{.hidden_size = 64, .ffn_size = 8, .num_experts = 128, .top_k = 8};
  auto const pm = kernels::gate_params::from(many, nullptr);
  REQUIRE_FALSE(kernels::decode_routing_supported(d_router.data(), 64, 64, d_x.data(), 9, pm));  // 72 slots
  kernels::layout_buffers none{};
  REQUIRE(kernels::launch_decode_routing(d_router.data(), 64, 64, d_x.data(), 9, nullptr, pm, nullptr, nullptr, none, nullptr,
                                         arrivals.data(), nullptr) == cudaErrorInvalidValue);
}
