// UvHandle<T>: owns one heap-allocated libuv handle. libuv forbids freeing a handle before its
// close callback has run, so the destructor calls uv_close() and the memory is freed in the
// close callback. The loop must run at least once more after the last
// UvHandle on it is destroyed, to deliver those callbacks.
#pragma once

#include <uv.h>

#include <utility>

namespace vsup {

template <typename T>
class UvHandle {
 public:
  UvHandle() = default;
  // Allocates the handle; `init` must call the matching uv_*_init on it.
  template <typename Init>
  static UvHandle make(Init&& init) {
    UvHandle h;
    h.handle_ = new T{};
    init(h.handle_);
    return h;
  }
  UvHandle(UvHandle&& other) noexcept : handle_(std::exchange(other.handle_, nullptr)) {}
  UvHandle& operator=(UvHandle&& other) noexcept {
    if (this != &other) {
      reset();
      handle_ = std::exchange(other.handle_, nullptr);
    }
    return *this;
  }
  UvHandle(const UvHandle&) = delete;
  UvHandle& operator=(const UvHandle&) = delete;
  ~UvHandle() { reset(); }

  T* get() const { return handle_; }
  T* operator->() const { return handle_; }
  explicit operator bool() const { return handle_ != nullptr; }

  void reset() {
    if (handle_ == nullptr) return;
    auto* h = reinterpret_cast<uv_handle_t*>(std::exchange(handle_, nullptr));
    h->data = nullptr;  // callbacks already queued must not reach a dead owner
    uv_close(h, [](uv_handle_t* closed) { delete reinterpret_cast<T*>(closed); });
  }

 private:
  T* handle_ = nullptr;
};

}  // namespace vsup
