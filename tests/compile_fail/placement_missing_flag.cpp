// A TokenPlacement that does not say whether it moves tokens: the error names the concept.
// EXPECT-ERROR: token_placement
#include <specmoe/specmoe.hpp>

struct vague_placement {
  void plan(specmoe::placement_request const&, specmoe::token_plan&) const {}
};

int main() {
  specmoe::moe_layer<specmoe::host_space, specmoe::no_prediction, vague_placement>* layer = nullptr;
  (void)layer;
}
