#include "catch.hpp"

#include <specmoe/core/bfloat16.hpp>

#include <bit>
#include <cmath>
#include <limits>

using specmoe::bf16;

TEST_CASE("bf16 rounds to nearest, ties to even, like __float2bfloat16_rn", "[core][bf16]") {
  REQUIRE(bf16(1.0f).bits == 0x3f80);
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to the even mantissa (1.0).
  REQUIRE(bf16(std::bit_cast<float>(0x3f808000u)).bits == 0x3f80);
  // 1 + 3*2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6: ties to even rounds up.
  REQUIRE(bf16(std::bit_cast<float>(0x3f818000u)).bits == 0x3f82);
  REQUIRE(bf16(std::bit_cast<float>(0x3f808001u)).bits == 0x3f81);
  REQUIRE(bf16(-2.5f).bits == 0xc020);
  REQUIRE(static_cast<float>(bf16(3.0f)) == 3.0f);
  REQUIRE(std::isinf(static_cast<float>(bf16(std::numeric_limits<float>::max()))));
  REQUIRE(std::isnan(static_cast<float>(bf16(std::numeric_limits<float>::quiet_NaN()))));
  REQUIRE(std::isnan(static_cast<float>(bf16(std::bit_cast<float>(0x7f800001u)))));  // signalling NaN stays NaN
}

TEST_CASE("from_float and to_float round-trip every bf16 value", "[core][bf16]") {
  for (std::uint32_t b = 0; b < 0x10000; ++b) {
    auto const v = bf16::from_bits(static_cast<std::uint16_t>(b));
    float const f = specmoe::to_float(v);
    if (std::isnan(f)) continue;
    REQUIRE(specmoe::from_float<bf16>(f).bits == v.bits);
  }
}
