// specmoe/layer/host_moe_layer.hpp: moe_layer on host_space — D simulated ranks in one process.
#pragma once

#include <specmoe/comm/concepts.hpp>
#include <specmoe/core/counters.hpp>
#include <specmoe/core/dispatch_layout.hpp>
#include <specmoe/core/expert_weights.hpp>
#include <specmoe/core/token_plan.hpp>
#include <specmoe/detail/host/ffn.hpp>
#include <specmoe/layer/moe_layer.hpp>
#include <specmoe/router/gate.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>
#include <variant>
#include <vector>

namespace specmoe {

/// @brief The host reference layer: plain C++, fp32 arithmetic, T (float or bf16) storage.
///
/// Runs every rank of the expert-parallel group in lockstep through the steps the GPU path
/// takes, moving rows between the simulated ranks through `Comm`, and counts what a real run
/// would send. `forward` writes the caller's output only after every check passed.
///
/// NOTES: with `combine_mode::per_activation` (the default) the output is bit-identical to
/// `dense_reference` for any predictor, placement, grouping and number of ranks.
template <router_predictor Predictor, token_placement Placement, expert_grouping Grouping, prefetch_depth Prefetch,
          comm_backend Comm>
class moe_layer<host_space, Predictor, Placement, Grouping, Prefetch, Comm> {
  static_assert(host_comm_backend<Comm>,
                "moe_layer<host_space>: the CommBackend must satisfy specmoe::host_comm_backend "
                "(space_type = host_space and alltoallv(host_exchange const&))");
  static_assert(!Prefetch::offloads,
                "moe_layer<host_space> keeps every expert resident; offloading PrefetchDepth policies run on "
                "cuda_space and in the offload simulator");

 public:
  using space_type = host_space;
  using policies_type = layer_policies<Predictor, Placement, Grouping, Prefetch, Comm>;

  /// @brief Builds the layer for `config` (all D = config.num_ranks ranks share it).
  /// @note The layer keeps the weight views, not copies: the memory must outlive the layer.
  /// @throw specmoe::error on an invalid config, weights that do not match it (or hold NaN/Inf),
  ///        or a grouping that gives ranks different placements or leaves an expert unowned.
  template <storage_type W>
  moe_layer(moe_config const& config, moe_weights<W> const& weights, policies_type policies = {},
            host_layer_options options = {})
      : moe_layer(std::vector<moe_config>(static_cast<std::size_t>(config.num_ranks > 0 ? config.num_ranks : 1), config),
                  weights, std::move(policies), options) {}

  /// @brief Builds the layer from each rank's own view of the config (index = rank), as a real
  /// multi-process run sees it. @throw specmoe::error `rank_mismatch` naming the rank and field.
  template <storage_type W>
  moe_layer(std::span<moe_config const> per_rank, moe_weights<W> const& weights, policies_type policies = {},
            host_layer_options options = {})
      : policies_(std::move(policies)), options_(options), weights_(weights) {
    SPECMOE_EXPECTS(!per_rank.empty(), errc::invalid_argument, "no rank configs given");
    config_ = per_rank[0];
    config_.validate();
    SPECMOE_EXPECTS(per_rank.size() == static_cast<std::size_t>(config_.num_ranks), errc::rank_mismatch,
                    per_rank.size(), " rank configs given, rank 0 says num_ranks is ", config_.num_ranks);
    for (std::size_t r = 1; r < per_rank.size(); ++r) {
      auto const diff = describe_difference(config_, per_rank[r]);
      SPECMOE_EXPECTS(diff.empty(), errc::rank_mismatch, "rank ", r, " disagrees with rank 0 on the config: ", diff,
                      " (rank 0 vs rank ", r, ")");
    }
    for (int r = 0; r < config_.num_ranks; ++r) {
      auto p = policies_.grouping.place(per_rank[static_cast<std::size_t>(r)], r);
      SPECMOE_EXPECTS(p.num_experts() == config_.num_experts && p.num_ranks() == config_.num_ranks,
                      errc::shape_mismatch, "the grouping placed ", p.num_experts(), " experts on ", p.num_ranks(),
                      " ranks for rank ", r, "; the layer has ", config_.num_experts, " experts on ",
                      config_.num_ranks, " ranks");
      if (r == 0) {
        placement_ = std::move(p);
      } else {
        auto const diff = placement_.describe_difference(p);
        SPECMOE_EXPECTS(diff.empty(), errc::rank_mismatch, "rank ", r,
                        " got a different expert placement than rank 0: ", diff, " (rank 0 vs rank ", r, ")");
      }
    }
    validate_weights(weights, config_, options_.check_weight_values);
    total_.dispatch = total_.combine = total_.shuffle = traffic_matrix(config_.num_ranks);
  }

