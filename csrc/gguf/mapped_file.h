// A read-only memory mapping of a whole file; the model computes straight from it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace pg4 {

class MappedFile {
 public:
  explicit MappedFile(const std::string& path);  // throws std::runtime_error naming the problem
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

  // Copies the `bytes` of the file that the mapping shows at `at` into dst, with read calls
  // rather than through the mapping (faulting gigabytes of a mapping in page by page was
  // measured far slower in a virtual machine). Throws std::runtime_error naming the problem.
  void read(const uint8_t* at, size_t bytes, uint8_t* dst) const;

  // Locks the pages showing [at, at + bytes) in memory, read in, where the process may lock
  // that much (else asks the kernel to read them ahead): a table gathered a few rows per step
  // must not fault its rows back in from disk once the system has evicted them as cold.
  void keep_resident(const uint8_t* at, size_t bytes) const;

 private:
  std::string path_;
  int fd_ = -1;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace pg4
