// fusedmoe/error.hpp — the library's error type and the host-side check macros.
//
// The library never exits: a failed precondition throws fusedmoe::Error whose message names the
// argument, its value and what is allowed, plus the file:line of the check.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace fusedmoe {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {
[[noreturn]] inline void throw_error(const char* file, int line, const std::string& message) {
  std::ostringstream os;
  os << message << " [" << file << ":" << line << "]";
  throw Error(os.str());
}
}  // namespace detail

}  // namespace fusedmoe

// FUSEDMOE_CHECK(cond, stream-expression): throws fusedmoe::Error with the streamed message.
#define FUSEDMOE_CHECK(cond, msg)                                        \
  do {                                                                   \
    if (!(cond)) {                                                       \
      std::ostringstream fusedmoe_check_os_;                             \
      fusedmoe_check_os_ << msg;                                         \
      ::fusedmoe::detail::throw_error(__FILE__, __LINE__, fusedmoe_check_os_.str()); \
    }                                                                    \
  } while (0)
