// tests/consumer/main.cpp: the install_consumer test compiles this against an installed specmoe
// and runs it: a small two-rank layer must equal the dense reference bit for bit.
#include <specmoe/specmoe.hpp>
#include <specmoe/synthetic/random_layer.hpp>

#include <cstdio>
#include <cstring>
#include <vector>

int main() {
  using namespace specmoe;
  moe_config cfg{.hidden_size = 16, .ffn_size = 8, .num_experts = 8, .top_k = 2, .num_ranks = 2};
  synthetic::random_layer<float> weights(cfg, 3);
  auto const x = synthetic::random_activations<float>(10, cfg.hidden_size, 4);
  std::vector<std::int64_t> tokens_per_rank{4, 6};
  std::vector<float> out(x.size(), -1.0f), expected(x.size(), -2.0f);
  moe_layer<host_space> layer(cfg, weights.weights());
  layer.forward(host_batch<float>{matrix_view<float const>(x.data(), 10, 16), tokens_per_rank},
                matrix_view<float>(out.data(), 10, 16));
  dense_reference<float>(cfg, weights.weights(), matrix_view<float const>(x.data(), 10, 16),
                         matrix_view<float>(expected.data(), 10, 16));
  bool const same = std::memcmp(out.data(), expected.data(), out.size() * sizeof(float)) == 0;
  std::printf("specmoe %d.%d.%d (installed package): layer %s the dense reference\n", specmoe::version.major,
              specmoe::version.minor, specmoe::version.patch, same ? "equals" : "DIFFERS FROM");
  return same ? 0 : 1;
}
