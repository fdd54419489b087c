#include "engine/weights.h"

#include <doctest/doctest.h>
#include <unistd.h>

#include <bit>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <vector>

namespace vsup::engine {
namespace {

namespace fs = std::filesystem;

// A private directory for one test, removed with everything in it when the test ends.
class TempDir {
 public:
  TempDir() {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl =
        std::string(base != nullptr && *base != '\0' ? base : "/tmp") + "/vsup-weights-XXXXXX";
    REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
    path_ = tmpl;
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }
  std::string str() const { return path_.string(); }

 private:
  fs::path path_;
};

// A tensor as it goes into a file: its header fields and its raw little-endian bytes.
struct RawTensor {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  std::string bytes;
};

std::string f32Bytes(const std::vector<float>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
}

std::string u16Bytes(const std::vector<uint16_t>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(uint16_t));
}

// Writes a safetensors file by hand: 8-byte little-endian header length, the JSON header padded
// with spaces to a multiple of 8, then the tensors' bytes back to back.
void writeSafetensors(const fs::path& path, const std::vector<RawTensor>& tensors,
                      const nlohmann::json& extraHeader = nlohmann::json::object()) {
  nlohmann::json header = extraHeader;
  std::string data;
  for (const auto& t : tensors) {
    header[t.name] = {{"dtype", t.dtype},
                      {"shape", t.shape},
                      {"data_offsets", {data.size(), data.size() + t.bytes.size()}}};
    data += t.bytes;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  uint64_t len = text.size();
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(&len), 8);
  out << text << data;
  REQUIRE(out.good());
}

void writeText(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
  REQUIRE(out.good());
}

// Distinct, exactly representable (in F32, F16 and BF16) values: multiples of 1/8 below 32.
std::vector<float> rampValues(int64_t n) {
  std::vector<float> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    v[static_cast<size_t>(i)] = static_cast<float>((i % 256) - 128) / 8.0f;
  return v;
}

std::vector<float> readAll(const WeightSource& w, const std::string& name,
                           const std::vector<int64_t>& shape, TensorSlice slice) {
  std::vector<float> out(static_cast<size_t>(slice.rows() * slice.cols()));
  w.read(name, shape, slice, out.data());
  return out;
}

TensorSlice whole(int64_t rows, int64_t cols) { return {0, rows, 0, cols}; }

// The message of the std::runtime_error `f` throws, or "" (and a failed check) when it throws none.
std::string errorOf(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  FAIL_CHECK("expected a std::runtime_error");
  return "";
}

#define CHECK_CONTAINS(haystack, needle)                                          \
  do {                                                                            \
    std::string h_ = (haystack);                                                  \
    INFO("message: " << h_);                                                      \
    CHECK_MESSAGE(h_.find(needle) != std::string::npos, "missing: " << (needle)); \
  } while (0)

int openFdCount() {
  int n = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator("/proc/self/fd")) ++n;
  return n;
}

bool mapped(const fs::path& file) {
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line))
    if (line.find(file.string()) != std::string::npos) return true;
  return false;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Dummy weights

TEST_CASE("dummy weights are a pure function of seed, tensor name, row and column") {
  auto a = makeDummyWeights(7);
  auto b = makeDummyWeights(7);
  auto c = makeDummyWeights(8);
  const std::vector<int64_t> shape = {16, 24};
  auto wa = readAll(*a, "model.layers.0.mlp.up_proj.weight", shape, whole(16, 24));
  CHECK(wa == readAll(*b, "model.layers.0.mlp.up_proj.weight", shape, whole(16, 24)));
  CHECK(wa != readAll(*c, "model.layers.0.mlp.up_proj.weight", shape, whole(16, 24)));
  CHECK(wa != readAll(*a, "model.layers.1.mlp.up_proj.weight", shape, whole(16, 24)));
  // Rows and columns are not copies of each other.
  CHECK(std::vector<float>(wa.begin(), wa.begin() + 24) !=
        std::vector<float>(wa.begin() + 24, wa.begin() + 48));
  CHECK(wa[0] != wa[1]);
  CHECK(a->has("anything.at.all"));
  CHECK(a->describe() == "dummy (seed 7)");
}

