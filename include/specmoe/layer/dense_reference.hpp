// specmoe/layer/dense_reference.hpp: the MoE layer computed token by token, with no ranks at all.
#pragma once

#include <specmoe/core/bfloat16.hpp>
#include <specmoe/core/expert_weights.hpp>
#include <specmoe/core/matrix_view.hpp>
#include <specmoe/core/moe_config.hpp>
#include <specmoe/core/routing.hpp>
#include <specmoe/detail/host/ffn.hpp>
#include <specmoe/router/gate.hpp>

#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

namespace specmoe {

/// @brief out[t] = round_T( sum_j w_j * round_T(expert_{e_j}(x[t])) + sum_s round_T(shared_s(x[t])) ),
/// one token at a time, the routed sum in gate order.
///
/// The plain definition every layer is tested against: the host layer equals it bit for bit
/// (fp32 and bf16 storage), GPU layers within bf16 tolerance. Uses the engine's routing when
/// given, otherwise the gate. When `routed` is non-null it receives the routing used.
/// @throw specmoe::error on shape mismatches, bad routing or non-finite logits.
template <storage_type T, storage_type W>
void dense_reference(moe_config const& cfg, moe_weights<W> const& w, std::type_identity_t<matrix_view<T const>> x,
                     matrix_view<T> out,
                     std::optional<routing_view> given = std::nullopt, routing* routed = nullptr) {
  cfg.validate();
  auto const H = static_cast<std::int64_t>(cfg.hidden_size);
  auto const k = cfg.top_k;
  SPECMOE_EXPECTS(x.cols == H && out.cols == H && out.rows == x.rows, errc::shape_mismatch, "x [", x.rows, ", ",
                  x.cols, "] and out [", out.rows, ", ", out.cols, "] must both be [tokens, ", H, "]");
  if (given) validate_routing(*given, cfg.num_experts, x.rows, k);
  routing r(x.rows, k);
  std::vector<T> y(static_cast<std::size_t>(H));
  std::vector<float> acc(static_cast<std::size_t>(H));
  for (std::int64_t t = 0; t < x.rows; ++t) {
    auto const xf = detail::host::widen(x.row_ptr(t), 1, H, H);
    if (given) {
      for (int j = 0; j < k; ++j) {
        r.topk_ids[static_cast<std::size_t>(t * k + j)] = given->id(t, j);
        r.topk_weights[static_cast<std::size_t>(t * k + j)] = given->weight(t, j);
      }
    } else {
      routing one;
      route(xf.data(), 1, w.router, cfg, one, t);
      std::copy(one.topk_ids.begin(), one.topk_ids.end(), r.topk_ids.begin() + t * k);
      std::copy(one.topk_weights.begin(), one.topk_weights.end(), r.topk_weights.begin() + t * k);
    }
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int j = 0; j < k; ++j) {
      auto const e = r.id(t, j);
      if (e < 0) continue;
      detail::host::swiglu_expert(xf.data(), 1, w.experts, e, y.data());
      for (std::int64_t h = 0; h < H; ++h) acc[static_cast<std::size_t>(h)] = acc[static_cast<std::size_t>(h)] + r.weight(t, j) * to_float(y[static_cast<std::size_t>(h)]);
    }
    for (int s = 0; s < cfg.num_shared_experts; ++s) {
      detail::host::swiglu_expert(xf.data(), 1, w.shared, s, y.data());
      for (std::int64_t h = 0; h < H; ++h) acc[static_cast<std::size_t>(h)] = acc[static_cast<std::size_t>(h)] + to_float(y[static_cast<std::size_t>(h)]);
    }
    for (std::int64_t h = 0; h < H; ++h) out(t, h) = from_float<T>(acc[static_cast<std::size_t>(h)]);
  }
  if (routed) *routed = std::move(r);
}

}  // namespace specmoe
