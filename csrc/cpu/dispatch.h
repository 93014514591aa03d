// Which compiled copy of the CPU kernel runs: torch's CPU capability
// (torch.backends.cpu.get_cpu_capability(), which honours ATEN_CPU_CAPABILITY) capped at what
// this build contains, unless set_cpu_capability() chose a lower one (tests compare them).
#pragma once

#include <string>
#include <vector>

#include "cpu/chunk.h"

namespace sadam {

// The chunk function of the active capability.
ChunkFn pick_chunk_kernel(c10::ScalarType param, c10::ScalarType state, bool update, bool probe,
                          bool amsgrad);

std::string active_cpu_capability();
std::vector<std::string> available_cpu_capabilities();
// "DEFAULT", "AVX2" or "AVX512" (any case), at most torch's choice; "" goes back to torch's choice.
void set_cpu_capability(const std::string& name);

}  // namespace sadam