TEST_CASE("a dummy shard is exactly the matching part of the whole tensor") {
  auto w = makeDummyWeights(3);
  const std::vector<int64_t> shape = {48, 40};
  auto full = readAll(*w, "model.layers.2.self_attn.o_proj.weight", shape, whole(48, 40));
  for (TensorSlice s : {TensorSlice{8, 24, 10, 30}, TensorSlice{0, 48, 20, 40},
                        TensorSlice{47, 48, 0, 40}, TensorSlice{5, 5, 0, 40}}) {
    auto part = readAll(*w, "model.layers.2.self_attn.o_proj.weight", shape, s);
    for (int64_t r = 0; r < s.rows(); ++r)
      for (int64_t c = 0; c < s.cols(); ++c)
        REQUIRE(part[static_cast<size_t>(r * s.cols() + c)] ==
                full[static_cast<size_t>((s.rowBegin + r) * 40 + s.colBegin + c)]);
  }
  // A 1-D tensor is addressed as [1, n].
  auto vec = readAll(*w, "model.layers.0.self_attn.q_proj.bias", {40}, whole(1, 40));
  auto tail = readAll(*w, "model.layers.0.self_attn.q_proj.bias", {40}, {0, 1, 30, 40});
  CHECK(std::vector<float>(vec.begin() + 30, vec.end()) == tail);
}

TEST_CASE("dummy norm weights are ones and other values are uniform in ±sqrt(3/cols)") {
  auto w = makeDummyWeights(0);
  for (const char* name : {"model.norm.weight", "model.layers.3.input_layernorm.weight",
                           "model.layers.3.post_attention_layernorm.weight"}) {
    auto v = readAll(*w, name, {64}, whole(1, 64));
    CHECK(std::all_of(v.begin(), v.end(), [](float x) { return x == 1.0f; }));
  }
  const int64_t rows = 64, cols = 300;
  auto v = readAll(*w, "model.embed_tokens.weight", {rows, cols}, whole(rows, cols));
  const double a = std::sqrt(3.0 / cols);
  double sum = 0, sumSq = 0, maxAbs = 0;
  for (float x : v) {
    sum += x;
    sumSq += double(x) * x;
    maxAbs = std::max(maxAbs, std::fabs(double(x)));
  }
  const double n = static_cast<double>(v.size());
  CHECK(maxAbs <= a);
  CHECK(maxAbs > 0.99 * a);
  CHECK(std::fabs(sum / n) < 0.02 * a);
  // The variance of U(-a, a) is a^2 / 3 = 1 / cols.
  CHECK(sumSq / n == doctest::Approx(1.0 / cols).epsilon(0.03));
}

TEST_CASE("dummy weights fill 25M elements well under a second") {
  auto w = makeDummyWeights(1);
  const int64_t rows = 5000, cols = 5000;
  std::vector<float> out(static_cast<size_t>(rows * cols));
  auto t0 = std::chrono::steady_clock::now();
  w->read("model.layers.0.mlp.gate_proj.weight", {rows, cols}, whole(rows, cols), out.data());
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  MESSAGE("25M dummy elements in " << s * 1e3 << " ms");
  // The bound is loose because the test machine may be shared; the expected time is ~0.1 s.
  CHECK(s < 1.0);
}

TEST_CASE("dummy weights reject a slice outside the shape") {
  auto w = makeDummyWeights(0);
  std::vector<float> out(100);
  CHECK_CONTAINS(errorOf([&] {
                   w->read("x.weight", {4, 4}, {0, 5, 0, 4}, out.data());
                 }),
                 "out of range for shape [4, 4]");
  CHECK_CONTAINS(errorOf([&] {
                   w->read("x.weight", {4, 4, 4}, whole(1, 4), out.data());
                 }),
                 "only 1-D and 2-D");
}

// ---------------------------------------------------------------------------------------------
// Safetensors: reading