  /// @brief Runs one batch: out[t] = MoE(x[t]) for every token t of every rank.
  ///
  /// @throw specmoe::error naming the problem (shapes, NaN/Inf activations or logits, bad routing,
  ///        an expert id out of range, a predictor or placement that breaks its contract); `out`
  ///        is then untouched.
  template <storage_type T>
  void forward(host_batch<T> const& batch, matrix_view<T> out) {
    std::visit([&](auto const& w) { run(batch, out, w); }, weights_);
  }

  [[nodiscard]] moe_config const& config() const noexcept { return config_; }
  [[nodiscard]] expert_placement const& placement() const noexcept { return placement_; }
  [[nodiscard]] policies_type& policies() noexcept { return policies_; }
  [[nodiscard]] Predictor& predictor() noexcept { return policies_.predictor; }
  /// Counters summed over every forward since construction or the last reset.
  [[nodiscard]] layer_counters const& counters() const noexcept { return total_; }
  /// Counters of the last forward alone.
  [[nodiscard]] layer_counters const& last_counters() const noexcept { return last_; }
  void reset_counters() {
    total_ = {};
    total_.dispatch = total_.combine = total_.shuffle = traffic_matrix(config_.num_ranks);
  }

 private:
  // One simulated rank's state during a forward.
  template <class T>
  struct rank_state {
    std::vector<std::int64_t> tokens;  // batch indices of the tokens here at gate time, ascending
    std::vector<T> x;                  // [tokens, H] rows received by the shuffle
    routing route;                     // [tokens, k]
    dispatch_layout layout;
    std::vector<T> recv_x;             // [received rows, H]
    std::vector<std::int32_t> recv_ids;  // [received rows, k] experts to apply here (-1: elsewhere)
    std::vector<float> recv_weights;     // [received rows, k]
    std::vector<T> results;            // [received rows, k, H] expert outputs (combine input)
    std::vector<float> out_acc;        // [tokens, H] combined results, fp32
    std::vector<T> out;                // [tokens, H]
  };

  template <class T>
  static std::span<std::byte const> bytes_of(std::vector<T> const& v) {
    return std::as_bytes(std::span<T const>(v));
  }

  // All-to-all-v of rows through the backend: send[s] grouped by destination, counts[s][d].
  template <class E>
  void exchange(std::vector<std::vector<E>> const& send, std::vector<std::int64_t> const& counts,
                std::int64_t elems_per_row, std::vector<std::vector<E>>& recv) {
    auto const D = static_cast<std::size_t>(config_.num_ranks);
    recv.assign(D, {});
    std::vector<std::byte const*> send_ptrs(D);
    std::vector<std::byte*> recv_ptrs(D);
    for (std::size_t d = 0; d < D; ++d) {
      std::int64_t rows = 0;
      for (std::size_t s = 0; s < D; ++s) rows += counts[s * D + d];
      recv[d].resize(static_cast<std::size_t>(rows * elems_per_row));
      recv_ptrs[d] = reinterpret_cast<std::byte*>(recv[d].data());
      send_ptrs[d] = reinterpret_cast<std::byte const*>(send[d].data());
    }
    policies_.comm.alltoallv(host_exchange{config_.num_ranks, elems_per_row * static_cast<std::int64_t>(sizeof(E)),
                                           counts, send_ptrs, recv_ptrs});
  }

