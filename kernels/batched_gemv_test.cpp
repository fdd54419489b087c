#include "kernels/batched_gemv.h"

#include <dirent.h>
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <random>
#include <stdexcept>
#include <sstream>
#include <string>
#include <vector>

namespace vsup::kernels {
namespace {

constexpr float kUntouched = -12345.0f;

// A product's operands, each buffer one float past an aligned start (so that no row is
// aligned), x rows ldx = in + 3 apart and y rows ldy = out + 2 apart.
struct Case {
  int64_t T, out, in, ldx, ldy;
  std::vector<float> wBuf, xBuf;
  const float* w() const { return wBuf.data() + 1; }
  const float* x() const { return xBuf.data() + 1; }
  std::vector<float> freshY() const {
    return std::vector<float>(size_t(T * ldy + 1), kUntouched);
  }
};

// Small integers: every product and partial sum is an integer far below 2^24, so the result is
// exact whatever the order of the additions and whether they are fused.
Case integerCase(int64_t T, int64_t out, int64_t in, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> d(-8, 8);
  Case c{T, out, in, in + 3, out + 2, {}, {}};
  c.wBuf.resize(size_t(out * in + 1));
  c.xBuf.resize(size_t(T * c.ldx + 1));
  for (float& v : c.wBuf) v = float(d(rng));
  for (float& v : c.xBuf) v = float(d(rng));
  return c;
}

Case floatCase(int64_t T, int64_t out, int64_t in, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  Case c{T, out, in, in + 3, out + 2, {}, {}};
  c.wBuf.resize(size_t(out * in + 1));
  c.xBuf.resize(size_t(T * c.ldx + 1));
  for (float& v : c.wBuf) v = d(rng);
  for (float& v : c.xBuf) v = d(rng);
  return c;
}

// The naive reference, in double: y[t, o] and Σ |w| |x| (the scale of its rounding error).
double reference(const Case& c, int64_t t, int64_t o, double* absSum = nullptr) {
  double s = 0, a = 0;
  for (int64_t k = 0; k < c.in; ++k) {
    double p = double(c.x()[t * c.ldx + k]) * double(c.w()[o * c.in + k]);
    s += p;
    a += std::abs(p);
  }
  if (absSum != nullptr) *absSum = a;
  return s;
}

// Checks y's rows [r0, r1) against the reference exactly, and that nothing else was written.
void checkExact(const Case& c, const std::vector<float>& y, int64_t r0, int64_t r1,
                const std::string& what) {
  for (int64_t t = 0; t < c.T; ++t) {
    for (int64_t o = 0; o < c.ldy; ++o) {
      float got = y[size_t(1 + t * c.ldy + o)];
      if (o >= r0 && o < r1) {
        float want = float(reference(c, t, o));
        if (got != want) {
          FAIL_CHECK(what << ": y[" << t << ", " << o << "] = " << got << ", expected " << want);
          return;
        }
      } else if (got != kUntouched) {
        FAIL_CHECK(what << ": y[" << t << ", " << o << "] outside the rows was written");
        return;
      }
    }
  }
  CHECK(y[0] == kUntouched);
}

TEST_CASE("batchedGemvRows is exact on integers, every instruction set, odd shapes, T = 1..64") {
  REQUIRE(!gemvIsas().empty());
  CHECK(gemvIsas().front() == GemvIsa::kBaseline);
  for (GemvIsa isa : gemvIsas()) {
    for (int64_t in : {1, 3, 4, 15, 16, 17, 31, 33, 100, 257}) {
      for (int64_t out : {1, 3, 4, 5, 7, 9, 33}) {
        for (int64_t T = 1; T <= 64; T += (T < 16 ? 1 : 7)) {
          Case c = integerCase(T, out, in, uint32_t(in * 1000 + out * 10 + T));
          std::vector<float> y = c.freshY();
          batchedGemvRows(isa, y.data() + 1, c.ldy, c.x(), c.ldx, T, c.w(), in, 0, out);
          checkExact(c, y, 0, out,
                     std::string(gemvIsaName(isa)) + " T " + std::to_string(T) + " out " +
                         std::to_string(out) + " in " + std::to_string(in));
        }
      }
    }
  }
}

TEST_CASE("batchedGemvRows computes only the rows asked for") {
  Case c = integerCase(11, 37, 45, 7);
  for (GemvIsa isa : gemvIsas()) {
    for (auto [r0, r1] : {std::pair<int64_t, int64_t>{0, 0}, {5, 6}, {3, 11}, {13, 37}, {1, 36}}) {
      std::vector<float> y = c.freshY();
      batchedGemvRows(isa, y.data() + 1, c.ldy, c.x(), c.ldx, c.T, c.w(), c.in, r0, r1);
      checkExact(c, y, r0, r1, std::string(gemvIsaName(isa)) + " rows " + std::to_string(r0) +
                                   ".." + std::to_string(r1));
    }
  }
}

TEST_CASE("batchedGemvRows on floats: within the dot product's rounding bound") {
  for (GemvIsa isa : gemvIsas()) {
    for (int64_t in : {7, 64, 511, 1536}) {
      Case c = floatCase(13, 29, in, uint32_t(in));
      std::vector<float> y = c.freshY();
      batchedGemvRows(isa, y.data() + 1, c.ldy, c.x(), c.ldx, c.T, c.w(), in, 0, c.out);
      for (int64_t t = 0; t < c.T; ++t) {
        for (int64_t o = 0; o < c.out; ++o) {
          double scale = 0;
          double want = reference(c, t, o, &scale);
          // |error| <= γ_n Σ|w x| for any order of n additions (n = in), plus the final rounding.
          double bound = double(in) * std::ldexp(1.0, -24) * scale * 1.01 + std::abs(want) * 6e-8;
          double got = y[size_t(1 + t * c.ldy + o)];
          if (std::abs(got - want) > bound) {
            FAIL_CHECK(gemvIsaName(isa) << " in " << in << ": y[" << t << ", " << o << "] = " << got
                                        << ", reference " << want << ", bound " << bound);
          }
        }
      }
    }
  }
}

TEST_CASE("a row's result does not depend on the batch around it") {
  // T = 1 and T = 64 (six-token tiles, a tail of four) give the same bits for the same input.
  Case c = floatCase(64, 23, 1000, 99);
  for (GemvIsa isa : gemvIsas()) {
    std::vector<float> all = c.freshY();
    batchedGemvRows(isa, all.data() + 1, c.ldy, c.x(), c.ldx, c.T, c.w(), c.in, 0, c.out);
    for (int64_t t : {0, 5, 6, 31, 62, 63}) {
      std::vector<float> one(size_t(c.out), 0.0f);
      batchedGemvRows(isa, one.data(), c.out, c.x() + t * c.ldx, c.ldx, 1, c.w(), c.in, 0, c.out);
      for (int64_t o = 0; o < c.out; ++o) {
        CHECK_MESSAGE(std::memcmp(&one[size_t(o)], &all[size_t(1 + t * c.ldy + o)], 4) == 0,
                      gemvIsaName(isa) << " token " << t << " row " << o);
      }
    }
  }
}

TEST_CASE("batchedGemvRows refuses a bad shape, naming it") {
  std::vector<float> y(64), x(64), w(64);
  CHECK_THROWS_WITH_AS(batchedGemvRows(y.data(), 4, x.data(), 3, 2, w.data(), 4, 0, 4),
                       doctest::Contains("ldx 3"), std::invalid_argument);
  CHECK_THROWS_AS(batchedGemvRows(y.data(), 4, x.data(), 4, 2, w.data(), 4, 0, 5),
                  std::invalid_argument);
  CHECK_THROWS_AS(batchedGemvRows(y.data(), 4, x.data(), 4, 2, w.data(), 4, 3, 2),
                  std::invalid_argument);
  CHECK_THROWS_AS(batchedGemvRows(y.data(), 4, x.data(), 4, -1, w.data(), 4, 0, 4),
                  std::invalid_argument);
  CHECK_THROWS_WITH_AS(BatchedGemv(0), doctest::Contains("got 0"), std::invalid_argument);
}

// The threads of this process that are not exiting. A thread the kernel has begun to take down
// (PF_EXITING in its stat flags, set first thing in its exit, before pthread_join can return)
// still shows in /proc/self/task for a moment after it was joined; it is not counted, so a
// thread joined by an earlier case never shows as one more or one less.
int threadCount() {
  constexpr unsigned long kPfExiting = 0x4;
  int n = 0;
  DIR* d = ::opendir("/proc/self/task");
  REQUIRE(d != nullptr);
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] == '.') continue;
    std::ifstream in(std::string("/proc/self/task/") + e->d_name + "/stat");
    std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    size_t paren = stat.rfind(')');
    if (paren == std::string::npos) continue;  // gone since the readdir
    // After the command's ')': state (field 3), then ppid, pgrp, session, tty, tpgid, flags (9).
    std::istringstream fields(stat.substr(paren + 1));
    std::string state;
    long skip = 0;
    unsigned long flags = 0;
    fields >> state >> skip >> skip >> skip >> skip >> skip >> flags;
    if ((flags & kPfExiting) == 0) ++n;
  }
  ::closedir(d);
  return n;
}


