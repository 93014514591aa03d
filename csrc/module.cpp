// The Python module sadam._C: the kernels register themselves with the dispatcher when it is
// loaded (schemas in sadam/_ops.py); this file only reports what the build contains.
#include <torch/extension.h>

#include <string>
#include <vector>

#define SADAM_STR2(x) #x
#define SADAM_STR(x) SADAM_STR2(x)

namespace {

std::vector<std::string> kernels() {
  std::vector<std::string> out{"cpu"};
#ifdef SADAM_WITH_CUDA
  out.push_back("cuda");
#endif
  return out;
}

std::string cpu_capability() {
#ifdef CPU_CAPABILITY
  return SADAM_STR(CPU_CAPABILITY);
#else
  return "DEFAULT";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "S-Adam native kernels (CPU, and CUDA when built with nvcc)";
  m.def("kernels", &kernels, "device types this build has kernels for");
  m.def("cpu_capability", &cpu_capability, "vector instruction set the CPU kernel targets");
}
