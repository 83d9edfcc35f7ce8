// tests/consumer/main.cpp: the install_consumer test compiles this against an installed specmoe.
// TODO(other engineer): replace the body with a real (small, host-only) MoE layer run once the
// layer API lands; keep it quick, dependency-free, and returning 0 on success.
#include <specmoe/config.hpp>

#include <cstdio>

int main() {
  std::printf("specmoe %d.%d.%d (installed package)\n", specmoe::version.major, specmoe::version.minor,
              specmoe::version.patch);
  return 0;
}
