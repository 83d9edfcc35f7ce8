// The in-process bootstrap: ranks as threads meet, exchange blobs in rank order, and fail clearly.
#include "catch.hpp"

#include <specmoe/comm/bootstrap.hpp>

#include <chrono>
#include <exception>
#include <random>
#include <stdexcept>
#include <thread>
#include <vector>

using namespace specmoe;

namespace {
// Runs body(rank, bootstrap) on one thread per rank; returns each rank's exception (or null).
template <class F>
std::vector<std::exception_ptr> on_threads(int D, std::chrono::milliseconds timeout, F body) {
  auto group = in_process_group::create(D, timeout);
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(D));
  std::vector<std::thread> threads;
  for (int r = 0; r < D; ++r) {
    threads.emplace_back([&, r] {
      try {
        auto member = group->join(r);
        body(r, member);
      } catch (...) {
        errors[static_cast<std::size_t>(r)] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  return errors;
}
}  // namespace

TEST_CASE("in_process_group: repeated all-gathers deliver every rank's blob in rank order", "[comm][bootstrap]") {
  int const D = 5, rounds = 50;
  std::vector<std::vector<std::uint64_t>> seen(static_cast<std::size_t>(D));
  std::uint64_t const salt = std::random_device{}();
  auto const errors = on_threads(D, std::chrono::seconds(20), [&](int r, bootstrap& b) {
    if (b.rank() != r || b.size() != D) throw std::runtime_error("wrong rank or size");
    for (int i = 0; i < rounds; ++i) {
      std::uint64_t const mine = salt ^ (static_cast<std::uint64_t>(r) << 32 | static_cast<std::uint64_t>(i));
      std::vector<std::uint64_t> all(static_cast<std::size_t>(D), 0);
      if (r == i % D) std::this_thread::sleep_for(std::chrono::microseconds(200));  // a late rank each round
      b.allgather(&mine, sizeof mine, all.data());
      seen[static_cast<std::size_t>(r)].insert(seen[static_cast<std::size_t>(r)].end(), all.begin(), all.end());
    }
  });
  for (auto const& e : errors) REQUIRE(!e);
  for (int r = 0; r < D; ++r) {
    auto const& s = seen[static_cast<std::size_t>(r)];
    REQUIRE(s.size() == static_cast<std::size_t>(D * rounds));
    for (int i = 0; i < rounds; ++i)
      for (int q = 0; q < D; ++q)
        REQUIRE(s[static_cast<std::size_t>(i * D + q)] ==
                (salt ^ (static_cast<std::uint64_t>(q) << 32 | static_cast<std::uint64_t>(i))));
  }
}

TEST_CASE("in_process_group: a missing rank is a timeout, different sizes a rank mismatch", "[comm][bootstrap]") {
  SECTION("one rank never arrives") {
    auto const errors = on_threads(3, std::chrono::milliseconds(200), [](int r, bootstrap& b) {
      if (r == 2) return;
      int x = r, all[3];
      b.allgather(&x, sizeof x, all);
    });
    for (int r = 0; r < 2; ++r) {
      REQUIRE(errors[static_cast<std::size_t>(r)]);
      try {
        std::rethrow_exception(errors[static_cast<std::size_t>(r)]);
      } catch (specmoe::error const& e) {
        REQUIRE(e.code() == errc::timeout);
      }
    }
    REQUIRE(!errors[2]);
  }
  SECTION("ranks pass blobs of different sizes: every rank fails") {
    auto const errors = on_threads(2, std::chrono::seconds(5), [](int r, bootstrap& b) {
      long long big[2] = {1, 2}, all[4];
      b.allgather(big, r == 0 ? sizeof big : sizeof big[0], all);
    });
    for (auto const& e : errors) {
      REQUIRE(e);
      try {
        std::rethrow_exception(e);
      } catch (specmoe::error const& x) {
        REQUIRE(x.code() == errc::rank_mismatch);
      }
    }
  }
  REQUIRE_THROWS_AS(in_process_group::create(0), specmoe::error);
}
