// tests/test_main.cpp: the one main() of every specmoe test executable (compiled once).
#if defined(SPECMOE_CATCH2_V3)
#include <catch2/catch_session.hpp>

int main(int argc, char* argv[]) { return Catch::Session().run(argc, argv); }
#else
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
#endif
