#include "gguf/mapped_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <stdexcept>

namespace pg4 {

namespace {
std::runtime_error os_error(const std::string& what, const std::string& path) {
  return std::runtime_error(what + " '" + path + "': " + std::strerror(errno));
}
}  // namespace

MappedFile::MappedFile(const std::string& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw os_error("cannot open", path);
  struct stat st{};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    throw os_error("cannot stat", path);
  }
  if (!S_ISREG(st.st_mode) || st.st_size <= 0) {
    ::close(fd);
    throw std::runtime_error("not a regular non-empty file: '" + path + "'");
  }
  size_ = static_cast<size_t>(st.st_size);
  void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
  if (p == MAP_FAILED) {
    ::close(fd);
    throw os_error("cannot map", path);
  }
  data_ = static_cast<const uint8_t*>(p);
  fd_ = fd;
}

MappedFile::~MappedFile() {
  if (data_ != nullptr) ::munmap(const_cast<uint8_t*>(data_), size_);
  if (fd_ >= 0) ::close(fd_);
}

void MappedFile::read(const uint8_t* at, size_t bytes, uint8_t* dst) const {
  if (at < data_ || bytes > size_ || static_cast<size_t>(at - data_) > size_ - bytes) {
    throw std::out_of_range("read outside the file '" + path_ + "'");
  }
  off_t offset = static_cast<off_t>(at - data_);
  while (bytes > 0) {
    const ssize_t got = ::pread(fd_, dst, bytes, offset);
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) throw os_error("cannot read", path_);
    if (got == 0) throw std::runtime_error("'" + path_ + "' ended early");
    dst += got;
    offset += got;
    bytes -= static_cast<size_t>(got);
  }
}

void MappedFile::keep_resident(const uint8_t* at, size_t bytes) const {
  if (at < data_ || bytes > size_ || static_cast<size_t>(at - data_) > size_ - bytes) {
    throw std::out_of_range("range outside the file '" + path_ + "'");
  }
  const auto page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t begin = reinterpret_cast<uintptr_t>(at) & ~(page - 1);
  const size_t length = reinterpret_cast<uintptr_t>(at) + bytes - begin;
  void* start = reinterpret_cast<void*>(begin);
  // Without the privilege or the limit to lock that much, reading ahead is the best left.
  if (::mlock(start, length) != 0) ::madvise(start, length, MADV_WILLNEED);
}

}  // namespace pg4
