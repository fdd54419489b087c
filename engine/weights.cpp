#include "engine/weights.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <stdexcept>
#include <utility>

#include "base/check.h"
#include "base/fd.h"

namespace vsup::engine {
namespace {

// Safetensors stores little-endian values and this loader copies them as they are.
static_assert(std::endian::native == std::endian::little,
              "the safetensors loader assumes little-endian");

[[noreturn]] void fail(const std::string& message) { throw std::runtime_error(message); }

std::string shapeString(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// The expected shape as [rows, cols] (a 1-D tensor of length n is [1, n]), after checking that
// the caller asked for 1 or 2 non-negative dims and a slice inside them.
std::pair<int64_t, int64_t> checkedMatrix(const std::string& where, const std::string& name,
                                          const std::vector<int64_t>& shape,
                                          const TensorSlice& slice) {
  if (shape.empty() || shape.size() > 2 ||
      std::any_of(shape.begin(), shape.end(), [](int64_t d) { return d < 0; }))
    fail(where + ": tensor '" + name + "' requested with shape " + shapeString(shape) +
         "; only 1-D and 2-D shapes are supported");
  int64_t rows = shape.size() == 2 ? shape[0] : 1;
  int64_t cols = shape.back();
  if (slice.rowBegin < 0 || slice.rowBegin > slice.rowEnd || slice.rowEnd > rows ||
      slice.colBegin < 0 || slice.colBegin > slice.colEnd || slice.colEnd > cols)
    fail(where + ": tensor '" + name + "': slice rows [" + std::to_string(slice.rowBegin) + ", " +
         std::to_string(slice.rowEnd) + ") columns [" + std::to_string(slice.colBegin) + ", " +
         std::to_string(slice.colEnd) + ") is out of range for shape " + shapeString(shape));
  return {rows, cols};
}

// ---------------------------------------------------------------------------------------------
// Dummy weights

uint64_t mix(uint64_t z) {  // the splitmix64 finaliser
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ULL;

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ULL;
  return h;
}

class DummyWeights final : public WeightSource {
 public:
  explicit DummyWeights(uint64_t seed) : seed_(seed) {}

  // Every tensor exists: the caller's model config decides which ones it asks for.
  bool has(const std::string&) const override { return true; }

  void read(const std::string& name, const std::vector<int64_t>& shape, const TensorSlice& slice,
            float* out) const override {
    [[maybe_unused]] auto [rows, cols] = checkedMatrix(describe(), name, shape, slice);
    const int64_t n = slice.cols();
    if (name.ends_with("norm.weight")) {
      std::fill(out, out + slice.rows() * n, 1.0f);
      return;
    }
    // value(r, c) = (u - 2^23) * 2^-23 * a with u the top 24 bits of a splitmix64 chain over
    // (seed, name, r, c): uniform in [-a, a), and depending on the full shape's column count only
    // through a, so a shard is bit-identical to the same part of the whole tensor.
    const float scale =
        static_cast<float>(std::sqrt(3.0 / static_cast<double>(std::max<int64_t>(cols, 1)))) *
        0x1p-23f;
    const uint64_t tensorKey = mix(mix(seed_ + kGolden) ^ fnv1a(name));
    for (int64_t r = slice.rowBegin; r < slice.rowEnd; ++r) {
      const uint64_t rowKey = mix(tensorKey + static_cast<uint64_t>(r + 1) * kGolden);
      float* dst = out + (r - slice.rowBegin) * n;
      for (int64_t c = 0; c < n; ++c) {
        uint64_t z = mix(rowKey + static_cast<uint64_t>(slice.colBegin + c + 1) * kGolden);
        dst[c] = static_cast<float>(static_cast<int32_t>(z >> 40) - (1 << 23)) * scale;
      }
    }
  }

  std::string describe() const override { return "dummy (seed " + std::to_string(seed_) + ")"; }

 private:
  uint64_t seed_;
};

// ---------------------------------------------------------------------------------------------
// Safetensors

// One read-only private mapping of a whole file; unmapping is its only cleanup. The file
// descriptor is closed as soon as the mapping exists: the mapping keeps the file alive, so a
// model with many shards holds no descriptors.
class MappedFile {
 public:
  explicit MappedFile(std::string path) : path_(std::move(path)) {
    // A file that cannot be opened is the user's model directory at fault, said as such; any
    // later failure on an open descriptor is a system error.
    OwnFd fd(::open(path_.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd) fail(path_ + ": cannot open: " + std::strerror(errno));
    struct stat st {};
    VSUP_SYSCALL(::fstat(fd.get(), &st));
    size_ = static_cast<size_t>(st.st_size);
    if (size_ > 0) {  // mmap of length 0 is EINVAL; an empty file is reported by the parser
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd.get(), 0);
      if (p == MAP_FAILED) fail(path_ + ": mmap failed: " + std::strerror(errno));
      data_ = static_cast<const unsigned char*>(p);
    }
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile() {
    if (data_ != nullptr) ::munmap(const_cast<unsigned char*>(data_), size_);
  }

  const std::string& path() const { return path_; }
  const unsigned char* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  std::string path_;
  const unsigned char* data_ = nullptr;
  size_t size_ = 0;
};

enum class DType { F32, F16, BF16, Other };

struct TensorInfo {
  const MappedFile* file = nullptr;  // owned by the SafetensorsWeights that owns this entry
  std::string dtype;                 // as written in the header, for messages
  DType kind = DType::Other;
  std::vector<int64_t> shape;
  const unsigned char* data = nullptr;  // the first byte of the tensor inside the mapping
};

// Bytes per element of the dtypes safetensors defines (so their sizes can be validated even when
// they cannot be loaded); 0 for a name this loader does not know.
size_t dtypeSize(const std::string& dtype) {
  static const std::map<std::string, size_t> kSizes = {
      {"F64", 8}, {"F32", 4}, {"F16", 2},  {"BF16", 2},    {"I64", 8},
      {"I32", 4}, {"I16", 2}, {"I8", 1},   {"U64", 8},     {"U32", 4},
      {"U16", 2}, {"U8", 1},  {"BOOL", 1}, {"F8_E4M3", 1}, {"F8_E5M2", 1}};
  auto it = kSizes.find(dtype);
  return it == kSizes.end() ? 0 : it->second;
}

DType dtypeKind(const std::string& dtype) {
  if (dtype == "F32") return DType::F32;
  if (dtype == "F16") return DType::F16;
  if (dtype == "BF16") return DType::BF16;
  return DType::Other;
}

float halfToFloat(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0) {
    // Zero or subnormal: mantissa * 2^-24, exact in fp32.
    float magnitude = static_cast<float>(mantissa) * 0x1p-24f;
    return sign ? -magnitude : magnitude;
  } else if (exponent == 31) {
    bits = sign | 0x7f800000u | (mantissa << 13);  // inf, or NaN keeping its payload
  } else {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);  // rebias 15 -> 127
  }
  return std::bit_cast<float>(bits);
}

uint16_t load16(const unsigned char* p) {
  uint16_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Parses one file's header into `tensors`, validating it against the file's size.
void parseHeader(const MappedFile& file, std::map<std::string, TensorInfo>& tensors,
                 const std::set<std::string>* only) {
  const std::string& path = file.path();
  if (file.size() < 8)
    fail(path + ": truncated: " + std::to_string(file.size()) +
         " bytes, too short for a safetensors header");
  uint64_t headerLen;
  std::memcpy(&headerLen, file.data(), sizeof headerLen);
  constexpr uint64_t kMaxHeader = 100ull << 20;
  if (headerLen > kMaxHeader)
    fail(path + ": malformed safetensors header: header length " + std::to_string(headerLen) +
         " exceeds 100 MB");
  if (headerLen > file.size() - 8)
    fail(path + ": truncated: header length " + std::to_string(headerLen) + " but the file has " +
         std::to_string(file.size()) + " bytes");
  const char* headerBegin = reinterpret_cast<const char*>(file.data() + 8);
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(headerBegin, headerBegin + headerLen);
  } catch (const nlohmann::json::exception& e) {
    fail(path + ": malformed safetensors header: " + e.what());
  }
  if (!header.is_object()) fail(path + ": malformed safetensors header: not a JSON object");
  const unsigned char* dataBegin = file.data() + 8 + headerLen;
  const uint64_t dataSize = file.size() - 8 - headerLen;
  for (auto& [name, entry] : header.items()) {
    if (name == "__metadata__") continue;
    if (only != nullptr && !only->contains(name)) continue;
    auto bad = [&](const std::string& why) {
      fail(path + ": malformed safetensors header: tensor '" + name + "': " + why);
    };
    if (!entry.is_object()) bad("entry is not an object");
    auto dtypeIt = entry.find("dtype");
    auto shapeIt = entry.find("shape");
    auto offsetsIt = entry.find("data_offsets");
    if (dtypeIt == entry.end() || !dtypeIt->is_string()) bad("no \"dtype\" string");
    if (shapeIt == entry.end() || !shapeIt->is_array()) bad("no \"shape\" array");
    if (offsetsIt == entry.end() || !offsetsIt->is_array() || offsetsIt->size() != 2 ||
        !(*offsetsIt)[0].is_number_unsigned() || !(*offsetsIt)[1].is_number_unsigned())
      bad("\"data_offsets\" is not [begin, end]");
    TensorInfo info;
    info.file = &file;
    info.dtype = dtypeIt->get<std::string>();
    info.kind = dtypeKind(info.dtype);
    uint64_t elements = 1;
    for (const auto& d : *shapeIt) {
      if (!d.is_number_unsigned()) bad("shape has a non-integer or negative dimension");
      uint64_t dim = d.get<uint64_t>();
      if (dim > (uint64_t{1} << 62) || __builtin_mul_overflow(elements, dim, &elements))
        bad("shape is too large");
      info.shape.push_back(static_cast<int64_t>(dim));
    }
    uint64_t begin = (*offsetsIt)[0].get<uint64_t>();
    uint64_t end = (*offsetsIt)[1].get<uint64_t>();
    if (begin > end)
      bad("data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) + "] is reversed");
    if (end > dataSize)
      fail(path + ": truncated: tensor '" + name + "' ends at byte " + std::to_string(end) +
           " of the data section, which has " + std::to_string(dataSize) + " bytes");
    if (size_t elemSize = dtypeSize(info.dtype); elemSize != 0) {
      uint64_t bytes;
      if (__builtin_mul_overflow(elements, elemSize, &bytes) || bytes != end - begin)
        bad("data_offsets span " + std::to_string(end - begin) + " bytes, but " + info.dtype + " " +
            shapeString(info.shape) + " needs " + std::to_string(elements * elemSize));
    }
    info.data = dataBegin + begin;
    auto [it, inserted] = tensors.emplace(name, std::move(info));
    if (!inserted) fail(path + ": tensor '" + name + "' is also in " + it->second.file->path());
  }
}

class SafetensorsWeights final : public WeightSource {
 public:
  explicit SafetensorsWeights(std::string directory) : directory_(std::move(directory)) {
    namespace fs = std::filesystem;
    std::error_code ec;
    fs::file_status st = fs::status(directory_, ec);
    if (ec && ec != std::errc::no_such_file_or_directory) fail(directory_ + ": " + ec.message());
    if (!fs::exists(st)) fail(directory_ + ": no such directory");
    if (!fs::is_directory(st)) fail(directory_ + ": not a directory");
    const fs::path dir(directory_);

    if (fs::exists(dir / "model.safetensors")) {
      openFile(dir / "model.safetensors", nullptr);
    } else if (fs::exists(dir / "model.safetensors.index.json")) {
      openIndex(dir / "model.safetensors.index.json");
    } else {
      std::vector<fs::path> found;
      for (const auto& e : fs::directory_iterator(dir, ec))
        if (e.path().extension() == ".safetensors" && e.is_regular_file())
          found.push_back(e.path());
      if (ec) fail(directory_ + ": cannot list: " + ec.message());
      if (found.empty())
        fail(
            directory_ +
            ": no *.safetensors file (expected model.safetensors or model.safetensors.index.json)");
      std::sort(found.begin(), found.end());
      for (const auto& p : found) openFile(p, nullptr);
    }
  }

