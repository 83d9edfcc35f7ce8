// tests/catch.hpp: one include for every specmoe test, whichever Catch2 is installed.
//
//   #include "catch.hpp"
//
// Catch2 v3 (SPECMOE_CATCH2_V3 defined by tests/CMakeLists.txt) or v2.13 (catch2/catch.hpp).
// Uniform names in both:
//   TEST_CASE, TEMPLATE_TEST_CASE, TEMPLATE_LIST_TEST_CASE, SECTION, GENERATE, REQUIRE_THAT, ...
//   Catch::Approx                              (v2: Catch::Detail::Approx)
//   Catch::Matchers::ContainsSubstring(str)    (v2: Catch::Matchers::Contains)
//   Catch::Matchers::WithinAbs / WithinRel / WithinULP
//   specmoe_test::contains(str)                -- e.g. REQUIRE_THROWS_WITH(f(), specmoe_test::contains("bad k"))
//   SPECMOE_SKIP(msg)                          -- v3: SKIP(msg); v2: a passing WARN + return
#pragma once

#include <string>

#if defined(SPECMOE_CATCH2_V3)
#include <catch2/catch_all.hpp>
#define SPECMOE_SKIP(msg) SKIP(msg)
#else
#include <catch2/catch.hpp>

namespace Catch {
using Detail::Approx;  // v3 spelling
namespace Matchers {
/// v3 spelling of v2's Contains (case-sensitive).
inline auto ContainsSubstring(std::string const& str) { return Contains(str); }
}  // namespace Matchers
}  // namespace Catch

#define SPECMOE_SKIP(msg) \
  do {                    \
    WARN(msg);            \
    return;               \
  } while (false)
#endif

namespace specmoe_test {
/// Matches strings (e.g. exception messages) that contain `str`, case-sensitively.
inline auto contains(std::string const& str) { return Catch::Matchers::ContainsSubstring(str); }
}  // namespace specmoe_test
