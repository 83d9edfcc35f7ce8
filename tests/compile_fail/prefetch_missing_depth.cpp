// A PrefetchDepth without depth(layer).
// EXPECT-ERROR: prefetch_depth
#include <specmoe/specmoe.hpp>

struct bottomless {
  static constexpr bool offloads = true;
};

int main() {
  specmoe::moe_layer<specmoe::host_space, specmoe::no_prediction, specmoe::stay, specmoe::contiguous_blocks,
                     bottomless>* layer = nullptr;
  (void)layer;
}