TEST_CASE("safetensors F32 tensors read back exactly, whole and as a 2-D slice") {
  TempDir dir;
  auto m = rampValues(6 * 7);
  auto bias = rampValues(5);
  writeSafetensors(dir.path() / "model.safetensors",
                   {{"model.embed_tokens.weight", "F32", {6, 7}, f32Bytes(m)},
                    {"model.norm.weight", "F32", {5}, f32Bytes(bias)}},
                   {{"__metadata__", {{"format", "pt"}}}});
  auto w = openSafetensors(dir.str());
  CHECK(w->describe() == dir.str());
  CHECK(w->has("model.embed_tokens.weight"));
  CHECK(w->has("model.norm.weight"));
  CHECK_FALSE(w->has("__metadata__"));
  CHECK_FALSE(w->has("lm_head.weight"));
  CHECK(readAll(*w, "model.embed_tokens.weight", {6, 7}, whole(6, 7)) == m);
  CHECK(readAll(*w, "model.norm.weight", {5}, whole(1, 5)) == bias);
  auto s = readAll(*w, "model.embed_tokens.weight", {6, 7}, {2, 5, 1, 4});
  REQUIRE(s.size() == 9);
  for (int r = 0; r < 3; ++r)
    for (int c = 0; c < 3; ++c) CHECK(s[size_t(r * 3 + c)] == m[size_t((2 + r) * 7 + 1 + c)]);
  CHECK(readAll(*w, "model.norm.weight", {5}, {0, 1, 3, 5}) ==
        std::vector<float>{bias[3], bias[4]});
}

TEST_CASE("safetensors F16 converts every one of the 65536 bit patterns exactly") {
  TempDir dir;
  std::vector<uint16_t> bits(65536);
  for (uint32_t i = 0; i < 65536; ++i) bits[i] = static_cast<uint16_t>(i);
  writeSafetensors(dir.path() / "model.safetensors", {{"t", "F16", {256, 256}, u16Bytes(bits)}});
  auto w = openSafetensors(dir.str());
  auto v = readAll(*w, "t", {256, 256}, whole(256, 256));
  // Values worked out by hand from the IEEE binary16 layout.
  CHECK(v[0x0000] == 0.0f);
  CHECK(std::signbit(v[0x8000]));
  CHECK(v[0x8000] == 0.0f);
  CHECK(v[0x3c00] == 1.0f);
  CHECK(v[0xc000] == -2.0f);
  CHECK(v[0x3555] == 0.333251953125f);
  CHECK(v[0x7bff] == 65504.0f);
  CHECK(v[0x0001] == std::ldexp(1.0f, -24));     // smallest subnormal
  CHECK(v[0x03ff] == std::ldexp(1023.0f, -24));  // largest subnormal
  CHECK(v[0x0400] == std::ldexp(1.0f, -14));     // smallest normal
  CHECK(v[0x7c00] == INFINITY);
  CHECK(v[0xfc00] == -INFINITY);
  CHECK(std::isnan(v[0x7e00]));
#ifdef __FLT16_MAX__
  // Every pattern against the compiler's own conversion.
  int mismatches = 0;
  for (uint32_t i = 0; i < 65536; ++i) {
    float expected = static_cast<float>(std::bit_cast<_Float16>(static_cast<uint16_t>(i)));
    bool same = std::isnan(expected)
                    ? std::isnan(v[i])
                    : std::bit_cast<uint32_t>(expected) == std::bit_cast<uint32_t>(v[i]);
    if (!same && ++mismatches < 5)
      FAIL_CHECK("F16 pattern " << i << ": got " << v[i] << ", expected " << expected);
  }
  CHECK(mismatches == 0);
#endif
  // A column slice of a row in the middle.
  auto s = readAll(*w, "t", {256, 256}, {0x3c, 0x3d, 0, 2});
  CHECK(s == std::vector<float>{1.0f, v[0x3c01]});
}

TEST_CASE("safetensors BF16 reads back as the upper half of the fp32 bits") {
  TempDir dir;
  // Arbitrary fp32 values with their low 16 bits cleared are exactly what BF16 can hold.
  std::vector<float> expected;
  std::vector<uint16_t> bits;
  for (float x : {0.0f, -0.0f, 1.0f, -1.5f, 3.140625f, 1e-30f, -7e20f, 0.0078125f, 123.0f, 1e-40f,
                  INFINITY, -2.75f}) {
    uint32_t b = std::bit_cast<uint32_t>(x) & 0xffff0000u;
    expected.push_back(std::bit_cast<float>(b));
    bits.push_back(static_cast<uint16_t>(b >> 16));
  }
  writeSafetensors(dir.path() / "model.safetensors", {{"w", "BF16", {3, 4}, u16Bytes(bits)}});
  auto w = openSafetensors(dir.str());
  auto v = readAll(*w, "w", {3, 4}, whole(3, 4));
  REQUIRE(v.size() == expected.size());
  for (size_t i = 0; i < v.size(); ++i)
    CHECK(std::bit_cast<uint32_t>(v[i]) == std::bit_cast<uint32_t>(expected[i]));
  auto s = readAll(*w, "w", {3, 4}, {1, 3, 2, 4});
  CHECK(s == std::vector<float>{expected[6], expected[7], expected[10], expected[11]});
}