  template <class T>
  void check_batch(host_batch<T> const& b, matrix_view<T> out, std::vector<std::int64_t>& tokens_per_rank) const {
    auto const H = config_.hidden_size, D = config_.num_ranks;
    auto const N = b.x.rows;
    SPECMOE_EXPECTS(b.x.cols == H, errc::shape_mismatch, "x has ", b.x.cols, " columns, hidden_size is ", H);
    SPECMOE_EXPECTS(N == 0 || b.x.data != nullptr, errc::invalid_argument, "x points at nothing");
    SPECMOE_EXPECTS(out.rows == N && out.cols == H, errc::shape_mismatch, "out is [", out.rows, ", ", out.cols,
                    "], x is [", N, ", ", H, "]");
    SPECMOE_EXPECTS(N == 0 || out.data != nullptr, errc::invalid_argument, "out points at nothing");
    SPECMOE_EXPECTS(b.x.stride >= H && out.stride >= H, errc::invalid_argument, "row strides (x ", b.x.stride,
                    ", out ", out.stride, ") must be at least hidden_size ", H);
    if (b.tokens_per_rank.empty() && D == 1) {
      tokens_per_rank.assign(1, N);
    } else {
      SPECMOE_EXPECTS(static_cast<int>(b.tokens_per_rank.size()) == D, errc::shape_mismatch,
                      "tokens_per_rank has ", b.tokens_per_rank.size(), " entries for ", D, " ranks");
      tokens_per_rank.assign(b.tokens_per_rank.begin(), b.tokens_per_rank.end());
      std::int64_t sum = 0;
      for (int r = 0; r < D; ++r) {
        SPECMOE_EXPECTS(tokens_per_rank[static_cast<std::size_t>(r)] >= 0, errc::invalid_argument, "rank ", r,
                        " has a negative token count (", tokens_per_rank[static_cast<std::size_t>(r)], ")");
        sum += tokens_per_rank[static_cast<std::size_t>(r)];
      }
      SPECMOE_EXPECTS(sum == N, errc::shape_mismatch, "tokens_per_rank sums to ", sum, ", x has ", N, " rows");
    }
    SPECMOE_EXPECTS(b.token_ids.empty() || static_cast<std::int64_t>(b.token_ids.size()) == N, errc::shape_mismatch,
                    "token_ids has ", b.token_ids.size(), " entries for ", N, " tokens");
    if (b.routing) validate_routing(*b.routing, config_.num_experts, N, config_.top_k);
    std::int64_t t0 = 0;
    for (int r = 0; r < D; ++r) {
      for (std::int64_t i = 0; i < tokens_per_rank[static_cast<std::size_t>(r)]; ++i) {
        auto const t = t0 + i;
        for (std::int64_t h = 0; h < H; ++h) {
          SPECMOE_EXPECTS(std::isfinite(to_float(b.x(t, h))), errc::non_finite, "activation x[", t, "][", h,
                          "] (rank ", r, ", token ", i, ") is not finite (", to_float(b.x(t, h)), ")");
        }
      }
      t0 += tokens_per_rank[static_cast<std::size_t>(r)];
    }
  }

