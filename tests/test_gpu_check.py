"""bench/gpu_check.py's dry run: the plan, its imports and output paths, checked without a GPU."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.py")


def test_dry_run_checks_the_plan():
    proc = subprocess.run([sys.executable, SCRIPT, "--dry-run"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "dry run: ok" in proc.stdout
    for stage in ("build", "tests", "sync", "oracle", "timing", "capture", "huge"):
        assert f"  {stage}" in proc.stdout, stage


def test_dry_run_reports_a_broken_plan(tmp_path):
    """A stage whose function is missing makes the dry run fail (the check can fail)."""
    broken = tmp_path / "gpu_check.py"
    source = open(SCRIPT).read().replace('("huge", stage_huge, 30)', '("huge", len, 30)')
    broken.write_text(source)
    path = os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])  # the copy lives outside
    proc = subprocess.run([sys.executable, str(broken), "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=path))
    assert proc.returncode == 1
    assert "stage 'huge' has no function stage_huge" in proc.stderr
