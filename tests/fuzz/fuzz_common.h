// fuzz_common.h — what the libFuzzer harnesses share: the input as a file, and the checks every
// GGUFError must pass.
#pragma once
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace fuzz {

// The fuzz input as a file. The core only reads models from paths (it maps them), so the bytes
// go into one anonymous in-memory file (memfd), rewritten for every input, and the readers open
// it by its /proc/self/fd path: the real open + fstat + mmap path, with no disk I/O.
class InputFile {
  public:
    InputFile() {
        fd_ = ::memfd_create("fuzz-input.gguf", MFD_CLOEXEC);
        if (fd_ < 0) die("memfd_create failed");
        path_ = "/proc/self/fd/" + std::to_string(fd_);
    }
    const std::string& write(const uint8_t* data, size_t size) {
        if (::ftruncate(fd_, 0) != 0) die("ftruncate failed");
        for (size_t done = 0; done < size;) {
            const ssize_t n = ::pwrite(fd_, data + done, size - done, (off_t)done);
            if (n <= 0) die("pwrite failed");
            done += (size_t)n;
        }
        return path_;
    }
    static InputFile& get() {
        static InputFile f;
        return f;
    }

  private:
    [[noreturn]] static void die(const char* what) {
        std::perror(what);
        std::abort();
    }
    int fd_ = -1;
    std::string path_;
};

// A finding that is not a crash: print it and abort, so libFuzzer saves the input.
[[noreturn]] inline void report(const std::string& what) {
    std::fprintf(stderr, "FUZZ CONTRACT VIOLATION: %s\n", what.c_str());
    std::abort();
}

// The reader's contract for errors (gguf.h): the message starts with the file's path and names the
// problem in bounded space: hostile names are clipped, never echoed whole.
constexpr size_t kMaxErrorLen = 2048;
inline void check_error(const std::string& path, const char* msg) {
    const size_t n = std::strlen(msg);
    if (n > kMaxErrorLen) report("error message of " + std::to_string(n) + " bytes: " + std::string(msg, 200));
    if (std::strncmp(msg, path.c_str(), path.size()) != 0 || std::strncmp(msg + path.size(), ": ", 2) != 0)
        report(std::string("error message does not start with the file's path: ") + msg);
    if (n <= path.size() + 2) report("empty error message");
}

}  // namespace fuzz
