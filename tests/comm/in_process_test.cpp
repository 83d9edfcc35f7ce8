#include "catch.hpp"

#include <specmoe/comm/concepts.hpp>

#include <cstdint>
#include <vector>

using namespace specmoe;

TEST_CASE("in_process all-to-all-v delivers rows grouped by source", "[comm]") {
  int const D = 3;
  // counts[s][d] rows of 2 ints; each row holds (s, d*100 + i): self-identifying.
  std::vector<std::int64_t> counts{1, 0, 2, 3, 1, 0, 0, 2, 1};
  std::vector<std::vector<std::int32_t>> send(D), recv(D);
  for (int s = 0; s < D; ++s) {
    for (int d = 0; d < D; ++d) {
      for (int i = 0; i < counts[static_cast<std::size_t>(s * D + d)]; ++i) send[static_cast<std::size_t>(s)].insert(send[static_cast<std::size_t>(s)].end(), {s, d * 100 + i});
    }
  }
  std::vector<std::byte const*> sp(D);
  std::vector<std::byte*> rp(D);
  for (int d = 0; d < D; ++d) {
    std::int64_t rows = 0;
    for (int s = 0; s < D; ++s) rows += counts[static_cast<std::size_t>(s * D + d)];
    recv[static_cast<std::size_t>(d)].assign(static_cast<std::size_t>(rows * 2), -1);
    sp[static_cast<std::size_t>(d)] = reinterpret_cast<std::byte const*>(send[static_cast<std::size_t>(d)].data());
    rp[static_cast<std::size_t>(d)] = reinterpret_cast<std::byte*>(recv[static_cast<std::size_t>(d)].data());
  }
  in_process{}.alltoallv({D, 8, counts, sp, rp});
  REQUIRE(recv[0] == std::vector<std::int32_t>{0, 0, 1, 0, 1, 1, 1, 2});
  REQUIRE(recv[1] == std::vector<std::int32_t>{1, 100, 2, 100, 2, 101});
  REQUIRE(recv[2] == std::vector<std::int32_t>{0, 200, 0, 201, 2, 200});
  REQUIRE_THROWS_AS(in_process{}.alltoallv({D, 8, std::span<std::int64_t const>(counts).first(4), sp, rp}), specmoe::error);
}
