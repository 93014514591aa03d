"""Print what ``mutmut run`` should be named for MODULE, so that a stopped gate resumes.

mutmut reruns every mutant it is named (a glob included) and keeps the other verdicts only
when it is named none. The gate runs module by module, so it names them, and a second run would
start each module over: hours of work for ``sadam.optimizer`` alone. This prints the module's
mutants with no verdict yet, or the module's glob where there is nothing to resume from: no
mutants generated for it yet, or its source edited after its last verdict (mutmut regenerates
it, and every mutant must run again). It prints nothing when every mutant has a verdict.

Usage, from the repository root: ``python tests/mutation/pending.py sadam.optimizer``.
"""
import json
import sys
from pathlib import Path

MUTANTS = Path("mutants")


def sources(module):
    """The files of a module or package, sadam.distributed -> sadam/distributed/*.py."""
    path = Path(*module.split("."))
    if path.with_suffix(".py").exists():
        return [path.with_suffix(".py")]
    if path.is_dir():
        return sorted(path.glob("*.py"))
    raise SystemExit(f"pending.py: no module {module!r} (neither {path}.py nor {path}/)")


def pending(module):
    names = []
    for source in sources(module):
        meta = MUTANTS / f"{source}.meta"
        if not meta.exists() or source.stat().st_mtime > meta.stat().st_mtime:
            return [f"{module}.*"]
        verdicts = json.loads(meta.read_text())["exit_code_by_key"]
        names += sorted(name for name, code in verdicts.items() if code is None)
    return names


if __name__ == "__main__":
    for module in sys.argv[1:]:
        for name in pending(module):
            print(name)
