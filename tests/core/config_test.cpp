// tests/core/config_test.cpp: the version and feature macros of specmoe/config.hpp.
#include <specmoe/config.hpp>

#include "catch.hpp"

#include <type_traits>

TEST_CASE("config: version macros are 0.1.0 and match specmoe::version", "[core][config]") {
  STATIC_REQUIRE(SPECMOE_VERSION_MAJOR == 0);
  STATIC_REQUIRE(SPECMOE_VERSION_MINOR == 1);
  STATIC_REQUIRE(SPECMOE_VERSION_PATCH == 0);

  STATIC_REQUIRE(specmoe::version.major == SPECMOE_VERSION_MAJOR);
  STATIC_REQUIRE(specmoe::version.minor == SPECMOE_VERSION_MINOR);
  STATIC_REQUIRE(specmoe::version.patch == SPECMOE_VERSION_PATCH);
  STATIC_REQUIRE(std::is_same_v<decltype(specmoe::version), specmoe::version_info const>);
}

TEST_CASE("config: feature macros are 0 or 1, and the host test build has no CUDA", "[core][config]") {
  STATIC_REQUIRE((SPECMOE_HAS_CUDA == 0 || SPECMOE_HAS_CUDA == 1));
  STATIC_REQUIRE((SPECMOE_HAS_NCCL == 0 || SPECMOE_HAS_NCCL == 1));
  // Host tests link specmoe::specmoe only, never specmoe::cuda.
  CHECK(SPECMOE_HAS_CUDA == 0);
  CHECK(SPECMOE_HAS_NCCL == 0);
}

#ifndef SPECMOE_HOST_DEVICE
#error "config.hpp must define SPECMOE_HOST_DEVICE"
#endif
