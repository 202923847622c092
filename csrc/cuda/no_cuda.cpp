// Compiled instead of kernels.cu when CUDA is off, so the module links and says why.
#include "safegene/errors.h"
#include "safegene/kernels.h"

namespace safegene {

bool cuda_built() { return false; }
bool cuda_device_available() { return false; }

void scale_add_cuda(const std::vector<MutSpan>&, const std::vector<ConstSpan>&, const std::vector<float>&, void*) {
  throw Error("safegene was built without CUDA; rebuild with SAFEGENE_CUDA=ON to use CUDA tensors");
}

std::vector<double> dot_cuda(const std::vector<ConstSpan>&, const std::vector<ConstSpan>&, void*) {
  throw Error("safegene was built without CUDA; rebuild with SAFEGENE_CUDA=ON to use CUDA tensors");
}

}  // namespace safegene
