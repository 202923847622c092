// The core reports every failure as safegene::Error with a message that names the file
// and what to do; the bindings translate it to safegene._core.CoreError, and the Python
// layer re-raises it inside the SafeGeneError family.
#pragma once

#include <stdexcept>
#include <string>

namespace safegene {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& msg) : std::runtime_error(msg) {}
};

}  // namespace safegene
