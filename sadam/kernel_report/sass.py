"""What a compiled kernel does per element, read from its sm_90 SASS (no GPU needed).

Backend-neutral: give it a cubin (bytes or a path) and a kernel name; it runs ``cuobjdump`` from
the CUDA toolkit (or the copy bundled with Triton's NVIDIA backend) and returns a
:class:`KernelStats`:

* ``registers``, ``local_bytes`` (spill/stack memory per thread), ``static_shared_bytes``
  from ``cuobjdump -res-usage``; ``spill_instructions`` counts STL/LDL in the whole kernel;
* ``loop``: the steady-state element loop, a :class:`Loop` -- the instructions between a backward
  branch and its target (the back-edge), chosen as the loop with the most global-memory traffic
  (ties: the widest accesses, then the fewest instructions: the unmasked, vectorized full-block
  loop rather than a masked tail).

Per-element figures come from :meth:`Loop.per_element`: elements per loop trip are derived from
the bytes the trip loads (``read_bytes_per_element`` is given by the caller), so unrolling by the
compiler does not change the answer. All counts are warp-level (one SASS instruction issues for
the 32 lanes of a warp).

API::

    stats = analyze(cubin, "multi_tensor_step_kernel", dynamic_shared_bytes=0)
    stats.registers, stats.spills, stats.shared_bytes
    stats.loop.barriers, stats.loop.access_bits, stats.loop.per_element(16)
"""
import functools
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", re.IGNORECASE)
_FUNCTION = re.compile(r"Function\s*:\s*(\S+)")  # cuobjdump -sass
_RESOURCE_FUNCTION = re.compile(r"Function\s+([^\s:]+)\s*:")  # cuobjdump -res-usage
_BRANCH_TARGET = re.compile(r"\b(?:BRA|BRX|JMP)\S*\s+(?:[^0-9`]*?)(0x[0-9a-f]+)", re.IGNORECASE)
_WIDTH = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}


