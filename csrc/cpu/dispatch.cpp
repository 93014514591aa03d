// Run-time choice among the per-capability builds of csrc/cpu/kernel.cpp (see dispatch.h).
#include "cpu/dispatch.h"

#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cctype>

namespace sadam {
namespace {

// Ordered by vector width; a machine that runs one runs the ones before it.
enum Capability { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };
const char* const kNames[] = {"DEFAULT", "AVX2", "AVX512"};

bool built(int c) {
  switch (c) {
    case kDefault: return true;
#ifdef SADAM_CPU_AVX2
    case kAvx2: return true;
#endif
#ifdef SADAM_CPU_AVX512
    case kAvx512: return true;
#endif
    default: return false;
  }
}

// torch's capability (the best the CPU has, lowered by ATEN_CPU_CAPABILITY), capped at the build.
int torch_choice() {
  static const int choice = [] {
    const std::string torch_name = at::get_cpu_capability();  // "DEFAULT", "AVX2", "AVX512", ...
    int c = kDefault;
    for (int i = kAvx512; i > kDefault; --i)
      if (torch_name == kNames[i]) c = i;
    while (!built(c)) --c;
    return c;
  }();
  return choice;
}

std::atomic<int> chosen{-1};  // -1: torch's choice

int active() {
  const int c = chosen.load(std::memory_order_relaxed);
  return c < 0 ? torch_choice() : c;
}

}  // namespace

ChunkFn pick_chunk_kernel(c10::ScalarType param, c10::ScalarType state, bool update, bool probe,
                          bool amsgrad) {
  switch (active()) {
#ifdef SADAM_CPU_AVX512
    case kAvx512: return AVX512::pick_chunk_kernel(param, state, update, probe, amsgrad);
#endif
#ifdef SADAM_CPU_AVX2
    case kAvx2: return AVX2::pick_chunk_kernel(param, state, update, probe, amsgrad);
#endif
    default: return DEFAULT::pick_chunk_kernel(param, state, update, probe, amsgrad);
  }
}

std::string active_cpu_capability() { return kNames[active()]; }

std::vector<std::string> available_cpu_capabilities() {
  std::vector<std::string> out;
  for (int c = kDefault; c <= torch_choice(); ++c)
    if (built(c)) out.push_back(kNames[c]);
  return out;
}

void set_cpu_capability(const std::string& name) {
  if (name.empty()) {
    chosen.store(-1);
    return;
  }
  std::string upper(name);
  std::transform(upper.begin(), upper.end(), upper.begin(),
                 [](unsigned char ch) { return static_cast<char>(std::toupper(ch)); });
  for (int c = kDefault; c <= kAvx512; ++c) {
    if (upper != kNames[c]) continue;
    TORCH_CHECK_VALUE(built(c) && c <= torch_choice(), "set_cpu_capability: '", name,
                      "' is not available here; available: ", kNames[torch_choice()],
                      " and below (this build, this CPU, ATEN_CPU_CAPABILITY)");
    chosen.store(c);
    return;
  }
  TORCH_CHECK_VALUE(false, "set_cpu_capability: unknown capability '", name,
                    "'; expected DEFAULT, AVX2, AVX512 or ''");
}

}  // namespace sadam
