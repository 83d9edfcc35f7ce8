// specmoe/comm/concepts.hpp: the CommBackend policy — how do token rows move between ranks?
#pragma once

#include <specmoe/core/error.hpp>
#include <specmoe/core/spaces.hpp>

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>

namespace specmoe {

/// @brief One all-to-all-v of fixed-size rows among D ranks, in host memory (host_space).
///
/// NOTES: `send[s]` holds rank s's rows grouped by destination in rank order; `recv[d]` receives
/// them grouped by source in rank order. `counts[s * D + d]` is the number of rows s sends to d,
/// self included (rows to self are copied but never cross a link).
struct host_exchange {
  int num_ranks = 0;
  std::int64_t row_bytes = 0;
  std::span<std::int64_t const> counts;    ///< [D * D]
  std::span<std::byte const* const> send;  ///< [D]
  std::span<std::byte* const> recv;        ///< [D]
};

/// @brief CommBackend: names the space it serves (`using space_type = ...`).
template <class C>
concept comm_backend = std::move_constructible<C> && requires { typename C::space_type; } &&
                       execution_space<typename C::space_type>;

/// @brief A CommBackend for host_space: the layer calls `c.alltoallv(exchange)` for each exchange
/// of a forward (shuffle, dispatch rows and routing, combine, unshuffle), all ranks at once.
template <class C>
concept host_comm_backend = comm_backend<C> && std::same_as<typename C::space_type, host_space> &&
                            requires(C& c, host_exchange const& exchange) { c.alltoallv(exchange); };

/// @brief The default for host_space: an in-process copy between the simulated ranks.
struct in_process {
  using space_type = host_space;

  void alltoallv(host_exchange const& x) const {
    auto const D = static_cast<std::size_t>(x.num_ranks);
    SPECMOE_EXPECTS(x.counts.size() == D * D && x.send.size() == D && x.recv.size() == D, errc::comm,
                    "in_process exchange of ", D, " ranks got ", x.counts.size(), " counts, ", x.send.size(),
                    " send and ", x.recv.size(), " receive buffers");
    for (std::size_t d = 0; d < D; ++d) {
      std::int64_t recv_row = 0;
      for (std::size_t s = 0; s < D; ++s) {
        std::int64_t send_row = 0;
        for (std::size_t p = 0; p < d; ++p) send_row += x.counts[s * D + p];
        auto const n = x.counts[s * D + d];
        if (n > 0) {
          std::memcpy(x.recv[d] + recv_row * x.row_bytes, x.send[s] + send_row * x.row_bytes,
                      static_cast<std::size_t>(n * x.row_bytes));
        }
        recv_row += n;
      }
    }
  }
};
static_assert(host_comm_backend<in_process>);

}  // namespace specmoe
