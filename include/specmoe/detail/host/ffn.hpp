// Host arithmetic shared by the host layer and the dense reference, so both compute every output
// element by the same sequence of float operations (the bit-exactness tests rely on it).
#pragma once

#include <specmoe/core/bfloat16.hpp>
#include <specmoe/core/expert_weights.hpp>
#include <specmoe/core/matrix_view.hpp>

#include <array>
#include <cmath>
#include <cstdint>
#include <vector>

namespace specmoe::detail::host {

inline constexpr std::int64_t row_block = 8;  // rows per block: one SIMD-friendly lane per row

/// y[t][o] = sum_i w[o][i] * x[t][i] for t < n; x [n, in] fp32, w [out, in], y [n, out] fp32.
///
/// NOTES: every y element is a sum over i in ascending order of rounded products (no FMA; the
/// library's tests build with -ffp-contract=off). Rows are independent: a row's result does not
/// depend on which other rows share its block, so batching never changes the answer.
template <class W>
void matmul_rows(float const* x, std::int64_t n, matrix_view<W const> w, float* y) {
  auto const in = w.cols, out = w.rows;
  std::vector<float> xt(static_cast<std::size_t>(in * row_block));
  for (std::int64_t t0 = 0; t0 < n; t0 += row_block) {
    auto const nb = n - t0 < row_block ? n - t0 : row_block;
    for (std::int64_t i = 0; i < in; ++i) {
      for (std::int64_t t = 0; t < row_block; ++t) xt[static_cast<std::size_t>(i * row_block + t)] = t < nb ? x[(t0 + t) * in + i] : 0.0f;
    }
    for (std::int64_t o = 0; o < out; ++o) {
      std::array<float, row_block> acc{};
      W const* wrow = w.row_ptr(o);
      for (std::int64_t i = 0; i < in; ++i) {
        float const wi = to_float(wrow[i]);
        float const* xi = xt.data() + i * row_block;
        for (std::int64_t t = 0; t < row_block; ++t) acc[static_cast<std::size_t>(t)] = acc[static_cast<std::size_t>(t)] + wi * xi[t];
      }
      for (std::int64_t t = 0; t < nb; ++t) y[(t0 + t) * out + o] = acc[static_cast<std::size_t>(t)];
    }
  }
}

/// silu(g) * u, the SwiGLU gate.
inline float swiglu(float g, float u) noexcept { return g / (1.0f + std::exp(-g)) * u; }

/// One SwiGLU expert on n rows: y = round_T(down · round_T(silu(gate · x) * (up · x))).
///
/// x [n, H] fp32 (already rounded from T); y [n, H] in T. The intermediate is rounded to T as
/// the GPU path stores it between its two GEMMs.
template <storage_type T, class W>
void swiglu_expert(float const* x, std::int64_t n, ffn_weights<W> const& w, std::int64_t expert, T* y) {
  auto const F = w.ffn_size(), H = w.down.rows;
  std::vector<float> g(static_cast<std::size_t>(n * F)), u(static_cast<std::size_t>(n * F)),
      d(static_cast<std::size_t>(n * H));
  matmul_rows(x, n, w.gate[expert], g.data());
  matmul_rows(x, n, w.up[expert], u.data());
  for (std::size_t i = 0; i < g.size(); ++i) g[i] = to_float(from_float<T>(swiglu(g[i], u[i])));
  matmul_rows(g.data(), n, w.down[expert], d.data());
  for (std::size_t i = 0; i < d.size(); ++i) y[i] = from_float<T>(d[i]);
}

/// Rows of T widened to fp32.
template <storage_type T>
std::vector<float> widen(T const* x, std::int64_t n, std::int64_t cols, std::int64_t stride) {
  std::vector<float> out(static_cast<std::size_t>(n * cols));
  for (std::int64_t r = 0; r < n; ++r) {
    for (std::int64_t c = 0; c < cols; ++c) out[static_cast<std::size_t>(r * cols + c)] = to_float(x[r * stride + c]);
  }
  return out;
}

}  // namespace specmoe::detail::host
