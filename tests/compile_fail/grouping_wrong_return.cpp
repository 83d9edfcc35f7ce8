// An ExpertGrouping whose place() returns owners instead of an expert_placement.
// EXPECT-ERROR: expert_grouping
#include <specmoe/specmoe.hpp>

#include <vector>

struct owners_only {
  std::vector<int> place(specmoe::moe_config const&, int) const { return {}; }
};

int main() {
  specmoe::moe_layer<specmoe::host_space, specmoe::no_prediction, specmoe::stay, owners_only>* layer = nullptr;
  (void)layer;
}