def find_tool(name: str) -> str:
    """Path of a CUDA binary tool (``cuobjdump``, ``nvdisasm``): $CUDA_HOME/bin, /usr/local/cuda/bin,
    PATH, then the copy shipped in Triton's NVIDIA backend. Raises FileNotFoundError."""
    candidates = [os.path.join(os.environ[v], "bin", name)
                  for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    candidates.append(os.path.join("/usr/local/cuda/bin", name))
    found = shutil.which(name)
    if found:
        candidates.append(found)
    try:
        import triton.backends.nvidia as nvidia
        candidates.append(os.path.join(os.path.dirname(nvidia.__file__), "bin", name))
    except ImportError:
        pass
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError(f"{name} not found (CUDA toolkit or triton's NVIDIA backend)")


@dataclass
class Instruction:
    address: int
    predicate: str  # "@P0", "@!PT", ... or ""
    opcode: str  # "LDG.E.128", "FFMA", ...
    operands: str

    @property
    def global_bits(self) -> int:
        """Width in bits of a global load/store (LDG/STG), else 0."""
        base = self.opcode.split(".")[0]
        if base not in ("LDG", "STG"):
            return 0
        for part in self.opcode.split(".")[1:]:
            if part in _WIDTH:
                return _WIDTH[part]
        return 32


@dataclass
class Loop:
    """The instructions of one loop body [start, end] (end = the backward branch)."""
    start: int
    end: int
    instructions: List[Instruction] = field(repr=False)

    @property
    def count(self) -> int:
        """Warp-level SASS instructions per trip (NOPs excluded)."""
        return sum(1 for i in self.instructions if i.opcode != "NOP")

    @property
    def barriers(self) -> int:
        return sum(1 for i in self.instructions if i.opcode.startswith("BAR"))

    def _bits(self, op: str) -> int:
        return sum(i.global_bits for i in self.instructions if i.opcode.startswith(op))

    @property
    def load_bytes_per_thread(self) -> int:
        return self._bits("LDG") // 8

    @property
    def store_bytes_per_thread(self) -> int:
        return self._bits("STG") // 8

    @property
    def access_bits(self) -> int:
        """The widest global load or store in the loop."""
        return max((i.global_bits for i in self.instructions), default=0)

    @property
    def global_accesses(self) -> int:
        return sum(1 for i in self.instructions if i.global_bits)

    def elements_per_trip(self, read_bytes_per_element: float) -> float:
        """Elements one warp handles per trip, from the bytes its loads bring in."""
        return 32 * self.load_bytes_per_thread / read_bytes_per_element

    def per_element(self, read_bytes_per_element: float) -> float:
        """Warp-level SASS instructions per element in the steady state."""
        return self.count / self.elements_per_trip(read_bytes_per_element)


@dataclass
class KernelStats:
    name: str
    registers: int
    local_bytes: int
    static_shared_bytes: int
    dynamic_shared_bytes: int
    spill_instructions: int
    instructions: List[Instruction] = field(repr=False)
    loops: List[Loop] = field(repr=False)
    loop: Optional[Loop]

    @property
    def spills(self) -> int:
        """Bytes of local memory per thread (spills and stack); 0 for a kernel that fits."""
        return self.local_bytes

    @property
    def shared_bytes(self) -> int:
        return self.static_shared_bytes + self.dynamic_shared_bytes


def _run(tool: str, *args: str) -> str:
    return subprocess.run([find_tool(tool), *args], check=True, capture_output=True,
                          text=True).stdout


def _with_file(cubin: Union[bytes, str], fn):
    if isinstance(cubin, (bytes, bytearray)):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            return fn(f.name)
    return fn(cubin)


def _parse_sass(text: str) -> Dict[str, List[Instruction]]:
    functions: Dict[str, List[Instruction]] = {}
    current = None
    for line in text.splitlines():
        m = _FUNCTION.search(line)
        if m:
            current = functions.setdefault(m.group(1), [])
            continue
        m = _INSTRUCTION.search(line)
        if m and current is not None:
            body = m.group(2).strip()
            predicate = ""
            if body.startswith("@"):
                predicate, body = body.split(None, 1)
            opcode, _, operands = body.partition(" ")
            current.append(Instruction(int(m.group(1), 16), predicate, opcode, operands.strip()))
    return functions


def _parse_resources(text: str) -> Dict[str, Dict[str, int]]:
    out, current = {}, None
    for line in text.splitlines():
        m = _RESOURCE_FUNCTION.search(line)
        if m:
            current = m.group(1)
            continue
        if current and "REG:" in line:
            out[current] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
            current = None
    return out


def loops_of(instructions: List[Instruction]) -> List[Loop]:
    """Every backward branch and the body it closes, in address order."""
    by_address = {i.address: n for n, i in enumerate(instructions)}
    loops = []
    for n, ins in enumerate(instructions):
        if not ins.opcode.startswith(("BRA", "JMP")):
            continue
        m = _BRANCH_TARGET.search(f"{ins.opcode} {ins.operands}")
        if not m:
            continue
        target = int(m.group(1), 16)
        if target <= ins.address and target in by_address:
            loops.append(Loop(target, ins.address, instructions[by_address[target]:n + 1]))
    return loops


def element_loop(loops: List[Loop]) -> Optional[Loop]:
    """The steady-state element loop: the most global traffic per trip, then the widest accesses
    (the vectorized full-block loop rather than a masked tail), then the fewest instructions."""
    moving = [lp for lp in loops if lp.global_accesses]
    if not moving:
        return None
    return max(moving, key=lambda lp: (lp.load_bytes_per_thread + lp.store_bytes_per_thread,
                                       lp.access_bits, -lp.count))


def innermost(loops: List[Loop]) -> List[Loop]:
    """Loops that contain no other loop (a persistent grid's chunk loop holds the element loops,
    and would otherwise count their traffic as its own)."""
    return [lp for lp in loops
            if not any(o is not lp and lp.start <= o.start and o.end <= lp.end
                       and (o.start, o.end) != (lp.start, lp.end) for o in loops)]


@functools.lru_cache(maxsize=8)
def _disassembly(data: bytes):
    """Every function's SASS and resources of one cubin, parsed once: a cubin with many kernels
    is asked about each of them in turn."""
    sass = _with_file(data, lambda path: _run("cuobjdump", "-sass", path))
    resources = _with_file(data, lambda path: _run("cuobjdump", "-res-usage", path))
    return _parse_sass(sass), _parse_resources(resources)


def analyze(cubin: Union[bytes, str], kernel: str, dynamic_shared_bytes: int = 0) -> KernelStats:
    """Resources and the steady-state loop of ``kernel`` (a substring of the mangled name is
    enough) in ``cubin`` (bytes or a file path)."""
    if not isinstance(cubin, (bytes, bytearray)):
        with open(cubin, "rb") as f:
            cubin = f.read()
    functions, all_resources = _disassembly(bytes(cubin))
    names = [n for n in functions if kernel in n]
    if not names:
        raise KeyError(f"{kernel} not in cubin (functions: {sorted(functions)})")
    name = min(names, key=len)
    instructions = functions[name]
    res = all_resources.get(name, {})
    loops = loops_of(instructions)
    return KernelStats(
        name=name, registers=res.get("REG", 0),
        local_bytes=max(res.get("LOCAL", 0), res.get("STACK", 0)),
        static_shared_bytes=res.get("SHARED", 0), dynamic_shared_bytes=dynamic_shared_bytes,
        spill_instructions=sum(1 for i in instructions if i.opcode.split(".")[0] in ("STL", "LDL")),
        instructions=instructions, loops=loops, loop=element_loop(loops))
