"""survivors_doc.py keeps each survivor's reason by name; an edit that renumbers a function's
mutants must not carry a reason onto another mutation unseen."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "mutation"))
import survivors_doc  # noqa: E402
from survivors_doc import changed_lines, keep, moved  # noqa: E402

PIN = ["-self.host = torch.zeros((), pin_memory=self.cuda)", "+self.host = torch.zeros(())"]
EVENT = ["-self.event = torch.cuda.Event()", "+self.event = None"]
NAME = "sadam.pss_trigger.xǁFlagMirrorǁ__init____mutmut_13"


def _sections():
    return {name: [] for name in (*survivors_doc.KEPT, survivors_doc.RANKS_KILLED)}


def test_changed_lines_are_the_removed_and_added_lines_without_indentation():
    patch = ("--- a.py\n+++ a.py\n@@ -1,3 +1,3 @@\n def f():\n"
             "-    self.event = torch.cuda.Event()\n+    self.event = None\n     return 1\n")
    assert changed_lines(patch) == EVENT


def test_a_reason_kept_for_another_mutation_has_moved():
    recorded = {"reason": "no CUDA event", "mutation": EVENT}
    assert moved("no CUDA event", recorded, PIN)
    assert not moved("no CUDA event", recorded, EVENT)        # the same mutant
    assert not moved("the host flag is not pinned", recorded, PIN)  # a person rewrote it
    assert not moved("no CUDA event", None, PIN)              # nothing recorded yet
    assert not moved("no CUDA event", recorded, None)         # the mutant is unknown today


def test_a_moved_line_goes_to_not_resolved_with_what_it_read():
    sections, mutations = _sections(), {}
    recorded = {NAME: {"reason": "no CUDA event", "mutation": EVENT}}
    keep(NAME, "CUDA only", "no CUDA event", recorded, lambda name: PIN, sections, mutations)
    assert sections["CUDA only"] == [] and NAME not in mutations
    [line] = sections["Not resolved"]
    assert line.startswith(f"- `{NAME}`: recheck: ")
    assert " / ".join(EVENT) in line and " / ".join(PIN) in line
    assert line.endswith("it read: CUDA only: no CUDA event")


def test_a_line_that_still_fits_is_kept_and_recorded_anew():
    sections, mutations = _sections(), {}
    recorded = {NAME: {"reason": "no CUDA event", "mutation": EVENT}}
    keep(NAME, "CUDA only", "the host flag is not pinned", recorded, lambda name: PIN, sections,
         mutations)
    assert sections["CUDA only"] == [f"- `{NAME}`: the host flag is not pinned"]
    assert sections["Not resolved"] == []
    assert mutations == {NAME: {"reason": "the host flag is not pinned", "mutation": PIN}}


def test_an_unknown_mutation_keeps_the_recorded_one():
    sections, mutations = _sections(), {}
    recorded = {NAME: {"reason": "no CUDA event", "mutation": EVENT}}
    keep(NAME, "Equivalent", "no CUDA event", recorded, lambda name: None, sections, mutations)
    assert sections["Equivalent"] == [f"- `{NAME}`: no CUDA event"]
    assert mutations[NAME]["mutation"] == EVENT


def test_lines_outside_the_explained_sections_are_kept_as_written():
    sections, mutations = _sections(), {}
    section = "Killed by tests added after the measured run"
    keep(NAME, section, "killed by tests/test_pss.py::test_x", {}, lambda name: PIN, sections,
         mutations)
    assert sections[section] == [f"- `{NAME}`: killed by tests/test_pss.py::test_x"]
    assert mutations == {}