TEST_CASE("BatchedGemv: same bits on any number of threads, exact on integers") {
  Case f = floatCase(32, 3072, 512, 5);
  std::vector<float> serial = f.freshY();
  batchedGemvRows(serial.data() + 1, f.ldy, f.x(), f.ldx, f.T, f.w(), f.in, 0, f.out);
  for (int threads : {1, 2, 3, 5}) {
    BatchedGemv pool(threads);
    CHECK(pool.threads() == threads);
    // Repeated calls on one pool: every call's chunks are all done before it returns.
    for (int call = 0; call < 20; ++call) {
      std::vector<float> y = f.freshY();
      pool.run(y.data() + 1, f.ldy, f.x(), f.ldx, f.T, f.w(), f.out, f.in);
      REQUIRE_MESSAGE(std::memcmp(y.data(), serial.data(), y.size() * sizeof(float)) == 0,
                      threads << " threads, call " << call);
    }
    for (int64_t out : {1, 17, 130, 1001}) {
      Case c = integerCase(9, out, 77, uint32_t(out));
      std::vector<float> y = c.freshY();
      pool.run(y.data() + 1, c.ldy, c.x(), c.ldx, c.T, c.w(), c.out, c.in);
      checkExact(c, y, 0, out, std::to_string(threads) + " threads, out " + std::to_string(out));
    }
  }
}

TEST_CASE("BatchedGemv leaves no thread behind, created and destroyed many times") {
  const int before = threadCount();
  Case c = integerCase(8, 256, 64, 3);
  for (int i = 0; i < 200; ++i) {
    BatchedGemv pool(4);
    if (i == 0) CHECK(threadCount() == before + 3);
    if (i % 2 == 0) {  // half of them destroyed without ever being used
      std::vector<float> y = c.freshY();
      pool.run(y.data() + 1, c.ldy, c.x(), c.ldx, c.T, c.w(), c.out, c.in);
      if (i % 50 == 0) checkExact(c, y, 0, c.out, "pool " + std::to_string(i));
    }
  }
  CHECK(threadCount() == before);  // joined workers are gone or exiting: not counted
}

}  // namespace
}  // namespace vsup::kernels