  template <class T, class W>
  void run(host_batch<T> const& batch, matrix_view<T> out, moe_weights<W> const& w) {
    auto const D = config_.num_ranks, k = config_.top_k, E = config_.num_experts;
    auto const H = static_cast<std::int64_t>(config_.hidden_size);
    auto const UD = static_cast<std::size_t>(D);
    auto const N = batch.x.rows;
    auto const row_bytes = H * static_cast<std::int64_t>(sizeof(T));

    // 0. validate everything before any work the caller could observe.
    std::vector<std::int64_t> tokens_per_rank;
    check_batch(batch, out, tokens_per_rank);
    auto const home = home_ranks(tokens_per_rank);
    auto const xf = detail::host::widen(batch.x.data, N, H, batch.x.stride);  // [N, H]

    layer_counters c;
    c.forward_calls = 1;
    c.tokens = N;
    c.dispatch = c.combine = c.shuffle = traffic_matrix(D);
    c.tokens_per_expert.assign(static_cast<std::size_t>(E), 0);
    c.activations_per_rank.assign(UD, 0);

    // 1. predict
    prediction guess;
    if constexpr (Predictor::predicts) {
      policies_.predictor.predict(
          prediction_request{config_, N, home, batch.token_ids, matrix_view<float const>(xf.data(), N, H), placement_},
          guess);
      validate_prediction(guess, N, E, D);
      derive_predicted_ranks(guess, placement_, home);
    } else {
      guess.reset(N, 0);
    }

    // 2. place: plan, then move rows from home ranks to gate ranks (rank order keeps batch order).
    token_plan plan;
    if constexpr (Placement::moves_tokens) {
      policies_.placement.plan(placement_request{config_, N, home, tokens_per_rank, guess, placement_}, plan);
      plan.validate(N, D);
    } else {
      plan.rank = home;
    }
    std::vector<rank_state<T>> ranks(UD);
    std::vector<std::int64_t> local_index(static_cast<std::size_t>(N));  // index of token t on its gate rank
    for (std::int64_t t = 0; t < N; ++t) {
      auto& rs = ranks[static_cast<std::size_t>(plan.rank[static_cast<std::size_t>(t)])];
      local_index[static_cast<std::size_t>(t)] = static_cast<std::int64_t>(rs.tokens.size());
      rs.tokens.push_back(t);
    }
    {
      std::vector<std::vector<T>> send(UD), recv;
      std::vector<std::int64_t> counts(UD * UD, 0);
      for (std::int64_t t = 0; t < N; ++t) ++counts[static_cast<std::size_t>(home[static_cast<std::size_t>(t)]) * UD + static_cast<std::size_t>(plan.rank[static_cast<std::size_t>(t)])];
      for (std::size_t s = 0; s < UD; ++s) {
        for (std::size_t d = 0; d < UD; ++d) {
          for (std::int64_t t = 0; t < N; ++t) {
            if (home[static_cast<std::size_t>(t)] != static_cast<int>(s) || plan.rank[static_cast<std::size_t>(t)] != static_cast<int>(d)) continue;
            auto const* row = batch.x.row_ptr(t);
            send[s].insert(send[s].end(), row, row + H);
          }
          c.shuffle.add(static_cast<int>(s), static_cast<int>(d), counts[s * UD + d] * row_bytes);
          if (s != d) c.tokens_moved += counts[s * UD + d];
        }
      }
      exchange(send, counts, H, recv);
      for (std::size_t r = 0; r < UD; ++r) ranks[r].x = std::move(recv[r]);
    }

    // 3. gate on every rank (or take the engine's routing), then 4. layout.
    for (int r = 0; r < D; ++r) {
      auto& rs = ranks[static_cast<std::size_t>(r)];
      auto const n = static_cast<std::int64_t>(rs.tokens.size());
      if (batch.routing) {
        rs.route.resize(n, k);
        for (std::int64_t i = 0; i < n; ++i) {
          for (int j = 0; j < k; ++j) {
            auto const src = static_cast<std::size_t>(rs.tokens[static_cast<std::size_t>(i)] * k + j);
            rs.route.topk_ids[static_cast<std::size_t>(i * k + j)] = batch.routing->topk_ids[src];
            rs.route.topk_weights[static_cast<std::size_t>(i * k + j)] = batch.routing->topk_weights[src];
          }
        }
      } else {
        auto const xr = detail::host::widen(rs.x.data(), n, H, H);
        for (std::int64_t i = 0; i < n; ++i) {
          // Name the token by its batch index in errors: route() numbers rows from first_token.
          auto const t = rs.tokens[static_cast<std::size_t>(i)];
          routing one;
          route(xr.data() + i * H, 1, w.router, config_, one, t, r);
          if (i == 0) rs.route.resize(n, k);
          std::copy(one.topk_ids.begin(), one.topk_ids.end(), rs.route.topk_ids.begin() + i * k);
          std::copy(one.topk_weights.begin(), one.topk_weights.end(), rs.route.topk_weights.begin() + i * k);
        }
        if (n == 0) rs.route.resize(0, k);
      }
      rs.layout = make_dispatch_layout(rs.route, placement_, r);
    }

    // 5. dispatch: one row per (token, destination rank) plus the routing slots served there.
    {
      std::vector<std::vector<T>> send_x(UD), recv_x;
      std::vector<std::vector<std::int32_t>> send_ids(UD), recv_ids;
      std::vector<std::vector<float>> send_w(UD), recv_w;
      std::vector<std::int64_t> counts(UD * UD, 0);
      for (std::size_t s = 0; s < UD; ++s) {
        auto const& rs = ranks[s];
        auto const& l = rs.layout;
        for (std::size_t d = 0; d < UD; ++d) {
          counts[s * UD + d] = l.num_tokens_per_rank[d];
          c.dispatch.add(static_cast<int>(s), static_cast<int>(d), l.num_tokens_per_rank[d] * row_bytes);
          if (s != d) c.metadata_bytes += l.num_tokens_per_rank[d] * k * static_cast<std::int64_t>(sizeof(std::int32_t) + sizeof(float));
        }
        for (std::int64_t row = 0; row < l.rank_prefix.back(); ++row) {
          auto const i = l.send_token[static_cast<std::size_t>(row)];
          std::size_t d = 0;
          while (l.rank_prefix[d + 1] <= row) ++d;
          send_x[s].insert(send_x[s].end(), rs.x.begin() + i * H, rs.x.begin() + (i + 1) * H);
          for (int j = 0; j < k; ++j) {
            auto const slot = static_cast<std::size_t>(i * k + j);
            bool const here = l.slot_rank[slot] == static_cast<int>(d);
            send_ids[s].push_back(here ? rs.route.topk_ids[slot] : -1);
            send_w[s].push_back(here ? rs.route.topk_weights[slot] : 0.0f);
          }
        }
        c.dispatch_rows += l.remote_rows(static_cast<int>(s));
        c.dispatch_rows_without_dedup += l.remote_activations(static_cast<int>(s));
      }
      exchange(send_x, counts, H, recv_x);
      exchange(send_ids, counts, k, recv_ids);
      exchange(send_w, counts, k, recv_w);
      for (std::size_t d = 0; d < UD; ++d) {
        ranks[d].recv_x = std::move(recv_x[d]);
        ranks[d].recv_ids = std::move(recv_ids[d]);
        ranks[d].recv_weights = std::move(recv_w[d]);
      }
    }

    // 6. experts: each rank runs its local experts on the rows that named them.
    for (int d = 0; d < D; ++d) {
      auto& rs = ranks[static_cast<std::size_t>(d)];
      auto const rows = static_cast<std::int64_t>(rs.recv_ids.size()) / k;
      rs.results.assign(static_cast<std::size_t>(rows * k * H), T{});
      auto const xr = detail::host::widen(rs.recv_x.data(), rows, H, H);
      std::vector<std::int64_t> slots;  // (row * k + j) served by the current expert
      std::vector<float> gathered;
      std::vector<T> y;
      for (int e : placement_.local_experts(d)) {
        slots.clear();
        for (std::int64_t s = 0; s < rows * k; ++s) {
          if (rs.recv_ids[static_cast<std::size_t>(s)] == e) slots.push_back(s);
        }
        if (slots.empty()) continue;
        auto const n = static_cast<std::int64_t>(slots.size());
        gathered.resize(static_cast<std::size_t>(n * H));
        for (std::int64_t i = 0; i < n; ++i) {
          auto const row = slots[static_cast<std::size_t>(i)] / k;
          std::copy(xr.begin() + row * H, xr.begin() + (row + 1) * H, gathered.begin() + i * H);
        }
        y.resize(static_cast<std::size_t>(n * H));
        detail::host::swiglu_expert(gathered.data(), n, w.experts, e, y.data());
        for (std::int64_t i = 0; i < n; ++i) {
          std::copy(y.begin() + i * H, y.begin() + (i + 1) * H, rs.results.begin() + slots[static_cast<std::size_t>(i)] * H);
        }
      }
    }

    // 7. combine, then shared experts, at every gate rank.
    combine(ranks, c, row_bytes);
    for (int r = 0; r < D; ++r) add_shared_and_round(ranks[static_cast<std::size_t>(r)], w, r);

    // Unshuffle: rows return from gate ranks to home ranks.
    std::vector<std::vector<T>> home_out;
    {
      std::vector<std::vector<T>> send(UD);
      std::vector<std::int64_t> counts(UD * UD, 0);
      for (std::size_t s = 0; s < UD; ++s) {
        for (std::size_t d = 0; d < UD; ++d) {
          for (std::size_t i = 0; i < ranks[s].tokens.size(); ++i) {
            if (home[static_cast<std::size_t>(ranks[s].tokens[i])] != static_cast<int>(d)) continue;
            ++counts[s * UD + d];
            send[s].insert(send[s].end(), ranks[s].out.begin() + static_cast<std::int64_t>(i) * H,
                           ranks[s].out.begin() + static_cast<std::int64_t>(i + 1) * H);
          }
          c.shuffle.add(static_cast<int>(s), static_cast<int>(d), counts[s * UD + d] * row_bytes);
        }
      }
      exchange(send, counts, H, home_out);
    }

    // Every check passed: write the caller's output (home rank r's rows arrive grouped by gate
    // rank, in batch order within each; map them back through the plan).
    for (std::size_t r = 0; r < UD; ++r) {
      std::int64_t row = 0;
      for (std::size_t s = 0; s < UD; ++s) {
        for (auto const t : ranks[s].tokens) {
          if (home[static_cast<std::size_t>(t)] != static_cast<int>(r)) continue;
          std::copy(home_out[r].begin() + row * H, home_out[r].begin() + (row + 1) * H, out.row_ptr(t));
          ++row;
        }
      }
    }

    // 8. observe, and count.
    routing actual(N, k);
    for (auto const& rs : ranks) {
      for (std::size_t i = 0; i < rs.tokens.size(); ++i) {
        auto const t = static_cast<std::size_t>(rs.tokens[i]);
        for (int j = 0; j < k; ++j) {
          actual.topk_ids[t * static_cast<std::size_t>(k) + static_cast<std::size_t>(j)] = rs.route.topk_ids[i * static_cast<std::size_t>(k) + static_cast<std::size_t>(j)];
          actual.topk_weights[t * static_cast<std::size_t>(k) + static_cast<std::size_t>(j)] = rs.route.topk_weights[i * static_cast<std::size_t>(k) + static_cast<std::size_t>(j)];
        }
      }
    }
    count_activations(ranks, home, guess, c);
    policies_.predictor.observe(routing_observation{config_, home, plan.rank, batch.token_ids, actual.view(), placement_,
                                                    Predictor::predicts ? &guess : nullptr});
    last_ = c;
    total_.accumulate(c);
  }

