// forward_tp_async: the MoE block with attention in tensor parallelism (shuffled reduce-scatter,
// expert-parallel forward of the shard, shuffled all-gather), one thread per rank, against the host
// reference of the summed partials; the device shuffle plan against plan_tp_shuffle slot for slot;
// the inter-layer predictors over layers in order against the host ones; fewer rows crossing with
// good guesses; errors on every rank, outputs untouched.
#include "support/cuda_testbed.cuh"
#include "support/ep_testbed.cuh"
#include "support/testbed.hpp"

#include <specmoe/comm/nccl_alltoallv.cuh>
#include <specmoe/comm/nvlink_direct.cuh>
#include <specmoe/layer/cuda_ep_layer.cuh>
#include <specmoe/layer/dense_reference.hpp>
#include <specmoe/router/device_layer_affinity.cuh>
#include <specmoe/router/device_token_affinity.cuh>

#include <functional>
#include <memory>
#include <numeric>
#include <optional>
#include <random>
#include <thread>

using namespace specmoe;
using specmoe::test::dev_buf;
using specmoe::test::device_count;
using specmoe::test::error_code;
using specmoe::test::error_text;
using specmoe::test::rank_weights;

namespace {

enum class guesses { none, engine, table };
enum class backend_kind { nvlink, nccl };

struct tp_run {
  moe_config cfg;
  std::int64_t tokens = 0;
  std::vector<std::vector<bf16>> partial;  // [D][T * H]
  std::optional<routing> given{};           // routing of all T tokens (else the gate runs)
  guesses how = guesses::none;
  std::vector<int> predicted{};      // engine guesses [T]
  std::vector<float> confidence{};   // [T] or empty
  std::vector<std::int32_t> token_ids{};     // [T] for the table
  std::optional<grouping::plan_layer> table{};
  std::int64_t max_tokens = 128;
  std::chrono::milliseconds timeout{5000};
  std::function<bool(int)> forwards = [](int) { return true; };
  int graph_replays = 0;
  backend_kind backend = backend_kind::nvlink;
};

struct tp_result {
  std::vector<bf16> out;
  std::vector<int> ranks;
  std::vector<std::int32_t> sent;
  std::exception_ptr error;
};

template <class Pred, class Place, class Comm>
using tp_layer = moe_layer<cuda_space, Pred, Place, explicit_placement, all_resident, Comm>;

/// What every runner needs: D ranks in one process, a stream each, and (for NCCL) communicators;
/// `with_comm(r, use)` builds rank r's backend and hands it to `use`.
struct rank_group {
  int D = 1, devices = 1;
  std::shared_ptr<in_process_group> group;
  std::vector<cudaStream_t> streams;
#if SPECMOE_HAS_NCCL
  std::vector<ncclComm_t> comms;
#endif
  backend_kind backend;

  rank_group(int ranks, backend_kind b) : D(ranks), devices(std::max(device_count(), 1)), backend(b) {
    group = in_process_group::create(D, std::chrono::seconds(30));
    streams.resize(static_cast<std::size_t>(D));
    for (int r = 0; r < D; ++r) {
      SPECMOE_CUDA_TRY(cudaSetDevice(r % devices));
      SPECMOE_CUDA_TRY(cudaStreamCreateWithFlags(&streams[static_cast<std::size_t>(r)], cudaStreamNonBlocking));
    }
#if SPECMOE_HAS_NCCL
    if (backend == backend_kind::nccl) {
      comms.resize(static_cast<std::size_t>(D));
      std::vector<int> devs(static_cast<std::size_t>(D));
      for (int r = 0; r < D; ++r) devs[static_cast<std::size_t>(r)] = r % devices;
      SPECMOE_NCCL_TRY(ncclCommInitAll(comms.data(), D, devs.data()));
    }
#endif
  }
  rank_group(rank_group const&) = delete;
  rank_group& operator=(rank_group const&) = delete;
  ~rank_group() {
    for (auto st : streams) cudaStreamDestroy(st);
#if SPECMOE_HAS_NCCL
    for (auto c : comms) ncclCommDestroy(c);
#endif
  }

  template <class Use>
  void with_comm(int r, ep_buffer_options const& o, std::chrono::milliseconds timeout, Use&& use) {
    if (backend == backend_kind::nvlink) {
      nvlink_direct_options no;
      static_cast<ep_buffer_options&>(no) = o;
      no.timeout = timeout;
      use(nvlink_direct(std::make_shared<in_process_group::member>(group->join(r)), no));
    } else {
#if SPECMOE_HAS_NCCL
      use(nccl_alltoallv(comms[static_cast<std::size_t>(r)], o));
#endif
    }
  }