  bool has(const std::string& name) const override { return tensors_.contains(name); }

  void read(const std::string& name, const std::vector<int64_t>& shape, const TensorSlice& slice,
            float* out) const override {
    auto it = tensors_.find(name);
    if (it == tensors_.end()) fail(directory_ + ": tensor '" + name + "' not found");
    const TensorInfo& t = it->second;
    const std::string where = t.file->path() + ": tensor '" + name + "'";
    if (t.shape != shape)
      fail(where + " has shape " + shapeString(t.shape) + ", expected " + shapeString(shape));
    if (t.kind == DType::Other)
      fail(where + " has dtype " + t.dtype + "; supported: F32, F16, BF16");
    [[maybe_unused]] auto [rows, cols] = checkedMatrix(t.file->path(), name, shape, slice);
    const int64_t n = slice.cols();
    for (int64_t r = slice.rowBegin; r < slice.rowEnd; ++r) {
      float* dst = out + (r - slice.rowBegin) * n;
      const int64_t first = r * cols + slice.colBegin;  // element index of the row's slice
      switch (t.kind) {
        case DType::F32:
          std::memcpy(dst, t.data + first * 4, static_cast<size_t>(n) * 4);
          break;
        case DType::F16:
          for (int64_t c = 0; c < n; ++c) dst[c] = halfToFloat(load16(t.data + (first + c) * 2));
          break;
        case DType::BF16:
          for (int64_t c = 0; c < n; ++c)
            dst[c] =
                std::bit_cast<float>(static_cast<uint32_t>(load16(t.data + (first + c) * 2)) << 16);
          break;
        case DType::Other:
          break;  // rejected above
      }
    }
  }

