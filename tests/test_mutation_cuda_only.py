"""tests/mutation/cuda_only.py: the GPU check of the mutants docs/mutation-survivors.md lists as
"CUDA only" must judge what it claims, fit the current source and never touch the checkout."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "mutation"))
import cuda_only  # noqa: E402  (needs the path above)


def test_apply_patch_follows_moved_code_and_refuses_one_that_no_longer_fits():
    original = "".join(f"line {i}\n" for i in range(20))
    mutated = original.replace("line 10\n", "LINE 10\n")
    patch = cuda_only.make_patch("f.py", original, mutated)
    assert cuda_only.patch_path(patch) == "f.py"
    assert cuda_only.apply_patch(original, patch) == mutated
    moved = "new 1\nnew 2\n" + original
    assert cuda_only.apply_patch(moved, patch) == "new 1\nnew 2\n" + mutated
    with pytest.raises(ValueError, match="0 times"):
        cuda_only.apply_patch(original.replace("line 9\n", "line nine\n"), patch)
    # the same lines twice: the hunk's own line decides, a copy elsewhere is left alone
    twice = original + original
    assert cuda_only.apply_patch(twice, patch) == mutated + original
    with pytest.raises(ValueError, match="2 times"):
        cuda_only.apply_patch("x\n" + twice, patch)


def test_a_line_that_says_as_another_takes_its_tests_and_keeps_its_own():
    reasons = {
        "m.x_f__mutmut_1": "killed on a GPU by tests/test_a.py::test_one[cuda] (and more)",
        "m.x_f__mutmut_2": "as `_1`.",
        "m.x_g__mutmut_5": "as `m.x_f__mutmut_2` (its copy); killed on a GPU by "
                           "tests/test_b.py::test_two",
        "m.x_g__mutmut_6": "as `_6`.",  # a loop names nothing
    }
    assert cuda_only.named_tests("m.x_f__mutmut_2", reasons) == ["tests/test_a.py::test_one[cuda]"]
    assert cuda_only.named_tests("m.x_g__mutmut_5", reasons) == [
        "tests/test_b.py::test_two", "tests/test_a.py::test_one[cuda]"]
    assert cuda_only.named_tests("m.x_g__mutmut_6", reasons) == []


def test_every_cuda_only_survivor_has_a_patch_that_fits_the_source_and_tests_that_exist():
    entries = json.loads(cuda_only.ENTRIES.read_text())
    names = [entry["mutant"] for entry in entries]
    assert sorted(names) == sorted(cuda_only.cuda_only_lines()), \
        "tests/mutation/cuda_only.json is not the doc's CUDA-only list: run its `export`"
    for entry in entries:
        source = (ROOT / cuda_only.patch_path(entry["patch"])).read_text()
        mutated = cuda_only.apply_patch(source, entry["patch"])
        assert mutated != source, entry["mutant"]
        ast.parse(mutated)
        assert entry["tests"], entry["mutant"]
    tests = sorted({test for entry in entries for test in entry["tests"]})
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *tests],
        cwd=ROOT, capture_output=True, text=True)
    assert collected.returncode == 0, collected.stdout[-2000:] + collected.stderr[-2000:]


def test_check_kills_a_mutant_its_test_fails_keeps_one_it_passes_and_never_judges_a_skip(tmp_path):
    path = "sadam/_validation.py"
    source = (ROOT / path).read_text()
    rejected = source.replace('raise ValueError(f"SAdam does not support complex',
                              'raise RuntimeError(f"SAdam does not support complex')
    reworded = source.replace("parameters ({where}); optimize", "parameters ({where}), optimize")
    assert rejected != source and reworded != source
    complex_test = "tests/test_bad_input.py::test_complex_parameters_are_rejected"
    cuda_test = "tests/test_pss.py::test_spikes_fire_on_cuda_once_the_flag_has_landed"
    entries = [
        {"mutant": "killed", "tests": [complex_test],
         "patch": cuda_only.make_patch(path, source, rejected)},
        {"mutant": "survived", "tests": [complex_test],
         "patch": cuda_only.make_patch(path, source, reworded)},
        {"mutant": "skipped", "tests": [cuda_test],
         "patch": cuda_only.make_patch(path, source, reworded)},
    ]
    (tmp_path / "entries.json").write_text(json.dumps(entries))
    out = tmp_path / "verdicts.json"
    rc = cuda_only.main(["check", "--entries", str(tmp_path / "entries.json"), "--out", str(out),
                         "--workers", "1", "--timeout", "300"])
    report = json.loads(out.read_text())
    verdicts = {name: result["verdict"] for name, result in report["mutants"].items()}
    gpu = torch.cuda.is_available()
    assert verdicts == {"killed": "killed", "survived": "survived",
                        "skipped": "survived" if gpu else "not run"}
    assert rc == 1  # not every mutant was killed
    assert complex_test in report["mutants"]["killed"]["why"]
    if not gpu:
        assert "skipped: needs a CUDA device" in report["mutants"]["skipped"]["why"]
    assert report["unmutated"][complex_test] == "passed"
    assert (ROOT / path).read_text() == source  # the mutants ran in a copy


def test_a_teardown_error_after_a_skip_is_an_error_not_a_skip(tmp_path):
    """junit records both in one case; the mutant broke something, so it must count as killed."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_case.py").write_text(
        "import pytest\n\n"
        "@pytest.fixture\n"
        "def breaks_on_teardown():\n"
        "    yield\n"
        "    raise RuntimeError('teardown')\n\n"
        "def test_skips(breaks_on_teardown):\n"
        "    pytest.skip('skips here')\n\n"
        "def test_only_skips():\n"
        "    pytest.skip('skips here')\n")
    cases, timed_out, _ = cuda_only.run_tests(tmp_path, ["tests/test_case.py"], timeout=120)
    assert timed_out is None
    assert cases == {"tests/test_case.py::test_skips": "error",
                     "tests/test_case.py::test_only_skips": "skipped: skips here"}