  // Step 7: results travel back to the token's gate rank and are summed in gate order.
  template <class T>
  void combine(std::vector<rank_state<T>>& ranks, layer_counters& c, std::int64_t row_bytes) {
    auto const D = static_cast<std::size_t>(config_.num_ranks);
    auto const k = static_cast<std::size_t>(config_.top_k);
    auto const H = static_cast<std::int64_t>(config_.hidden_size);
    // Received row ranges per source, in source order (the dispatch exchange's receive layout).
    auto recv_first = [&](std::size_t d, std::size_t s) {
      std::int64_t first = 0;
      for (std::size_t p = 0; p < s; ++p) first += ranks[p].layout.num_tokens_per_rank[d];
      return first;
    };
    std::vector<std::vector<float>> acc(D);
    for (std::size_t s = 0; s < D; ++s) acc[s].assign(ranks[s].tokens.size() * static_cast<std::size_t>(H), 0.0f);

    if (options_.combine == combine_mode::per_activation) {
      // contrib[s][(i * k + j) * H ...]: expert output of token i slot j of gate rank s.
      std::vector<std::vector<T>> send(D), recv;
      std::vector<std::int64_t> counts(D * D, 0);
      for (std::size_t d = 0; d < D; ++d) {
        for (std::size_t s = 0; s < D; ++s) {
          auto const first = recv_first(d, s);
          for (std::int64_t row = first; row < first + ranks[s].layout.num_tokens_per_rank[d]; ++row) {
            for (std::size_t j = 0; j < k; ++j) {
              auto const slot = static_cast<std::size_t>(row) * k + j;
              if (ranks[d].recv_ids[slot] < 0) continue;
              ++counts[d * D + s];
              send[d].insert(send[d].end(), ranks[d].results.begin() + static_cast<std::int64_t>(slot) * H,
                             ranks[d].results.begin() + static_cast<std::int64_t>(slot + 1) * H);
            }
          }
          c.combine.add(static_cast<int>(d), static_cast<int>(s), counts[d * D + s] * row_bytes);
        }
      }
      exchange(send, counts, H, recv);
      // Rows arrive from d = 0..D-1; within d in the order d sent them: by send row, then slot.
      for (std::size_t s = 0; s < D; ++s) {
        auto const& l = ranks[s].layout;
        auto const n = ranks[s].tokens.size();
        std::vector<std::int64_t> contrib_row(n * k, -1);
        std::int64_t next = 0;
        for (std::size_t d = 0; d < D; ++d) {
          for (std::int64_t row = l.rank_prefix[d]; row < l.rank_prefix[d + 1]; ++row) {
            auto const i = static_cast<std::size_t>(l.send_token[static_cast<std::size_t>(row)]);
            for (std::size_t j = 0; j < k; ++j) {
              if (l.slot_rank[i * k + j] == static_cast<int>(d)) contrib_row[i * k + j] = next++;
            }
          }
        }
        for (std::size_t i = 0; i < n; ++i) {
          float* a = acc[s].data() + static_cast<std::int64_t>(i) * H;
          for (std::size_t j = 0; j < k; ++j) {
            auto const row = contrib_row[i * k + j];
            if (row < 0) continue;
            float const wgt = ranks[s].route.topk_weights[i * k + j];
            T const* y = recv[s].data() + row * H;
            for (std::int64_t h = 0; h < H; ++h) a[h] = a[h] + wgt * to_float(y[h]);
          }
        }
      }
    } else {
      // Each expert rank reduces its share of a token (slot order) into one row per received row.
      std::vector<std::vector<T>> send(D), recv;
      std::vector<std::int64_t> counts(D * D, 0);
      std::vector<float> partial(static_cast<std::size_t>(H));
      for (std::size_t d = 0; d < D; ++d) {
        for (std::size_t s = 0; s < D; ++s) {
          auto const first = recv_first(d, s);
          auto const rows = ranks[s].layout.num_tokens_per_rank[d];
          counts[d * D + s] = rows;
          c.combine.add(static_cast<int>(d), static_cast<int>(s), rows * row_bytes);
          for (std::int64_t row = first; row < first + rows; ++row) {
            std::fill(partial.begin(), partial.end(), 0.0f);
            for (std::size_t j = 0; j < k; ++j) {
              auto const slot = static_cast<std::size_t>(row) * k + j;
              if (ranks[d].recv_ids[slot] < 0) continue;
              float const wgt = ranks[d].recv_weights[slot];
              T const* y = ranks[d].results.data() + static_cast<std::int64_t>(slot) * H;
              for (std::int64_t h = 0; h < H; ++h) partial[static_cast<std::size_t>(h)] = partial[static_cast<std::size_t>(h)] + wgt * to_float(y[h]);
            }
            for (std::int64_t h = 0; h < H; ++h) send[d].push_back(from_float<T>(partial[static_cast<std::size_t>(h)]));
          }
        }
      }
      exchange(send, counts, H, recv);
      for (std::size_t s = 0; s < D; ++s) {
        auto const& l = ranks[s].layout;
        for (std::int64_t row = 0; row < l.rank_prefix.back(); ++row) {
          auto const i = l.send_token[static_cast<std::size_t>(row)];
          float* a = acc[s].data() + i * H;
          T const* y = recv[s].data() + row * H;
          for (std::int64_t h = 0; h < H; ++h) a[h] = a[h] + to_float(y[h]);
        }
      }
    }
    for (std::size_t s = 0; s < D; ++s) ranks[s].out_acc = std::move(acc[s]);
  }

