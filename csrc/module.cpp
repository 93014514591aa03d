// The Python module sadam._C: the kernels register themselves with the dispatcher when it is
// loaded (schemas in sadam/_ops.py); this file only reports what the build contains.
#include <torch/extension.h>

#include <string>
#include <vector>

#include "cpu/dispatch.h"

namespace {

std::vector<std::string> kernels() {
  std::vector<std::string> out{"cpu"};
#ifdef SADAM_WITH_CUDA
  out.push_back("cuda");
#endif
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "S-Adam native kernels (CPU, and CUDA when built with nvcc)";
  m.def("kernels", &kernels, "device types this build has kernels for");
  m.def("cpu_capability", &sadam::active_cpu_capability,
        "vector instruction set of the CPU kernel that runs now");
  m.def("cpu_capabilities", &sadam::available_cpu_capabilities,
        "capabilities of the CPU kernel this build and this CPU can run");
  m.def("set_cpu_capability", &sadam::set_cpu_capability, pybind11::arg("name"),
        "run the CPU kernel of this capability ('' = torch's choice, the default)");
}
