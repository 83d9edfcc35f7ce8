// A RouterPredictor without observe(): the error names the concept.
// EXPECT-ERROR: router_predictor
#include <specmoe/specmoe.hpp>

struct forgetful_predictor {
  static constexpr bool predicts = true;
  void predict(specmoe::prediction_request const&, specmoe::prediction&) {}
};

int main() {
  specmoe::moe_layer<specmoe::host_space, forgetful_predictor>* layer = nullptr;
  (void)layer;
}