  template <class T, class W>
  void add_shared_and_round(rank_state<T>& rs, moe_weights<W> const& w, int rank) {
    auto const H = static_cast<std::int64_t>(config_.hidden_size);
    auto const n = static_cast<std::int64_t>(rs.tokens.size());
    auto& acc = rs.out_acc;
    if (config_.num_shared_experts > 0 && n > 0) {
      auto const xr = detail::host::widen(rs.x.data(), n, H, H);
      std::vector<T> y(static_cast<std::size_t>(n * H));
      for (int e = 0; e < config_.num_shared_experts; ++e) {
        detail::host::swiglu_expert(xr.data(), n, w.shared, e, y.data());
        for (std::size_t i = 0; i < acc.size(); ++i) acc[i] = acc[i] + to_float(y[i]);
      }
    }
    rs.out.resize(acc.size());
    for (std::int64_t i = 0; i < n; ++i) {
      for (std::int64_t h = 0; h < H; ++h) {
        auto const v = acc[static_cast<std::size_t>(i * H + h)];
        SPECMOE_EXPECTS(std::isfinite(v), errc::non_finite, "output of token ", rs.tokens[static_cast<std::size_t>(i)],
                        " (on rank ", rank, ") is not finite at column ", h,
                        ": the experts overflowed for finite inputs");
        rs.out[static_cast<std::size_t>(i * H + h)] = from_float<T>(v);
      }
    }
  }