TEST_CASE("safetensors shards listed by model.safetensors.index.json are read from their files") {
  TempDir dir;
  auto a = rampValues(4 * 3);
  auto b = rampValues(2 * 3);
  std::reverse(b.begin(), b.end());
  writeSafetensors(dir.path() / "model-00001-of-00002.safetensors",
                   {{"model.embed_tokens.weight", "F32", {4, 3}, f32Bytes(a)}});
  writeSafetensors(dir.path() / "model-00002-of-00002.safetensors",
                   {{"lm_head.weight", "F32", {2, 3}, f32Bytes(b)}});
  writeText(dir.path() / "model.safetensors.index.json",
            R"({"metadata": {"total_size": 72}, "weight_map": {
                  "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                  "lm_head.weight": "model-00002-of-00002.safetensors"}})");
  // A stray file the index does not list is not read.
  writeText(dir.path() / "stray.safetensors", "not a safetensors file");
  auto w = openSafetensors(dir.str());
  CHECK(readAll(*w, "model.embed_tokens.weight", {4, 3}, whole(4, 3)) == a);
  CHECK(readAll(*w, "lm_head.weight", {2, 3}, whole(2, 3)) == b);
  CHECK(readAll(*w, "lm_head.weight", {2, 3}, {1, 2, 0, 3}) ==
        std::vector<float>(b.begin() + 3, b.end()));
}

TEST_CASE("without model.safetensors or an index, every *.safetensors in the directory is read") {
  TempDir dir;
  auto a = rampValues(3);
  auto b = rampValues(4);
  writeSafetensors(dir.path() / "b.safetensors", {{"y", "F32", {4}, f32Bytes(b)}});
  writeSafetensors(dir.path() / "a.safetensors", {{"x", "F32", {3}, f32Bytes(a)}});
  writeText(dir.path() / "config.json", "{}");
  auto w = openSafetensors(dir.str());
  CHECK(readAll(*w, "x", {3}, whole(1, 3)) == a);
  CHECK(readAll(*w, "y", {4}, whole(1, 4)) == b);

  // The same tensor in two files is ambiguous.
  writeSafetensors(dir.path() / "c.safetensors", {{"x", "F32", {3}, f32Bytes(a)}});
  auto msg = errorOf([&] { openSafetensors(dir.str()); });
  CHECK_CONTAINS(msg, "tensor 'x'");
  CHECK_CONTAINS(msg, "a.safetensors");
  CHECK_CONTAINS(msg, "c.safetensors");
}

// ---------------------------------------------------------------------------------------------
// Safetensors: errors

TEST_CASE("openSafetensors names the directory when it is missing or holds no safetensors") {
  TempDir dir;
  const std::string missing = dir.str() + "/nope";
  CHECK(errorOf([&] { openSafetensors(missing); }) == missing + ": no such directory");
  writeText(dir.path() / "config.json", "{}");
  CHECK(errorOf([&] { openSafetensors(dir.str() + "/config.json"); }) ==
        dir.str() + "/config.json: not a directory");
  CHECK(errorOf([&] { openSafetensors(dir.str()); }) ==
        dir.str() +
            ": no *.safetensors file (expected model.safetensors or model.safetensors.index.json)");
}

