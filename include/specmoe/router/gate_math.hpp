// specmoe/router/gate_math.hpp: the float operations of the gates, written once for host and device
// so the GPU gate picks exactly the experts the host gate picks from the same logits.
#pragma once

#include <specmoe/config.hpp>

#if !defined(__CUDACC__)
#include <cmath>
#endif

namespace specmoe::detail {

// Rounded multiply and add that no compiler fuses into an FMA.
SPECMOE_HOST_DEVICE inline float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
SPECMOE_HOST_DEVICE inline float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

/// exp(x) by range reduction and a degree-7 polynomial (relative error ~2e-7), the same bits on
/// host and device (libm's exp and CUDA's expf differ in the last place, which reorders ties).
SPECMOE_HOST_DEVICE inline float gate_exp(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
#if defined(__CUDA_ARCH__)
  float const n = rintf(mul_rn(x, 1.44269504088896341f));
#else
  float const n = std::nearbyint(mul_rn(x, 1.44269504088896341f));
#endif
  float r = add_rn(x, -mul_rn(n, 0.693145751953125f));      // ln2 high part: exact product
  r = add_rn(r, -mul_rn(n, 1.428606765330187045e-06f));     // ln2 low part
  float p = 1.0f / 5040.0f;
  p = add_rn(mul_rn(p, r), 1.0f / 720.0f);
  p = add_rn(mul_rn(p, r), 1.0f / 120.0f);
  p = add_rn(mul_rn(p, r), 1.0f / 24.0f);
  p = add_rn(mul_rn(p, r), 1.0f / 6.0f);
  p = add_rn(mul_rn(p, r), 0.5f);
  p = add_rn(mul_rn(p, r), 1.0f);
  p = add_rn(mul_rn(p, r), 1.0f);
#if defined(__CUDA_ARCH__)
  return ldexpf(p, static_cast<int>(n));
#else
  return std::ldexp(p, static_cast<int>(n));
#endif
}

/// The sigmoid of the grouped gate: 1 / (1 + exp(-x)).
SPECMOE_HOST_DEVICE inline float gate_sigmoid(float x) { return 1.0f / add_rn(1.0f, gate_exp(-x)); }

/// Lanes of the warp-shaped sum both gates use for the softmax denominator.
inline constexpr int gate_sum_lanes = 32;

}  // namespace specmoe::detail
