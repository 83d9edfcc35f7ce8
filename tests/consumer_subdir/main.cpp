// tests/consumer_subdir/main.cpp: compiled by a project that add_subdirectory()s specmoe.
#include <specmoe/config.hpp>

#include <cstdio>

int main() {
  std::printf("specmoe %d.%d.%d (add_subdirectory)\n", specmoe::version.major, specmoe::version.minor,
              specmoe::version.patch);
  return 0;
}