  template <class T>
  void count_activations(std::vector<rank_state<T>> const& ranks, std::vector<int> const& home,
                         prediction const& guess, layer_counters& c) const {
    auto const k = static_cast<std::size_t>(config_.top_k);
    std::vector<int> per_rank(static_cast<std::size_t>(config_.num_ranks));
    for (std::size_t r = 0; r < ranks.size(); ++r) {
      auto const& rs = ranks[r];
      for (std::size_t i = 0; i < rs.tokens.size(); ++i) {
        auto const t = static_cast<std::size_t>(rs.tokens[i]);
        std::fill(per_rank.begin(), per_rank.end(), 0);
        std::int64_t slots = 0, hits = 0;
        for (std::size_t j = 0; j < k; ++j) {
          auto const e = rs.route.topk_ids[i * k + j];
          if (e < 0) continue;
          auto const d = rs.layout.slot_rank[i * k + j];
          ++slots;
          ++per_rank[static_cast<std::size_t>(d)];
          ++c.activations;
          ++c.tokens_per_expert[static_cast<std::size_t>(e)];
          ++c.activations_per_rank[static_cast<std::size_t>(d)];
          if (d == static_cast<int>(r)) ++c.local_activations;
          if (placement_.owns(home[t], e)) ++c.home_local_activations;
          for (int p = 0; p < guess.width; ++p) hits += guess.expert(static_cast<std::int64_t>(t), p) == e;
        }
        if (!Predictor::predicts) continue;
        if (guess.rank[t] >= 0 && slots > 0) {
          ++c.predicted_tokens;
          int best = 0;
          for (auto v : per_rank) best = v > best ? v : best;
          if (per_rank[static_cast<std::size_t>(guess.rank[t])] == best) ++c.rank_hits;
        }
        bool named = false;
        for (int p = 0; p < guess.width; ++p) named = named || guess.expert(static_cast<std::int64_t>(t), p) >= 0;
        if (named) {
          c.predicted_slots += slots;
          c.expert_hits += hits;
        }
      }
    }
  }

  moe_config config_{};
  policies_type policies_;
  host_layer_options options_;
  std::variant<moe_weights<float>, moe_weights<bf16>> weights_;
  expert_placement placement_;
  layer_counters total_;
  layer_counters last_;
};

}  // namespace specmoe