  /// Runs body(r) on one thread per rank (device set), collecting what it throws.
  template <class Body>
  std::vector<std::exception_ptr> run(Body&& body) {
    std::vector<std::exception_ptr> errors(static_cast<std::size_t>(D));
    std::vector<std::thread> threads;
    for (int r = 0; r < D; ++r)
      threads.emplace_back([&, r] {
        try {
          SPECMOE_CUDA_TRY(cudaSetDevice(r % devices));
          body(r);
        } catch (...) {
          errors[static_cast<std::size_t>(r)] = std::current_exception();
        }
      });
    for (auto& t : threads) t.join();
    return errors;
  }
};

ep_buffer_options shuffle_buffers(moe_config const& cfg, std::int64_t max_tokens) {
  ep_buffer_options o;
  o.max_tokens = max_tokens;
  o.hidden = cfg.hidden_size;
  o.top_k = cfg.top_k;
  o.token_shuffle = true;
  return o;
}

std::vector<tp_result> run_tp(tp_run const& g, moe_weights<bf16> const& host) {
  int const D = g.cfg.num_ranks;
  auto const placement = contiguous_blocks{}.place(g.cfg, 0);
  std::vector<tp_result> results(static_cast<std::size_t>(D));
  rank_group ranks(D, g.backend);
  auto const T = g.tokens;
  auto const H = g.cfg.hidden_size, k = g.cfg.top_k;
  auto body = [&](int r) {
    auto& res = results[static_cast<std::size_t>(r)];
    rank_weights w(g.cfg, host, placement.local_experts(r));
    cudaStream_t const stream = ranks.streams[static_cast<std::size_t>(r)];
    auto run = [&](auto comm, auto predictor, auto place) {
      using C = decltype(comm);
      tp_layer<decltype(predictor), decltype(place), C> layer(
          g.cfg, w.views, {.predictor = predictor, .grouping = explicit_placement(placement), .comm = comm},
          {.max_tokens = g.max_tokens});
      dev_buf<bf16> partial(g.partial[static_cast<std::size_t>(r)]), out(static_cast<std::size_t>(T * H), 0xff);
      std::unique_ptr<dev_buf<std::int32_t>> gids, pred, tok;
      std::unique_ptr<dev_buf<float>> gw, conf;
      cuda_tp_batch b{matrix_view<bf16 const>(partial.p, T, H)};
      if (g.given) {
        gids = std::make_unique<dev_buf<std::int32_t>>(g.given->topk_ids);
        gw = std::make_unique<dev_buf<float>>(g.given->topk_weights);
        b.routing = routing_view{std::span<std::int32_t const>(gids->p, gids->n), std::span<float const>(gw->p, gw->n), T, k};
      }
      if (g.how == guesses::engine) {
        pred = std::make_unique<dev_buf<std::int32_t>>(std::vector<std::int32_t>(g.predicted.begin(), g.predicted.end()));
        b.predicted_rank = pred->p;
        if (!g.confidence.empty()) {
          conf = std::make_unique<dev_buf<float>>(g.confidence);
          b.predicted_confidence = conf->p;
        }
      }
      if (!g.token_ids.empty()) {
        tok = std::make_unique<dev_buf<std::int32_t>>(g.token_ids);
        b.token_ids = tok->p;
      }
      matrix_view<bf16> const out_view(out.p, T, H);
      int token = r, tokens[kernels::ep_max_ranks];
      layer.comm().allgather(&token, sizeof token, tokens);
      std::exception_ptr failed;
      try {
        if (g.forwards(r) && g.graph_replays > 0) {
          cudaGraph_t graph;
          cudaGraphExec_t exec;
          SPECMOE_CUDA_TRY(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
          layer.forward_tp_async(b, out_view, stream);
          SPECMOE_CUDA_TRY(cudaStreamEndCapture(stream, &graph));
          SPECMOE_CUDA_TRY(cudaGraphInstantiate(&exec, graph, 0));
          for (int i = 0; i < g.graph_replays; ++i) {
            SPECMOE_CUDA_TRY(cudaMemsetAsync(out.p, 0xff, out.n * sizeof(bf16), stream));
            SPECMOE_CUDA_TRY(cudaGraphLaunch(exec, stream));
          }
          layer.check(stream);
          cudaGraphExecDestroy(exec);
          cudaGraphDestroy(graph);
        } else if (g.forwards(r)) {
          // two forwards on the same buffers (the epochs advance), then the checks
          layer.forward_tp_async(b, out_view, stream);
          SPECMOE_CUDA_TRY(cudaMemsetAsync(out.p, 0xff, out.n * sizeof(bf16), stream));
          layer.forward_tp_async(b, out_view, stream);
          layer.check(stream);
        }
      } catch (...) {
        failed = std::current_exception();
      }
      res.out = out.host();
      res.ranks = layer.token_ranks(stream);
      res.sent = layer.sent_rows(stream);
      layer.comm().allgather(&token, sizeof token, tokens);  // nobody frees what a peer may still write
      if (failed) std::rethrow_exception(failed);
    };
    ranks.with_comm(r, shuffle_buffers(g.cfg, g.max_tokens), g.timeout, [&](auto comm) {
      if (g.how == guesses::table)
        run(comm, device_token_affinity(*g.table), tp_balanced_shuffle{});
      else if (g.how == guesses::engine)
        run(comm, no_prediction{}, tp_balanced_shuffle{});
      else
        run(comm, no_prediction{}, stay{});
    });
  };
  auto const errors = ranks.run(body);
  for (int r = 0; r < D; ++r)
    if (errors[static_cast<std::size_t>(r)]) results[static_cast<std::size_t>(r)].error = errors[static_cast<std::size_t>(r)];
  return results;
}

// The reduced input every rank sees: partials summed in fp32 by ascending rank, rounded once.
std::vector<bf16> reduced(tp_run const& g) {
  std::vector<bf16> x(g.partial[0].size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    float acc = 0.0f;
    for (auto const& p : g.partial) acc += static_cast<float>(p[i]);
    x[i] = bf16(acc);
  }
  return x;
}

void require_matches_reference(tp_run const& g, moe_weights<bf16> const& host, std::vector<tp_result> const& got) {
  auto const H = g.cfg.hidden_size;
  auto const x = reduced(g);
  std::vector<bf16> want(x.size());
  dense_reference<bf16>(g.cfg, host, matrix_view<bf16 const>(x.data(), g.tokens, H), matrix_view<bf16>(want.data(), g.tokens, H),
                        g.given->view());
  // every rank's error, not only the first failing one's: a peer's report names the rank, the
  // rank's own names the cause
  std::string all_errors;
  for (std::size_t r = 0; r < got.size(); ++r)
    if (got[r].error) all_errors += "\n  rank " + std::to_string(r) + ": " + error_text(got[r].error);
  INFO("errors:" << (all_errors.empty() ? std::string(" none") : all_errors));
  for (std::size_t r = 0; r < got.size(); ++r) {
    INFO("rank " << r << ": " << error_text(got[r].error));
    REQUIRE(!got[r].error);
    test::require_close(got[r].out, want, g.tokens, H);
  }
}

moe_config tp_config(int D, bool grouped) {
  moe_config c{.hidden_size = 256, .ffn_size = 128, .num_experts = 32, .top_k = 4};
  if (grouped) {
    c.num_experts = 64;
    c.top_k = 8;
    c.gate = {.kind = gate_kind::sigmoid_grouped_topk, .renormalize = true, .num_groups = 8, .topk_groups = 4,
              .routed_scaling_factor = 2.5f, .has_score_bias = true};
    c.num_shared_experts = 1;
    c.shared_ffn_size = 64;
  }
  c.num_ranks = D;
  return c;
}

tp_run make_run(moe_config const& cfg, std::int64_t T, std::uint64_t seed) {
  tp_run g{cfg, T};
  for (int r = 0; r < cfg.num_ranks; ++r)
    g.partial.push_back(synthetic::random_activations<bf16>(T, cfg.hidden_size, seed * 31 + static_cast<std::uint64_t>(r)));
  return g;
}

// Routing whose token t takes experts only from rank home(t)'s block (contiguous placement).
routing routing_on_ranks(moe_config const& cfg, std::vector<int> const& home, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  auto const T = static_cast<std::int64_t>(home.size());
  int const per = cfg.num_experts / cfg.num_ranks, k = cfg.top_k;
  routing out(T, k);
  for (std::int64_t t = 0; t < T; ++t) {
    std::vector<int> pool(static_cast<std::size_t>(per));
    std::iota(pool.begin(), pool.end(), home[static_cast<std::size_t>(t)] * per);
    std::shuffle(pool.begin(), pool.end(), rng);
    for (int j = 0; j < k; ++j) {
      out.topk_ids[static_cast<std::size_t>(t * k + j)] = pool[static_cast<std::size_t>(j % per)];
      out.topk_weights[static_cast<std::size_t>(t * k + j)] = std::uniform_real_distribution<float>(0.05f, 1.0f)(rng);
    }
  }
  return out;
}

routing random_routing(moe_config const& cfg, std::int64_t T, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  routing out(T, cfg.top_k);
  std::vector<int> all(static_cast<std::size_t>(cfg.num_experts));
  std::iota(all.begin(), all.end(), 0);
  for (std::int64_t t = 0; t < T; ++t) {
    std::shuffle(all.begin(), all.end(), rng);
    for (int j = 0; j < cfg.top_k; ++j) {
      out.topk_ids[static_cast<std::size_t>(t * cfg.top_k + j)] = all[static_cast<std::size_t>(j)];
      out.topk_weights[static_cast<std::size_t>(t * cfg.top_k + j)] = std::uniform_real_distribution<float>(0.05f, 1.0f)(rng);
    }
  }
  return out;
}

std::int64_t rows_crossing(std::vector<tp_result> const& got) {
  std::int64_t n = 0;
  for (std::size_t r = 0; r < got.size(); ++r)
    for (std::size_t d = 0; d < got[r].sent.size(); ++d)
      if (d != r) n += got[r].sent[d];
  return n;
}

}  // namespace

TEST_CASE("forward_tp equals the reference on every rank, for every guess; the plan matches the host rule",
          "[comm][tp][cuda]") {
  for (int D : {1, 2, 4}) {
    for (std::int64_t T : {1, 7, 64, 203}) {
      auto const cfg = tp_config(D, T == 64);
      INFO("ranks " << D << " tokens " << T << " " << cfg);
      synthetic::random_layer<bf16> host(cfg, static_cast<std::uint64_t>(D * 100 + T));
      std::mt19937_64 rng(static_cast<std::uint64_t>(D * 7 + T));
      std::vector<int> home(static_cast<std::size_t>(T));
      for (auto& h : home) h = static_cast<int>(rng() % static_cast<unsigned>(D));
      for (int variant = 0; variant < 5; ++variant) {
        auto g = make_run(cfg, T, static_cast<std::uint64_t>(variant + 1));
        g.max_tokens = std::max<std::int64_t>(128, tp_shard_rows(T, D));
        g.given = variant == 4 ? random_routing(cfg, T, 3) : routing_on_ranks(cfg, home, 3);
        std::vector<int> guess(static_cast<std::size_t>(T), -1);
        std::vector<float> conf;
        if (variant == 1) {  // oracle: the rank holding every expert of the token
          g.how = guesses::engine;
          guess = home;
        } else if (variant == 2) {  // always wrong, with confidences
          g.how = guesses::engine;
          for (std::int64_t t = 0; t < T; ++t) {
            guess[static_cast<std::size_t>(t)] = (home[static_cast<std::size_t>(t)] + 1) % D;
            conf.push_back(std::uniform_real_distribution<float>(0.0f, 1.0f)(rng));
          }
        } else if (variant == 3 || variant == 4) {  // a plan's token table (random ranks and confidences)
          g.how = guesses::table;
          grouping::plan_layer L;
          for (std::int32_t id = 0; id < 50; id += 2) {
            L.token_ids.push_back(id);
            L.token_rank.push_back(static_cast<int>(rng() % static_cast<unsigned>(D)));
            L.token_confidence.push_back(std::uniform_real_distribution<float>(0.0f, 1.0f)(rng));
          }
          for (std::int64_t t = 0; t < T; ++t) {
            auto const id = static_cast<std::int32_t>(rng() % 60);  // ids 50..59 and odd ids: unknown
            g.token_ids.push_back(id);
            auto const it = std::lower_bound(L.token_ids.begin(), L.token_ids.end(), id);
            bool const known = it != L.token_ids.end() && *it == id;
            auto const i = static_cast<std::size_t>(it - L.token_ids.begin());
            guess[static_cast<std::size_t>(t)] = known ? L.token_rank[i] : -1;
            conf.push_back(known ? L.token_confidence[i] : 0.0f);
          }
          g.table = L;
        }
        g.predicted = guess;
        g.confidence = conf;
        INFO("variant " << variant);
        auto const got = run_tp(g, host.weights());
        require_matches_reference(g, host.weights(), got);
        auto const want = plan_tp_shuffle(g.how == guesses::none ? std::span<int const>{} : std::span<int const>(guess),
                                          conf, T, D);
        for (auto const& r : got) REQUIRE(r.ranks == want.rank);
      }
    }
  }
}

TEST_CASE("forward_tp: oracle guesses keep every row home, the plain split does not", "[comm][tp][cuda]") {
  int const D = 4;
  std::int64_t const T = 96;
  auto const cfg = tp_config(D, false);
  synthetic::random_layer<bf16> host(cfg, 77);
  std::vector<int> home(static_cast<std::size_t>(T));  // T / D tokens per rank, scattered over the batch
  std::iota(home.begin(), home.end(), 0);
  std::shuffle(home.begin(), home.end(), std::mt19937_64(3));
  for (auto& h : home) h %= D;
  auto g = make_run(cfg, T, 9);
  g.given = routing_on_ranks(cfg, home, 4);
  auto const plain = run_tp(g, host.weights());
  require_matches_reference(g, host.weights(), plain);
  g.how = guesses::engine;
  g.predicted = home;
  auto const shuffled = run_tp(g, host.weights());
  require_matches_reference(g, host.weights(), shuffled);
  CHECK(rows_crossing(shuffled) == 0);
  CHECK(rows_crossing(plain) > T / 2);
  for (int r = 0; r < D; ++r) CHECK(shuffled[static_cast<std::size_t>(r)].sent[static_cast<std::size_t>(r)] == T / D);
}

TEST_CASE("forward_tp with the gate: shuffled and plain blocks agree", "[comm][tp][cuda]") {
  int const D = 2;
  auto const cfg = tp_config(D, true);
  synthetic::random_layer<bf16> host(cfg, 5);
  auto g = make_run(cfg, 50, 12);
  auto const plain = run_tp(g, host.weights());
  g.how = guesses::engine;
  g.predicted.assign(50, 1);  // everyone asks for rank 1: half of them are moved
  auto const shuffled = run_tp(g, host.weights());
  for (int r = 0; r < D; ++r) {
    INFO(error_text(plain[static_cast<std::size_t>(r)].error) << " / " << error_text(shuffled[static_cast<std::size_t>(r)].error));
    REQUIRE(!plain[static_cast<std::size_t>(r)].error);
    REQUIRE(!shuffled[static_cast<std::size_t>(r)].error);
    test::require_close(shuffled[static_cast<std::size_t>(r)].out, plain[0].out, 50, cfg.hidden_size);
  }
  CHECK(shuffled[0].ranks != plain[0].ranks);
}

TEST_CASE("forward_tp: graph replays stay in step", "[comm][tp][cuda][graph]") {
  auto const cfg = tp_config(2, false);
  synthetic::random_layer<bf16> host(cfg, 15);
  auto g = make_run(cfg, 40, 2);
  g.given = random_routing(cfg, 40, 8);
  g.how = guesses::engine;
  g.predicted.assign(40, 0);
  g.graph_replays = 3;
  require_matches_reference(g, host.weights(), run_tp(g, host.weights()));
}

TEST_CASE("forward_tp: errors reach every rank, outputs stay untouched", "[comm][tp][cuda][errors]") {
  auto const cfg = tp_config(2, false);
  synthetic::random_layer<bf16> host(cfg, 3);
  SECTION("an expert id out of range: its shard's rank names the token, the other rank refuses too") {
    auto g = make_run(cfg, 20, 4);
    g.given = random_routing(cfg, 20, 5);
    g.given->topk_ids[17 * 4 + 2] = 99;  // token 17: in rank 1's contiguous shard
    auto const got = run_tp(g, host.weights());
    INFO(error_text(got[1].error));
    REQUIRE(error_code(got[1].error) == errc::expert_out_of_range);
    REQUIRE(error_text(got[1].error).find("token 17") != std::string::npos);
    INFO(error_text(got[0].error));
    REQUIRE(error_code(got[0].error) == errc::invalid_argument);
    REQUIRE(error_text(got[0].error).find("rank 1 flagged bad input") != std::string::npos);
    for (auto const& r : got)
      REQUIRE(std::all_of(r.out.begin(), r.out.end(), [](bf16 v) { return v.bits == 0xffff; }));
  }
  SECTION("a rank that never calls forward_tp: the peer times out") {
    auto g = make_run(cfg, 20, 6);
    g.given = random_routing(cfg, 20, 7);
    g.timeout = std::chrono::milliseconds(300);
    g.forwards = [](int r) { return r == 0; };
    auto const got = run_tp(g, host.weights());
    INFO(error_text(got[0].error));
    REQUIRE(error_code(got[0].error) == errc::timeout);
    REQUIRE(error_text(got[0].error).find("shuffled rows") != std::string::npos);
  }
  SECTION("too many tokens for the buffers, and a backend without shuffle buffers, are refused before any work") {
    auto g = make_run(cfg, 300, 8);  // shards of 150 > max_tokens 128
    g.given = random_routing(cfg, 300, 9);
    auto const got = run_tp(g, host.weights());
    for (auto const& r : got) {
      INFO(error_text(r.error));
      REQUIRE(error_code(r.error) == errc::invalid_argument);
      REQUIRE(error_text(r.error).find("max_tokens") != std::string::npos);
    }
  }
}

namespace {

// Three MoE layers in order on every rank, sharing one backend and one device_rank_history, each
// guessing with device_history_affinity<UseTokens> (layer l of a plan); the same batch through all.
struct layered_run {
  moe_config cfg;  // layer l runs with cfg.layer = l
  std::int64_t tokens = 0;
  std::vector<std::vector<bf16>> partial;  // [D][T * H]
  std::vector<routing> given;              // [layers] routing of all T tokens at each layer
  std::vector<std::int32_t> token_ids;     // [T]
  std::shared_ptr<grouping::speculative_plan const> plan;
  backend_kind backend = backend_kind::nvlink;
  std::int64_t max_tokens = 128;
};

struct layered_result {
  std::vector<std::vector<bf16>> out;    // [layers][T * H]
  std::vector<std::vector<int>> ranks;   // [layers][T] each layer's shuffle plan
};

template <bool UseTokens>
std::vector<layered_result> run_tp_layers(layered_run const& g, moe_weights<bf16> const& host,
                                          std::vector<std::exception_ptr>& errors) {
  int const D = g.cfg.num_ranks, layers = g.plan->layers;
  auto const placement = contiguous_blocks{}.place(g.cfg, 0);
  auto const T = g.tokens;
  auto const H = g.cfg.hidden_size, k = g.cfg.top_k;
  std::vector<layered_result> results(static_cast<std::size_t>(D));
  rank_group ranks(D, g.backend);
  errors = ranks.run([&](int r) {
    auto& res = results[static_cast<std::size_t>(r)];
    rank_weights w(g.cfg, host, placement.local_experts(r));
    cudaStream_t const stream = ranks.streams[static_cast<std::size_t>(r)];
    auto history = std::make_shared<device_rank_history>(layers, T);
    ranks.with_comm(r, shuffle_buffers(g.cfg, g.max_tokens), std::chrono::milliseconds(5000), [&](auto comm) {
      using predictor = device_history_affinity<UseTokens>;
      using layer_type = tp_layer<predictor, tp_balanced_shuffle, decltype(comm)>;
      std::vector<std::unique_ptr<layer_type>> stack;
      for (int l = 0; l < layers; ++l) {
        auto c = g.cfg;
        c.layer = l;
        stack.push_back(std::make_unique<layer_type>(
            c, w.views,
            typename layer_type::policies_type{.predictor = predictor(g.plan, l, history),
                                               .grouping = explicit_placement(placement),
                                               .comm = comm},
            cuda_ep_layer_options{.max_tokens = g.max_tokens}));
      }
      dev_buf<bf16> partial(g.partial[static_cast<std::size_t>(r)]);
      dev_buf<std::int32_t> tok(g.token_ids);
      std::vector<std::unique_ptr<dev_buf<std::int32_t>>> ids;
      std::vector<std::unique_ptr<dev_buf<float>>> weights;
      std::vector<std::unique_ptr<dev_buf<bf16>>> outs;
      for (int l = 0; l < layers; ++l) {
        ids.push_back(std::make_unique<dev_buf<std::int32_t>>(g.given[static_cast<std::size_t>(l)].topk_ids));
        weights.push_back(std::make_unique<dev_buf<float>>(g.given[static_cast<std::size_t>(l)].topk_weights));
        outs.push_back(std::make_unique<dev_buf<bf16>>(static_cast<std::size_t>(T * H), 0xff));
      }
      int token = r, tokens[kernels::ep_max_ranks];
      comm.allgather(&token, sizeof token, tokens);
      std::exception_ptr failed;
      try {
        for (int pass = 0; pass < 2; ++pass) {  // the second pass reads the same history again
          for (int l = 0; l < layers; ++l) {
            auto const& id = *ids[static_cast<std::size_t>(l)];
            auto const& wt = *weights[static_cast<std::size_t>(l)];
            cuda_tp_batch b{matrix_view<bf16 const>(partial.p, T, H), tok.p};
            b.routing = routing_view{std::span<std::int32_t const>(id.p, id.n), std::span<float const>(wt.p, wt.n), T, k};
            SPECMOE_CUDA_TRY(cudaMemsetAsync(outs[static_cast<std::size_t>(l)]->p, 0xff, outs[static_cast<std::size_t>(l)]->n * 2,
                                             stream));
            stack[static_cast<std::size_t>(l)]->forward_tp_async(b, matrix_view<bf16>(outs[static_cast<std::size_t>(l)]->p, T, H),
                                                                 stream);
          }
        }
        for (auto& layer : stack) layer->check(stream);
      } catch (...) {
        failed = std::current_exception();
      }
      for (int l = 0; l < layers; ++l) {
        res.out.push_back(outs[static_cast<std::size_t>(l)]->host());
        res.ranks.push_back(stack[static_cast<std::size_t>(l)]->token_ranks(stream));
      }
      comm.allgather(&token, sizeof token, tokens);  // nobody frees what a peer may still write
      if (failed) std::rethrow_exception(failed);
    });
  });
  return results;
}

// The host predictors' plans over the same layers: each layer's shuffle plan, and (with_history =
// false) the same without the inter-layer guesses, so the test sees that the history mattered.
template <bool UseTokens>
std::vector<std::vector<int>> host_layer_plans(layered_run const& g, bool with_history) {
  int const D = g.cfg.num_ranks;
  auto const T = g.tokens;
  auto const placement = contiguous_blocks{}.place(g.cfg, 0);
  history_affinity_prediction<UseTokens> predictor(g.plan, std::make_shared<rank_history>());
  std::vector<std::int64_t> const ids(g.token_ids.begin(), g.token_ids.end());
  std::vector<int> const home(static_cast<std::size_t>(T), 0);
  std::vector<std::vector<int>> plans;
  for (int l = 0; l < g.plan->layers; ++l) {
    auto c = g.cfg;
    c.layer = l;
    prediction p;
    predictor.predict(prediction_request{c, T, home, ids, matrix_view<float const>{}, placement}, p);
    plans.push_back(plan_tp_shuffle(p.rank, p.confidence, T, D).rank);
    if (with_history)
      predictor.observe(routing_observation{c, home, home, ids, g.given[static_cast<std::size_t>(l)].view(), placement, &p});
  }
  return plans;
}

layered_run make_layered_run(int D, std::int64_t T, backend_kind backend, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  auto const cfg = tp_config(D, false);
  auto const base = make_run(cfg, T, seed);
  layered_run g{cfg, T, base.partial};
  g.backend = backend;
  g.max_tokens = std::max<std::int64_t>(128, tp_shard_rows(T, D));
  auto plan = std::make_shared<grouping::speculative_plan>();
  plan->layers = 3;
  plan->experts = cfg.num_experts;
  plan->ranks = D;
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  for (int l = 0; l < plan->layers; ++l) {
    grouping::plan_layer L;
    for (int e = 0; e < cfg.num_experts; ++e) L.expert_rank.push_back(e / (cfg.num_experts / D));
    for (std::int32_t id = 0; id < 50; id += 2) {
      L.token_ids.push_back(id);
      L.token_rank.push_back(static_cast<int>(rng() % static_cast<unsigned>(D)));
      L.token_confidence.push_back(id % 10 == 0 ? 0.0f : unit(rng));
    }
    if (l >= 2) {  // A: some 2-grams unseen (-1), some more confident than any T
      for (int ab = 0; ab < D * D; ++ab) {
        bool const seen = rng() % 5 != 0;
        L.ngram_rank.push_back(seen ? static_cast<int>(rng() % static_cast<unsigned>(D)) : -1);
        L.ngram_confidence.push_back(seen ? 0.3f + 0.7f * unit(rng) : 0.0f);
      }
    }
    plan->per_layer.push_back(std::move(L));
    g.given.push_back(random_routing(cfg, T, seed * 13 + static_cast<std::uint64_t>(l)));
  }
  for (std::int64_t t = 0; t < T; ++t) g.token_ids.push_back(static_cast<std::int32_t>(rng() % 60));
  g.plan = plan;
  return g;
}

template <bool UseTokens>
void require_layered_matches_host(layered_run const& g) {
  synthetic::random_layer<bf16> host(g.cfg, 23);
  std::vector<std::exception_ptr> errors;
  auto const got = run_tp_layers<UseTokens>(g, host.weights(), errors);
  auto const want = host_layer_plans<UseTokens>(g, true);
  auto const without = host_layer_plans<UseTokens>(g, false);
  REQUIRE(want[2] != without[2]);  // the 2-gram moved tokens at layer 2: a lost history would show
  for (int l = 0; l < g.plan->layers; ++l) {
    INFO("layer " << l);
    tp_run one{g.cfg, g.tokens, g.partial, g.given[static_cast<std::size_t>(l)]};
    std::vector<tp_result> per_rank;
    for (std::size_t r = 0; r < got.size(); ++r) {
      INFO("rank " << r << ": " << error_text(errors[r]));
      REQUIRE(!errors[r]);
      REQUIRE(got[r].ranks[static_cast<std::size_t>(l)] == want[static_cast<std::size_t>(l)]);
      per_rank.push_back({got[r].out[static_cast<std::size_t>(l)], {}, {}, nullptr});
    }
    require_matches_reference(one, host.weights(), per_rank);
  }
}

}  // namespace

TEST_CASE("forward_tp: the inter-layer predictors on the device guess as the host ones, layer after layer",
          "[comm][tp][cuda][affinity]") {
  for (int D : {2, 4}) {
    for (std::int64_t T : {9, 203}) {
      INFO("ranks " << D << " tokens " << T);
      auto const g = make_layered_run(D, T, backend_kind::nvlink, static_cast<std::uint64_t>(D * 1000 + T));
      require_layered_matches_host<false>(g);  // A alone
      require_layered_matches_host<true>(g);   // T and A, the more confident
    }
  }
}

TEST_CASE("forward_tp: inter-layer predictor misuse is refused before any work", "[comm][tp][cuda][affinity][errors]") {
  auto const g = make_layered_run(2, 20, backend_kind::nvlink, 5);
  auto history = std::make_shared<device_rank_history>(3, 10);  // too few tokens a layer
  auto capture = [](auto&& f) -> std::exception_ptr {
    try {
      f();
    } catch (...) {
      return std::current_exception();
    }
    return nullptr;
  };
  device_layer_affinity p(g.plan, 2, history);
  auto const err = capture([&] { (void)p.served_ranks_target(20); });
  REQUIRE(error_code(err) == errc::invalid_argument);
  REQUIRE(error_text(err).find("holds 10 tokens a layer, the batch has 20") != std::string::npos);
  auto const bad_layer = capture([&] { device_layer_affinity(g.plan, 3, history); });
  REQUIRE(error_code(bad_layer) == errc::invalid_argument);
  REQUIRE(error_text(bad_layer).find("layer 3 is outside") != std::string::npos);
  REQUIRE(history->at(2, 20) == nullptr);  // nothing recorded by a refused call
}

#if SPECMOE_HAS_NCCL
TEST_CASE("forward_tp (nccl_alltoallv) equals the reference", "[comm][tp][cuda][nccl]") {
  int const D = std::min(std::max(device_count(), 1), 4);  // NCCL: one rank per GPU
  auto const cfg = tp_config(D, true);
  synthetic::random_layer<bf16> host(cfg, 41);
  auto g = make_run(cfg, 77, 3);
  g.given = random_routing(cfg, 77, 4);
  g.backend = backend_kind::nccl;
  g.how = guesses::engine;
  for (std::int64_t t = 0; t < 77; ++t) g.predicted.push_back(static_cast<int>(t % 3) % D);
  require_matches_reference(g, host.weights(), run_tp(g, host.weights()));
  if (D >= 2) require_layered_matches_host<true>(make_layered_run(D, 77, backend_kind::nccl, 8));  // tags through NCCL
}
#endif
