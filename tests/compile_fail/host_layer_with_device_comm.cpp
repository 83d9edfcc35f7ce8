// A host layer given a backend of another space: the static_assert names host_comm_backend.
// EXPECT-ERROR: host_comm_backend
#include <specmoe/specmoe.hpp>
#include <specmoe/synthetic/random_layer.hpp>

struct device_comm {
  using space_type = specmoe::cuda_space;
};

int main() {
  auto cfg = specmoe::models::mixtral_8x7b();
  specmoe::synthetic::random_layer<float> w(cfg);
  specmoe::moe_layer<specmoe::host_space, specmoe::no_prediction, specmoe::stay, specmoe::contiguous_blocks,
                     specmoe::all_resident, device_comm>
      layer(cfg, w.weights());
}
