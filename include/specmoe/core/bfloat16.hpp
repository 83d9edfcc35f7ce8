// specmoe/core/bfloat16.hpp: a host bfloat16 storage type, bit-compatible with CUDA's __nv_bfloat16.
#pragma once

#include <bit>
#include <cstdint>
#include <type_traits>

namespace specmoe {

/// @brief bfloat16 as a storage type: 1 sign, 8 exponent, 7 mantissa bits.
///
/// Arithmetic happens in float: convert with `float(x)` and back with `bf16(f)`. The conversion
/// from float rounds to nearest, ties to even, and keeps NaN a NaN, exactly as CUDA's
/// `__float2bfloat16_rn`, so rows written by the host reference and by GPU kernels agree bit for
/// bit. Same size and layout as `__nv_bfloat16`: device buffers may be reinterpreted either way.
struct bf16 {
  std::uint16_t bits = 0;

  constexpr bf16() = default;
  constexpr explicit bf16(float f) noexcept : bits(round_from_float(f)) {}

  /// Builds a value from its bit pattern (no rounding).
  static constexpr bf16 from_bits(std::uint16_t b) noexcept {
    bf16 r;
    r.bits = b;
    return r;
  }

  constexpr explicit operator float() const noexcept {
    return std::bit_cast<float>(static_cast<std::uint32_t>(bits) << 16);
  }

  friend constexpr bool operator==(bf16 a, bf16 b) noexcept { return a.bits == b.bits; }

 private:
  static constexpr std::uint16_t round_from_float(float f) noexcept {
    auto const u = std::bit_cast<std::uint32_t>(f);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0) {
      return static_cast<std::uint16_t>((u >> 16) | 0x0040u);  // quiet NaN, sign kept
    }
    auto const rounding = 0x7fffu + ((u >> 16) & 1u);  // ties to even
    return static_cast<std::uint16_t>((u + rounding) >> 16);
  }
};

static_assert(sizeof(bf16) == 2 && std::is_trivially_copyable_v<bf16>);

/// @brief The element types the host reference stores activations and weights in.
template <class T>
concept storage_type = std::is_same_v<T, float> || std::is_same_v<T, bf16>;

/// @brief Converts a stored element to float (the arithmetic type of the host reference).
constexpr float to_float(float x) noexcept { return x; }
constexpr float to_float(bf16 x) noexcept { return static_cast<float>(x); }

/// @brief Rounds a float to storage type T (identity for float).
template <storage_type T>
constexpr T from_float(float x) noexcept {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    return bf16(x);
  }
}

}  // namespace specmoe