  std::string describe() const override { return directory_; }

 private:
  void openFile(const std::filesystem::path& path, const std::set<std::string>* only) {
    files_.push_back(std::make_unique<MappedFile>(path.string()));
    parseHeader(*files_.back(), tensors_, only);
  }

  void openIndex(const std::filesystem::path& indexPath) {
    const std::string where = indexPath.string();
    std::ifstream in(indexPath);
    if (!in) fail(where + ": cannot open");
    nlohmann::json index;
    try {
      index = nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception& e) {
      fail(where + ": malformed JSON: " + e.what());
    }
    if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object())
      fail(where + ": no \"weight_map\" object");
    // file -> the tensors the index places in it, in file-name order.
    std::map<std::string, std::set<std::string>> byFile;
    for (auto& [name, file] : index["weight_map"].items()) {
      if (!file.is_string()) fail(where + ": weight_map['" + name + "'] is not a file name");
      std::string f = file.get<std::string>();
      if (f.empty() || f.find('/') != std::string::npos || f == "." || f == "..")
        fail(where + ": weight_map['" + name + "'] = '" + f + "' is not a file in the directory");
      byFile[f].insert(name);
    }
    if (byFile.empty()) fail(where + ": weight_map is empty");
    const std::filesystem::path dir = indexPath.parent_path();
    for (const auto& [f, names] : byFile) {
      if (!std::filesystem::exists(dir / f))
        fail(where + ": weight_map names '" + f + "', but " + (dir / f).string() +
             " does not exist");
      openFile(dir / f, &names);
      for (const auto& name : names)
        if (!tensors_.contains(name))
          fail(where + ": weight_map puts tensor '" + name + "' in '" + f +
               "', but that file has no such tensor");
    }
  }

  std::string directory_;
  // Declared before tensors_, so the mappings outlive the entries that point into them.
  std::vector<std::unique_ptr<MappedFile>> files_;
  std::map<std::string, TensorInfo> tensors_;
};

}  // namespace

std::unique_ptr<WeightSource> makeDummyWeights(uint64_t seed) {
  return std::make_unique<DummyWeights>(seed);
}

std::unique_ptr<WeightSource> openSafetensors(const std::string& directory) {
  return std::make_unique<SafetensorsWeights>(directory);
}

}  // namespace vsup::engine