TEST_CASE("an index that names a missing file or tensor is reported with the index's path") {
  TempDir dir;
  writeSafetensors(dir.path() / "model-00001-of-00002.safetensors",
                   {{"a", "F32", {1}, f32Bytes({1.0f})}});
  const auto index = dir.path() / "model.safetensors.index.json";
  writeText(index, R"({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                      "b": "model-00002-of-00002.safetensors"}})");
  auto msg = errorOf([&] { openSafetensors(dir.str()); });
  CHECK_CONTAINS(msg, index.string() + ":");
  CHECK_CONTAINS(msg, "model-00002-of-00002.safetensors");
  CHECK_CONTAINS(msg, "does not exist");

  writeText(index, R"({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                      "b": "model-00001-of-00002.safetensors"}})");
  msg = errorOf([&] { openSafetensors(dir.str()); });
  CHECK_CONTAINS(msg, index.string() + ":");
  CHECK_CONTAINS(msg, "tensor 'b'");

  writeText(index, R"({"weight_map": {"a": "../elsewhere.safetensors"}})");
  CHECK_CONTAINS(errorOf([&] { openSafetensors(dir.str()); }), "not a file in the directory");
  writeText(index, R"({"weight_map": )");
  CHECK_CONTAINS(errorOf([&] { openSafetensors(dir.str()); }), index.string() + ": malformed JSON");
  writeText(index, R"({"metadata": {}})");
  CHECK_CONTAINS(errorOf([&] { openSafetensors(dir.str()); }), "no \"weight_map\"");
}

TEST_CASE("truncated safetensors files are reported with their path") {
  TempDir dir;
  const auto file = dir.path() / "model.safetensors";
  const std::string prefix = file.string() + ": truncated";
  writeText(file, "");
  CHECK_CONTAINS(errorOf([&] { openSafetensors(dir.str()); }), prefix);
  writeText(file, "abc");
  CHECK_CONTAINS(errorOf([&] { openSafetensors(dir.str()); }), prefix);

  // The header claims more bytes than the file has.
  writeSafetensors(file, {{"a", "F32", {4}, f32Bytes(rampValues(4))}});
  std::string whole;
  {
    std::ifstream in(file, std::ios::binary);
    whole.assign(std::istreambuf_iterator<char>(in), {});
  }
  uint64_t headerLen;
  std::memcpy(&headerLen, whole.data(), 8);
  writeText(file, whole.substr(0, 8 + headerLen / 2));
  CHECK_CONTAINS(errorOf([&] { openSafetensors(dir.str()); }), prefix);

  // The tensor's data runs past the end of the file.
  writeText(file, whole.substr(0, whole.size() - 4));
  auto msg = errorOf([&] { openSafetensors(dir.str()); });
  CHECK_CONTAINS(msg, prefix);
  CHECK_CONTAINS(msg, "tensor 'a'");
}

TEST_CASE("malformed safetensors headers are reported with the file's path") {
  TempDir dir;
  const auto file = dir.path() / "model.safetensors";
  const std::string prefix = file.string() + ": malformed safetensors header";
  auto withHeader = [&](const std::string& json, const std::string& data = "") {
    uint64_t len = json.size();
    writeText(file, std::string(reinterpret_cast<const char*>(&len), 8) + json + data);
    return errorOf([&] { openSafetensors(dir.str()); });
  };
  CHECK_CONTAINS(withHeader("{not json"), prefix);
  CHECK_CONTAINS(withHeader("[1, 2]"), prefix + ": not a JSON object");
  CHECK_CONTAINS(withHeader(R"({"t": 3})"), prefix + ": tensor 't'");
  CHECK_CONTAINS(withHeader(R"({"t": {"shape": [1], "data_offsets": [0, 4]}})", "abcd"), "dtype");
  CHECK_CONTAINS(
      withHeader(R"({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}})", "abcd"),
      prefix + ": tensor 't'");
  CHECK_CONTAINS(
      withHeader(R"({"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}})", "abcd"),
      prefix + ": tensor 't'");
  // Two F32 elements need 8 bytes, not 4.
  auto msg = withHeader(R"({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}})", "abcd");
  CHECK_CONTAINS(msg, prefix + ": tensor 't'");
  CHECK_CONTAINS(msg, "needs 8");
  // An absurd header length.
  uint64_t huge = 200ull << 20;
  writeText(file, std::string(reinterpret_cast<const char*>(&huge), 8) + "{}");
  CHECK_CONTAINS(errorOf([&] { openSafetensors(dir.str()); }), prefix);
  // A header with only metadata is well-formed (and has no tensors).
  const std::string meta = R"({"__metadata__": {"format": "pt"}})";
  uint64_t len = meta.size();
  writeText(file, std::string(reinterpret_cast<const char*>(&len), 8) + meta);
  std::unique_ptr<WeightSource> w;
  CHECK_NOTHROW(w = openSafetensors(dir.str()));
  CHECK_FALSE(w->has("__metadata__"));
}

