// tests/offload/offload_gpu.cu: the Catch2-free side of the offload runtime tests (see the header).
#include "offload_gpu.hpp"

#include <specmoe/layer/cuda_moe_layer.cuh>
#include <specmoe/offload/host_expert_store.cuh>
#include <specmoe/offload/offloaded_moe_stack.cuh>
#include <specmoe/offload/prefetcher.cuh>
#include <specmoe/synthetic/random_layer.hpp>

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <stdexcept>
#include <thread>
#include <type_traits>

namespace offload_test {

using namespace specmoe;
namespace so = specmoe::offload;

namespace {

#define OT_CUDA(call)                                                                              \
  do {                                                                                             \
    cudaError_t const ot_err_ = (call);                                                            \
    if (ot_err_ != cudaSuccess) throw std::runtime_error(std::string(#call) + ": " + cudaGetErrorString(ot_err_)); \
  } while (0)

template <class T>
struct dbuf {
  T* p = nullptr;
  std::size_t n = 0;
  explicit dbuf(std::size_t count) : n(count) { OT_CUDA(cudaMalloc(&p, std::max<std::size_t>(n, 1) * sizeof(T))); }
  dbuf(dbuf const&) = delete;
  dbuf& operator=(dbuf const&) = delete;
  ~dbuf() { cudaFree(p); }
  // (the blocking copy and memset run on the legacy stream, which the tests' non-blocking streams do
  // not wait for: synchronise before anything reads the buffer)
  void upload(std::vector<T> const& h) {
    OT_CUDA(cudaMemcpy(p, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
    OT_CUDA(cudaDeviceSynchronize());
  }
  std::vector<T> download() const {
    std::vector<T> h(n);
    OT_CUDA(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
  void poison() {
    OT_CUDA(cudaMemset(p, 0xff, n * sizeof(T)));
    OT_CUDA(cudaDeviceSynchronize());
  }
};

struct stream_holder {
  cudaStream_t s = nullptr;
  stream_holder() { OT_CUDA(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)); }
  stream_holder(stream_holder const&) = delete;
  stream_holder& operator=(stream_holder const&) = delete;
  ~stream_holder() { cudaStreamDestroy(s); }
};

std::vector<std::byte> download_bytes(void const* p, std::size_t bytes) {
  std::vector<std::byte> h(bytes);
  OT_CUDA(cudaMemcpy(h.data(), p, bytes, cudaMemcpyDeviceToHost));
  return h;
}

std::string key_name(so::expert_key k) { return "layer " + std::to_string(k.layer) + " expert " + std::to_string(k.expert); }

/// Checks, after everything settled: every resident expert's slot holds its store block byte for
/// byte, the residency table points into exactly those slots (null elsewhere), nothing is pinned
/// and occupancy is within capacity.
template <class Policy>
void check_settled(so::prefetcher<Policy> const& pf, std::vector<std::string>& failures, std::string const& when) {
  auto const& store = pf.store();
  auto const& slots = pf.slots();
  auto const& lay = store.layout();
  pf.inspect([&](so::expert_cache<Policy> const& cache) {
    if (cache.occupied() > cache.capacity()) failures.push_back(when + ": occupied " + std::to_string(cache.occupied()) + " > capacity");
    for (int s = 0; s < cache.capacity(); ++s) {
      if (cache.slot(s).pins != 0) failures.push_back(when + ": slot " + std::to_string(s) + " still pinned");
    }
    for (int l = 0; l < lay.layers; ++l) {
      std::vector<std::uintptr_t> tab[3];
      __nv_bfloat16 const* const* tables[3] = {slots.gate_table(l), slots.up_table(l), slots.down_table(l)};
      std::size_t const offsets[3] = {lay.gate_offset(), lay.up_offset(), lay.down_offset()};
      for (int m = 0; m < 3; ++m) {
        tab[m].resize(static_cast<std::size_t>(lay.experts));
        OT_CUDA(cudaMemcpy(tab[m].data(), tables[m], tab[m].size() * sizeof(void*), cudaMemcpyDeviceToHost));
      }
      for (int e = 0; e < lay.experts; ++e) {
        so::expert_key const k{l, e};
        int const s = cache.slot_of(k);
        for (int m = 0; m < 3; ++m) {
          std::uintptr_t const want = s < 0 ? 0 : reinterpret_cast<std::uintptr_t>(slots.slot_ptr(s) + offsets[m]);
          if (tab[m][static_cast<std::size_t>(e)] != want) {
            failures.push_back(when + ": residency table of " + key_name(k) + " matrix " + std::to_string(m) +
                               (s < 0 ? " is not null though the expert is not resident" : " does not point into its slot"));
            break;
          }
        }
        if (s >= 0) {
          auto const got = download_bytes(slots.slot_ptr(s), store.expert_bytes());
          if (std::memcmp(got.data(), store.expert(l, e), store.expert_bytes()) != 0) {
            failures.push_back(when + ": slot " + std::to_string(s) + " does not hold the bytes of " + key_name(k));
          }
        }
      }
    }
    return 0;
  });
}

template <class Policy>
void add_counters(report& r, so::prefetcher<Policy> const& pf) {
  auto const c = pf.counters();
  r.speculative_copies = c.speculative_copies;
  r.demand_copies = c.demand_copies;
  r.copy_operations = c.copy_operations;
  r.copy_calls = c.copy_calls;
  r.stolen_jobs = c.stolen_jobs;
  r.hits = c.ready_hits;
  r.acquired = c.acquired;
  r.evictions = pf.cache_counters().evictions;
}

std::vector<bf16> random_bf16(std::size_t n, std::mt19937_64& rng) {
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  std::vector<bf16> v(n);
  for (auto& x : v) x = bf16(d(rng));
  return v;
}

// ---------------------------------------------------------------------------------------------
// models for the stack tests: host weights, their device copies and the all-resident layers
// ---------------------------------------------------------------------------------------------

struct device_layer {
  std::vector<std::unique_ptr<dbuf<bf16>>> buffers;
  moe_weights<bf16> full;      // everything on the device (the reference layer's)
  moe_weights<bf16> resident;  // router + shared only (the offloaded layer's)
};

device_layer upload_layer(moe_weights<bf16> const& host) {
  device_layer d;
  auto up = [&](bf16 const* data, std::size_t count) -> bf16 const* {
    if (count == 0) return nullptr;
    d.buffers.push_back(std::make_unique<dbuf<bf16>>(count));
    d.buffers.back()->upload(std::vector<bf16>(data, data + count));
    return d.buffers.back()->p;
  };
  auto tensor = [&](expert_tensor<bf16>& t) {
    t.data = up(t.data, static_cast<std::size_t>(t.count * t.rows * t.cols));  // dense host tensors
  };
  d.full = host;
  d.full.router.weight.data = up(host.router.weight.data, static_cast<std::size_t>(host.router.weight.rows * host.router.weight.cols));
  tensor(d.full.experts.gate);
  tensor(d.full.experts.up);
  tensor(d.full.experts.down);
  tensor(d.full.shared.gate);
  tensor(d.full.shared.up);
  tensor(d.full.shared.down);
  d.resident = d.full;
  d.resident.experts = {};
  return d;
}

struct model {
  moe_config cfg;
  int layers = 0;
  std::vector<std::unique_ptr<synthetic::random_layer<bf16>>> host;
  std::vector<device_layer> device;
  std::vector<moe_weights<bf16>> resident_parts;
  std::unique_ptr<so::host_expert_store> store;
  std::vector<std::unique_ptr<moe_layer<cuda_space>>> reference;
};

moe_config mixtral_like() {
  return {.hidden_size = 256, .ffn_size = 512, .num_experts = 8, .top_k = 2, .gate = {}};
}
moe_config deepseek_like() {
  return {.hidden_size = 256,
          .ffn_size = 128,
          .num_experts = 64,
          .top_k = 6,
          .gate = {.kind = gate_kind::sigmoid_grouped_topk,
                   .renormalize = true,
                   .num_groups = 8,
                   .topk_groups = 4,
                   .routed_scaling_factor = 2.5f,
                   .has_score_bias = true},
          .num_shared_experts = 2,
          .shared_ffn_size = 256};
}

model& get_model(model_kind kind) {
  static std::map<model_kind, std::unique_ptr<model>> models;
  auto& slot = models[kind];
  if (slot) return *slot;
  auto m = std::make_unique<model>();
  m->cfg = kind == model_kind::mixtral_like ? mixtral_like() : deepseek_like();
  m->layers = kind == model_kind::mixtral_like ? 4 : 3;
  m->store = std::make_unique<so::host_expert_store>(so::expert_layout::of(m->cfg, m->layers));
  for (int l = 0; l < m->layers; ++l) {
    auto cfg = m->cfg;
    cfg.layer = l;
    m->host.push_back(std::make_unique<synthetic::random_layer<bf16>>(cfg, 1000 + static_cast<std::uint64_t>(l)));
    auto const w = m->host.back()->weights();
    m->store->load_layer(l, w.experts);
    m->device.push_back(upload_layer(w));
    m->resident_parts.push_back(m->device.back().resident);
    m->reference.push_back(std::make_unique<moe_layer<cuda_space>>(cfg, m->device.back().full, moe_layer<cuda_space>::policies_type{},
                                                                   cuda_layer_options{.max_tokens = 8}));
  }
  slot = std::move(m);
  return *slot;
}

/// Distinct experts of `ids` (-1 skipped), in order of appearance.
std::vector<int> distinct_experts(std::vector<std::int32_t> const& ids) {
  std::vector<int> out;
  for (auto const e : ids)
    if (e >= 0 && std::find(out.begin(), out.end(), e) == out.end()) out.push_back(e);
  return out;
}

std::string first_difference(std::vector<bf16> const& got, std::vector<bf16> const& want, int H) {
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (got[i].bits != want[i].bits) {
      std::ostringstream os;
      os << "token " << i / static_cast<std::size_t>(H) << " column " << i % static_cast<std::size_t>(H) << ": got "
         << static_cast<float>(got[i]) << " (bits " << got[i].bits << "), resident layer " << static_cast<float>(want[i]) << " (bits "
         << want[i].bits << ")";
      return os.str();
    }
  }
  return {};
}

/// Decode steps through an offloaded stack, compared with the resident layers. `racing`: a second
/// thread prefetches random experts all along.
template <class Policy>
report run_stack(model& m, stack_case const& c, int slots, bool racing) {
  report r;
  so::offloaded_stack_options opt;
  opt.max_tokens = 8;
  opt.prefetch.slots = slots;
  so::offloaded_moe_stack<Policy> stack(m.cfg, m.resident_parts, *m.store, opt);
  stream_holder stream;
  int const n = c.tokens, H = m.cfg.hidden_size, k = m.cfg.top_k, E = m.cfg.num_experts, L = m.layers;
  std::mt19937_64 rng(c.seed);
  std::vector<std::unique_ptr<dbuf<bf16>>> xs, refs;
  for (int l = 0; l < L; ++l) {
    xs.push_back(std::make_unique<dbuf<bf16>>(static_cast<std::size_t>(n * H)));
    refs.push_back(std::make_unique<dbuf<bf16>>(static_cast<std::size_t>(n * H)));
  }
  dbuf<bf16> out(static_cast<std::size_t>(n * H));
  dbuf<std::int32_t> ids(static_cast<std::size_t>(n * k));
  dbuf<float> wts(static_cast<std::size_t>(n * k));
  std::vector<std::vector<std::int32_t>> ref_ids(static_cast<std::size_t>(L));

  if constexpr (std::is_same_v<Policy, so::frequency_replacement>) {
    // warm start from distinct random counts: exactly the `slots` most used experts become resident
    std::vector<std::uint64_t> uses(static_cast<std::size_t>(L * E));
    for (std::size_t i = 0; i < uses.size(); ++i) uses[i] = 1 + i;
    std::shuffle(uses.begin(), uses.end(), rng);
    stack.warm_start(uses);
    auto const threshold = uses.size() - static_cast<std::size_t>(std::min<int>(slots, L * E));  // counts above it are the hot ones
    for (int l = 0; l < L; ++l) {
      for (int e = 0; e < E; ++e) {
        bool const hot = uses[static_cast<std::size_t>(l * E + e)] > threshold;
        if (hot != (stack.prefetcher().slot_of({l, e}) >= 0)) {
          r.failures.push_back("warm_start: layer " + std::to_string(l) + " expert " + std::to_string(e) + (hot ? " is hot but not resident" : " is resident but not among the hottest"));
        }
      }
    }
    check_settled(stack.prefetcher(), r.failures, "after warm_start");
  }

  std::atomic<bool> stop{false};
  std::thread racer;
  if (racing) {
    racer = std::thread([&, seed = c.seed * 31 + 7] {
      std::mt19937_64 g(seed);
      std::vector<so::expert_key> keys;
      try {
        while (!stop.load()) {
          keys.clear();
          for (int i = 0; i < 3; ++i) keys.push_back({static_cast<int>(g() % static_cast<unsigned>(L)), static_cast<int>(g() % static_cast<unsigned>(E))});
          stack.prefetcher().prefetch(keys);
          if (g() % 4 == 0) std::this_thread::yield();
        }
      } catch (std::exception const& e) {
        stop = true;
        std::fprintf(stderr, "racing prefetch thread: %s\n", e.what());
      }
    });
  }
  try {
    for (int step = 0; step < c.steps; ++step) {
      for (int l = 0; l < L; ++l) {
        xs[static_cast<std::size_t>(l)]->upload(random_bf16(static_cast<std::size_t>(n * H), rng));
        auto& ref = *refs[static_cast<std::size_t>(l)];
        ref.poison();
        m.reference[static_cast<std::size_t>(l)]->forward(cuda_batch{matrix_view<bf16 const>(xs[static_cast<std::size_t>(l)]->p, n, H)},
                                                          matrix_view<bf16>(ref.p, n, H), stream.s, cuda_routing_output{ids.p, wts.p});
        ref_ids[static_cast<std::size_t>(l)] = ids.download();
      }
      // the draft phase: predictions for every layer before verification
      stack.new_step();
      if (c.predict != prediction::none) {
        for (int l = 0; l < L; ++l) {
          std::vector<int> experts;
          if (c.predict == prediction::right) {
            experts = distinct_experts(ref_ids[static_cast<std::size_t>(l)]);
          } else {
            for (int i = 0; i < n * k; ++i) experts.push_back(static_cast<int>(rng() % static_cast<unsigned>(E)));
          }
          stack.speculate(l, experts);
        }
      }
      // verification
      for (int l = 0; l < L; ++l) {
        out.poison();
        stack.forward_layer(l, matrix_view<bf16 const>(xs[static_cast<std::size_t>(l)]->p, n, H), matrix_view<bf16>(out.p, n, H), stream.s);
        stack.check(l, stream.s);
        ++r.forwards;
        auto const diff = first_difference(out.download(), refs[static_cast<std::size_t>(l)]->download(), H);
        if (!diff.empty()) {
          r.failures.push_back("step " + std::to_string(step) + " layer " + std::to_string(l) + ": offloaded output differs at " + diff);
        }
        stack.prefetcher().inspect([&](auto const& cache) {
          if (cache.occupied() > cache.capacity()) r.failures.push_back("occupied > capacity after a forward");
          return 0;
        });
      }
      if (!racing) {
        stack.prefetcher().drain();
        OT_CUDA(cudaStreamSynchronize(stream.s));
        check_settled(stack.prefetcher(), r.failures, "after step " + std::to_string(step));
      }
      if (r.failures.size() > 20) break;
    }
  } catch (...) {
    stop = true;
    if (racer.joinable()) racer.join();
    throw;
  }
  stop = true;
  if (racer.joinable()) racer.join();
  stack.prefetcher().drain();
  OT_CUDA(cudaStreamSynchronize(stream.s));
  OT_CUDA(cudaDeviceSynchronize());
  check_settled(stack.prefetcher(), r.failures, "at the end");
  add_counters(r, stack.prefetcher());
  return r;
}

// ---------------------------------------------------------------------------------------------
// small stores of random bytes, for the copy and pinning tests
// ---------------------------------------------------------------------------------------------

/// Store blocks filled from random weights; `registered`: caller memory loaded from fused (w13)
/// strided views and pinned with cudaHostRegister. Checks load_layer against the source.
struct byte_store {
  so::expert_layout layout;
  std::unique_ptr<std::byte, decltype(&std::free)> memory{nullptr, &std::free};
  std::unique_ptr<so::host_expert_store> store;

  byte_store(so::expert_layout lay, bool registered, std::uint64_t seed, std::vector<std::string>& failures) : layout(lay) {
    if (registered) {
      std::size_t const bytes = (lay.total_bytes() + 4095) / 4096 * 4096;
      memory.reset(static_cast<std::byte*>(std::aligned_alloc(4096, bytes)));
      if (!memory) throw std::runtime_error("aligned_alloc failed");
      store = std::make_unique<so::host_expert_store>(lay, std::span<std::byte>(memory.get(), bytes));
    } else {
      store = std::make_unique<so::host_expert_store>(lay);
    }
    std::mt19937_64 rng(seed);
    auto const E = lay.experts, H = lay.hidden, F = lay.ffn;
    for (int l = 0; l < lay.layers; ++l) {
      auto const w13 = random_bf16(static_cast<std::size_t>(E) * 2 * F * H, rng);
      auto const w2 = random_bf16(static_cast<std::size_t>(E) * H * F, rng);
      std::vector<bf16> gate(static_cast<std::size_t>(E) * F * H), up(gate.size());
      for (std::size_t e = 0; e < static_cast<std::size_t>(E); ++e) {
        auto const fh = static_cast<std::size_t>(F) * H;
        std::copy_n(w13.begin() + static_cast<std::ptrdiff_t>(e * 2 * fh), fh, gate.begin() + static_cast<std::ptrdiff_t>(e * fh));
        std::copy_n(w13.begin() + static_cast<std::ptrdiff_t>(e * 2 * fh + fh), fh, up.begin() + static_cast<std::ptrdiff_t>(e * fh));
      }
      store->load_layer(l, registered ? ffn_weights<bf16>::fused_gate_up(w13.data(), w2.data(), E, H, F)
                                      : ffn_weights<bf16>::dense(gate.data(), up.data(), w2.data(), E, H, F));
      for (int e = 0; e < E; ++e) {
        auto const fh = static_cast<std::size_t>(F) * H;
        if (std::memcmp(store->gate(l, e).data, gate.data() + static_cast<std::size_t>(e) * fh, fh * 2) != 0 ||
            std::memcmp(store->up(l, e).data, up.data() + static_cast<std::size_t>(e) * fh, fh * 2) != 0 ||
            std::memcmp(store->down(l, e).data, w2.data() + static_cast<std::size_t>(e) * fh, fh * 2) != 0) {
          failures.push_back("load_layer: block of " + key_name({l, e}) + " does not hold the source matrices");
        }
      }
    }
  }
};

__global__ void spin_kernel(long long cycles) {
  long long const start = clock64();
  while (clock64() - start < cycles) {
  }
}

/// sum over 8-byte words w_i of w_i * (2 i + 1), one result per slot (mod 2^64: order-free).
__global__ void checksum_kernel(std::byte const* const* blocks, std::size_t words, unsigned long long* out) {
  auto const* w = reinterpret_cast<unsigned long long const*>(blocks[blockIdx.x]);
  unsigned long long sum = 0;
  for (std::size_t i = threadIdx.x; i < words; i += blockDim.x) sum += w[i] * (2ull * i + 1ull);
  atomicAdd(out + blockIdx.x, sum);
}

unsigned long long host_checksum(std::byte const* block, std::size_t words) {
  unsigned long long sum = 0;
  for (std::size_t i = 0; i < words; ++i) {
    unsigned long long w;
    std::memcpy(&w, block + i * 8, 8);
    sum += w * (2ull * i + 1ull);
  }
  return sum;
}

}  // namespace

bool has_gpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

report prefetch_copies(copy_pattern pattern, bool registered, std::uint64_t seed) {
  report r;
  // hidden 264, ffn 136: the payload (215424 bytes) is not a multiple of 256, so blocks carry padding
  so::expert_layout const lay{2, 8, 264, 136};
  byte_store bs(lay, registered, seed, r.failures);
  so::prefetcher_config cfg;
  cfg.slots = pattern == copy_pattern::evicting ? 4 : 8;
  so::prefetcher<> pf(*bs.store, cfg);
  std::vector<std::vector<so::expert_key>> rounds;
  switch (pattern) {
    case copy_pattern::single: rounds = {{{1, 3}}}; break;
    case copy_pattern::coalesced: rounds = {{{0, 4}, {0, 5}, {0, 6}, {0, 7}}}; break;
    case copy_pattern::batched: rounds = {{{0, 0}, {0, 2}, {1, 5}, {1, 1}}}; break;
    case copy_pattern::evicting:
      rounds = {{{0, 0}, {0, 1}, {0, 2}, {0, 3}}, {{1, 0}, {1, 7}}, {{0, 5}, {1, 2}, {1, 3}}, {{0, 0}, {1, 6}, {1, 4}, {1, 5}}};
      break;
  }
  for (std::size_t i = 0; i < rounds.size(); ++i) {
    pf.prefetch(rounds[i]);
    pf.drain();
    check_settled(pf, r.failures, "after prefetch round " + std::to_string(i));
    for (auto const k : rounds[i]) {
      if (pf.slot_of(k) < 0) r.failures.push_back("round " + std::to_string(i) + ": " + key_name(k) + " is not resident after drain");
    }
  }
  add_counters(r, pf);
  return r;
}

report stack_matches_resident(stack_case const& c) {
  auto& m = get_model(c.model);
  int const total = m.layers * m.cfg.num_experts;
  int const per_forward = std::min(m.cfg.num_experts, c.tokens * m.cfg.top_k);
  int const slots = std::max(per_forward, static_cast<int>(c.cache_fraction * total + 0.5));
  switch (c.policy) {
    case policy_kind::lru: return run_stack<so::lru_replacement>(m, c, slots, false);
    case policy_kind::lfu: return run_stack<so::lfu_replacement>(m, c, slots, false);
    case policy_kind::protect_predicted: return run_stack<so::protect_predicted<>>(m, c, slots, false);
    case policy_kind::frequency_warm: return run_stack<so::frequency_replacement>(m, c, slots, false);
  }
  return {};
}

report stress_racing_prefetches(std::uint64_t seed, int steps) {
  auto& m = get_model(model_kind::mixtral_like);
  stack_case c;
  c.tokens = 3;
  c.steps = steps;
  c.seed = seed;
  c.predict = prediction::wrong;
  // the least the stack accepts (it sizes for max_tokens, not this step's tokens): one layer's worth
  // of the 4 layers' experts, so every step evicts
  int const slots = m.cfg.num_experts;
  return run_stack<so::lru_replacement>(m, c, slots, true);
}

report pinned_slots_are_not_overwritten(std::uint64_t seed) {
  report r;
  so::expert_layout const lay{2, 16, 256, 512};
  byte_store bs(lay, false, seed, r.failures);
  so::prefetcher_config cfg;
  cfg.slots = 4;
  so::prefetcher<> pf(*bs.store, cfg);
  stream_holder compute;
  std::size_t const words = bs.store->expert_bytes() / 8;

  // 1. a slow reader of four acquired experts; their slots are refilled right after the release
  std::vector<so::expert_key> const readers{{0, 0}, {0, 1}, {0, 2}, {0, 3}};
  pf.acquire(readers, compute.s);
  std::vector<std::byte const*> blocks;
  for (auto const k : readers) blocks.push_back(pf.slots().slot_ptr(pf.slot_of(k)));
  dbuf<std::byte const*> d_blocks(blocks.size());
  d_blocks.upload(blocks);
  dbuf<unsigned long long> sums(blocks.size());
  OT_CUDA(cudaMemsetAsync(sums.p, 0, sums.n * 8, compute.s));
  spin_kernel<<<1, 1, 0, compute.s>>>(50'000'000);  // ~25 ms: the refills are queued long before it ends
  checksum_kernel<<<static_cast<unsigned>(blocks.size()), 256, 0, compute.s>>>(d_blocks.p, words, sums.p);
  OT_CUDA(cudaGetLastError());
  pf.release(readers, compute.s);
  std::vector<so::expert_key> others;
  for (int e = 0; e < lay.experts; ++e) others.push_back({1, e});
  pf.prefetch(others);
  pf.drain();
  OT_CUDA(cudaStreamSynchronize(compute.s));
  auto const got = sums.download();
  for (std::size_t i = 0; i < readers.size(); ++i) {
    if (got[i] != host_checksum(bs.store->expert(readers[i].layer, readers[i].expert), words)) {
      r.failures.push_back("the kernel reading " + key_name(readers[i]) + " saw its slot overwritten by a later copy");
    }
  }

  // 2. pinned experts keep their slots while prefetches churn through the others
  std::vector<so::expert_key> const held{{0, 9}, {1, 9}};
  pf.acquire(held, compute.s);
  std::vector<int> held_slots;
  for (auto const k : held) held_slots.push_back(pf.slot_of(k));
  std::mt19937_64 rng(seed);
  for (int round = 0; round < 50; ++round) {
    std::vector<so::expert_key> burst;
    for (int i = 0; i < 4; ++i) burst.push_back({static_cast<int>(rng() % 2), static_cast<int>(rng() % 9)});
    pf.prefetch(burst);
    for (std::size_t i = 0; i < held.size(); ++i) {
      if (pf.slot_of(held[i]) != held_slots[i]) {
        r.failures.push_back("pinned " + key_name(held[i]) + " left its slot during prefetch round " + std::to_string(round));
      }
    }
  }
  pf.drain();
  OT_CUDA(cudaStreamSynchronize(compute.s));
  for (std::size_t i = 0; i < held.size(); ++i) {
    auto const bytes = download_bytes(pf.slots().slot_ptr(held_slots[i]), bs.store->expert_bytes());
    if (std::memcmp(bytes.data(), bs.store->expert(held[i].layer, held[i].expert), bytes.size()) != 0) {
      r.failures.push_back("pinned " + key_name(held[i]) + "'s slot was overwritten");
    }
  }
  pf.release(held, compute.s);
  OT_CUDA(cudaStreamSynchronize(compute.s));
  check_settled(pf, r.failures, "at the end");
  add_counters(r, pf);
  return r;
}

void build_stack(int slots, int tokens) {
  auto& m = get_model(model_kind::mixtral_like);
  so::offloaded_stack_options opt;
  opt.max_tokens = tokens;
  opt.prefetch.slots = slots;
  so::offloaded_moe_stack<> stack(m.cfg, m.resident_parts, *m.store, opt);
}

budget_outcome acquire_beyond_budget(int slots, int first, int second) {
  budget_outcome out;
  std::vector<std::string> ignored;
  byte_store bs(so::expert_layout{1, 16, 64, 64}, false, 5, ignored);
  so::prefetcher_config cfg;
  cfg.slots = slots;
  so::prefetcher<> pf(*bs.store, cfg);
  stream_holder compute;
  std::vector<so::expert_key> a, b;
  for (int e = 0; e < first; ++e) a.push_back({0, e});
  for (int e = first; e < first + second; ++e) b.push_back({0, e});
  pf.acquire(a, compute.s);
  try {
    pf.acquire(b, compute.s);
  } catch (specmoe::error const& e) {
    out.threw = true;
    out.invalid_argument = e.code() == errc::invalid_argument;
    out.message = e.what();
  }
  pf.inspect([&](auto const& cache) {
    for (auto const k : a) out.first_pins.push_back(cache.slot_of(k) >= 0 ? cache.slot(cache.slot_of(k)).pins : -1);
    out.occupied = cache.occupied();
    return 0;
  });
  pf.release(a, compute.s);
  OT_CUDA(cudaStreamSynchronize(compute.s));
  return out;
}

report shutdown_with_copies_in_flight(int rounds, int prefetches) {
  report r;
  so::expert_layout const lay{4, 32, 256, 512};  // 128 blocks of 768 KiB
  byte_store bs(lay, false, 11, r.failures);
  std::mt19937_64 rng(3);
  for (int round = 0; round < rounds; ++round) {
    stream_holder compute;
    {
      so::prefetcher_config cfg;
      cfg.slots = 16;
      so::prefetcher<> pf(*bs.store, cfg);
      if (round % 2 == 1) {  // demand copies in flight too
        std::vector<so::expert_key> const keys{{0, 1}, {1, 2}, {2, 3}};
        pf.acquire(keys, compute.s);
        pf.release(keys, compute.s);
      }
      for (int i = 0; i < prefetches; i += 8) {
        std::vector<so::expert_key> keys;
        for (int j = 0; j < 8; ++j) keys.push_back({static_cast<int>(rng() % 4), static_cast<int>(rng() % 32)});
        pf.prefetch(keys);
      }
      auto const c = pf.counters();
      if (c.requests != ((prefetches + 7) / 8) * 8) r.failures.push_back("round " + std::to_string(round) + ": requests miscounted");
    }  // destroyed with jobs queued and copies in flight
    OT_CUDA(cudaStreamSynchronize(compute.s));
    if (cudaError_t const err = cudaGetLastError(); err != cudaSuccess) {
      r.failures.push_back("round " + std::to_string(round) + ": CUDA error left behind: " + cudaGetErrorString(err));
    }
  }
  // the device is still usable: a fresh prefetcher copies correctly
  so::prefetcher_config cfg;
  cfg.slots = 8;
  so::prefetcher<> pf(*bs.store, cfg);
  pf.prefetch(std::vector<so::expert_key>{{3, 30}, {3, 31}, {2, 0}});
  pf.drain();
  check_settled(pf, r.failures, "after the shutdown rounds");
  add_counters(r, pf);
  return r;
}

}  // namespace offload_test
