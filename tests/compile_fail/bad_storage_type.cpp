// from_float<T> is constrained on specmoe::storage_type (float or bf16): an int must be rejected
// by that concept, not by some error deep inside the conversion.
// EXPECT-ERROR: (satisfaction of 'storage_type<T>' \[with T = int\]|'int' does not satisfy 'storage_type')
#include <specmoe/core/bfloat16.hpp>

int main() {
  auto const x = specmoe::from_float<int>(1.0f);
  return x;
}