TEST_CASE("read names the file and the tensor when it is missing, misshapen or of another dtype") {
  TempDir dir;
  const auto file = dir.path() / "model.safetensors";
  writeSafetensors(
      file,
      {{"model.layers.0.self_attn.q_proj.weight", "F32", {64, 32}, f32Bytes(rampValues(64 * 32))},
       {"model.layers.0.mlp.up_proj.weight", "I8", {4, 4}, std::string(16, '\1')},
       {"model.norm.weight", "F32", {4}, f32Bytes(rampValues(4))}});
  auto w = openSafetensors(dir.str());
  std::vector<float> out(64 * 64);
  CHECK(errorOf([&] {
          w->read("model.layers.0.self_attn.k_proj.weight", {64, 64}, whole(64, 64), out.data());
        }) == dir.str() + ": tensor 'model.layers.0.self_attn.k_proj.weight' not found");
  CHECK(errorOf([&] {
          w->read("model.layers.0.self_attn.q_proj.weight", {64, 64}, whole(64, 64), out.data());
        }) == file.string() +
                  ": tensor 'model.layers.0.self_attn.q_proj.weight' has shape [64, 32], expected "
                  "[64, 64]");
  CHECK(errorOf([&] {
          w->read("model.norm.weight", {1, 4}, whole(1, 4), out.data());
        }) == file.string() + ": tensor 'model.norm.weight' has shape [4], expected [1, 4]");
  CHECK(errorOf([&] {
          w->read("model.layers.0.mlp.up_proj.weight", {4, 4}, whole(4, 4), out.data());
        }) ==
        file.string() +
            ": tensor 'model.layers.0.mlp.up_proj.weight' has dtype I8; supported: F32, F16, BF16");
  auto msg = errorOf([&] {
    w->read("model.layers.0.self_attn.q_proj.weight", {64, 32}, {0, 64, 16, 33}, out.data());
  });
  CHECK_CONTAINS(msg, file.string() + ": tensor 'model.layers.0.self_attn.q_proj.weight'");
  CHECK_CONTAINS(msg, "out of range for shape [64, 32]");
}

TEST_CASE("an unknown dtype passes the header check and is refused when read") {
  TempDir dir;
  writeSafetensors(dir.path() / "model.safetensors", {{"t", "F4_WEIRD", {3}, "xyz"}});
  auto w = openSafetensors(dir.str());
  CHECK(w->has("t"));
  std::vector<float> out(3);
  CHECK_CONTAINS(errorOf([&] { w->read("t", {3}, whole(1, 3), out.data()); }),
                 "has dtype F4_WEIRD; supported: F32, F16, BF16");
}

// ---------------------------------------------------------------------------------------------
// Safetensors: resources

TEST_CASE("safetensors files are unmapped and no descriptor is left open after destruction") {
  TempDir dir;
  const auto f1 = dir.path() / "model-00001-of-00002.safetensors";
  const auto f2 = dir.path() / "model-00002-of-00002.safetensors";
  writeSafetensors(f1, {{"a", "F32", {2}, f32Bytes({1.0f, 2.0f})}});
  writeSafetensors(f2, {{"b", "BF16", {2}, u16Bytes({0x3f80, 0x4000})}});
  const int before = openFdCount();
  {
    auto w = openSafetensors(dir.str());
    CHECK(mapped(f1));
    CHECK(mapped(f2));
    CHECK(readAll(*w, "b", {2}, whole(1, 2)) == std::vector<float>{1.0f, 2.0f});
    CHECK(openFdCount() == before);  // the mappings hold the files, not descriptors
  }
  CHECK_FALSE(mapped(f1));
  CHECK_FALSE(mapped(f2));
  CHECK(openFdCount() == before);

  // A failure half-way through opening releases the files opened so far.
  writeText(f2, "short");
  CHECK_CONTAINS(errorOf([&] { openSafetensors(dir.str()); }), f2.string() + ": truncated");
  CHECK_FALSE(mapped(f1));
  CHECK(openFdCount() == before);
}

}  // namespace vsup::engine
