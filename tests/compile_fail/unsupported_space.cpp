// A layer in a space with no implementation fails in words.
// EXPECT-ERROR: no implementation for this Space
#include <specmoe/layer/moe_layer.hpp>

struct my_space {
  using space_type = my_space;
};
struct my_comm {
  using space_type = my_space;
};

int main() {
  specmoe::moe_layer<my_space, specmoe::no_prediction, specmoe::stay, specmoe::contiguous_blocks,
                     specmoe::all_resident, my_comm>
      layer;
  (void)layer;
}
