// A CommBackend that does not name its space.
// EXPECT-ERROR: comm_backend
#include <specmoe/specmoe.hpp>

struct spaceless_comm {
  void alltoallv(specmoe::host_exchange const&) {}
};

int main() {
  specmoe::moe_layer<specmoe::host_space, specmoe::no_prediction, specmoe::stay, specmoe::contiguous_blocks,
                     specmoe::all_resident, spaceless_comm>* layer = nullptr;
  (void)layer;
}
