"""The study end to end on a tiny budget: records, resuming after an interruption, the CLI."""
import json

import pytest

from sadam.study import study as study_module
from sadam.study.__main__ import main
from sadam.study.store import ResultStore
from sadam.study.study import StudyConfig, run_study

REAL_RUN = study_module.run


def _tiny(out, **kw):
    settings = dict(tasks=("hinge_mlp",), optimizers=("sadam_grad_group", "adamw"),
                    controls=("adamw_ctl_grad",), grid=(1e-3, 1e-2), seeds=2, out=str(out),
                    steps=4)
    settings.update(kw)
    return StudyConfig(**settings)


def _count_runs(monkeypatch, fail_after=None):
    calls = []

    def counting_run(spec):
        if fail_after is not None and len(calls) == fail_after:
            raise KeyboardInterrupt
        calls.append(spec.key)
        return REAL_RUN(spec)

    monkeypatch.setattr(study_module, "run", counting_run)
    return calls


def test_study_records_every_planned_run_with_its_measurements(tmp_path, monkeypatch):
    cfg = _tiny(tmp_path)
    calls = _count_runs(monkeypatch)
    store = run_study(cfg)
    # 2 optimizers x (2 lrs + 1 extra seed) + 1 control x 2 seeds
    assert len(calls) == cfg.total_runs() == 8
    lines = (tmp_path / "study.jsonl").read_text().splitlines()
    assert len(lines) == 8 and len(store.records) == 8
    records = [json.loads(x) for x in lines]
    sadam_run = next(r for r in records if r["optimizer"] == "sadam_grad_group")
    assert len(sadam_run["rho"]) == 4 and len(sadam_run["gamma"][0]) == 1
    assert 0 <= sadam_run["rho"][-1][0] <= 1 and sadam_run["backend"]
    controls = [r for r in records if r["optimizer"] == "adamw_ctl_grad"]
    picked = study_module.picked_lr(store, cfg, "hinge_mlp", "sadam_grad_group")
    gammas = [r["gamma"] for r in records
              if r["optimizer"] == "sadam_grad_group" and r["lr"] == picked]
    mean_gamma = sum(g[0] for run in gammas for g in run) / sum(len(run) for run in gammas)
    assert controls[0]["lr"] == pytest.approx(picked * mean_gamma, rel=1e-3)
    assert mean_gamma < 1  # the control really runs at a smaller step than S-Adam's lr


def test_interrupted_study_keeps_finished_runs_and_a_rerun_does_only_the_rest(tmp_path,
                                                                               monkeypatch):
    cfg = _tiny(tmp_path)
    _count_runs(monkeypatch, fail_after=3)
    with pytest.raises(KeyboardInterrupt):
        run_study(cfg)
    saved = ResultStore(str(tmp_path / "study.jsonl")).records
    assert len(saved) == 3
    with open(tmp_path / "study.jsonl", "a") as f:
        f.write('{"key": "torn line')  # a write cut short by the interruption
    calls = _count_runs(monkeypatch)
    run_study(cfg)
    assert len(calls) == 5 and not set(calls) & set(saved)
    calls = _count_runs(monkeypatch)
    run_study(cfg)
    assert calls == []  # everything done: nothing reruns
    assert len(ResultStore(str(tmp_path / "study.jsonl")).records) == 8


def test_cli_quick_on_a_tiny_budget_prints_the_table_and_writes_the_plots(tmp_path, capsys):
    assert main(["--quick", "--jobs", "1", "--steps", "3", "--grid", "0.001,0.01",
                 "--seeds", "2", "--optimizers", "sadam_grad_tensor,adamw", "--controls", "",
                 "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| qat2_digits | sadam_grad_tensor |" in printed and "| qat2_digits | adamw |" in printed
    assert f"table: {tmp_path}/table.md" in printed
    for name in ("accuracy", "rho_heatmap", "rho_gamma", "oscillation"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
        assert f"plot: {tmp_path}/{name}.png" in printed
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {r["optimizer"] for r in summary["rows"]} == {"sadam_grad_tensor", "adamw"}
    assert all(r["seeds"] == 2 for r in summary["rows"])


def test_report_only_summarizes_a_partial_result_file_without_training(tmp_path, monkeypatch,
                                                                       capsys):
    args = ["--quick", "--jobs", "1", "--steps", "3", "--grid", "0.001,0.01", "--seeds", "2",
            "--controls", "", "--optimizers", "sadam_grad_group,adamw", "--out", str(tmp_path),
            "--no-plots"]
    _count_runs(monkeypatch, fail_after=3)  # stops inside adamw's grid: a partial file
    assert main(args) == 130
    capsys.readouterr()
    calls = _count_runs(monkeypatch)
    assert main(args + ["--report-only"]) == 0
    printed = capsys.readouterr().out
    assert calls == []
    assert "| qat2_digits | sadam_grad_group |" in printed and "| qat2_digits | adamw |" in printed


@pytest.mark.parametrize("option", ["--optimizers", "--tasks", "--controls"])
def test_cli_rejects_unknown_names_naming_the_option(option, capsys):
    with pytest.raises(SystemExit):
        main([option, "lion"])
    err = capsys.readouterr().err
    assert option in err and "lion" in err


def test_timing_measures_every_optimizer_and_reports_the_ratio_to_adamw():
    from sadam.study.timing import markdown, time_task
    times = time_task("hinge_mlp", ("adamw", "sadam_grad_group"), chunks=2, chunk_steps=1,
                      warmup=1)
    assert set(times) == {"adamw", "sadam_grad_group"} and all(v > 0 for v in times.values())
    table = markdown({"hinge_mlp": times})
    assert "| hinge_mlp | adamw |" in table and "| 1.00 |" in table
    ratio = times["sadam_grad_group"] / times["adamw"]
    assert f"| {ratio:.2f} |" in table


def test_progress_count_covers_exactly_the_planned_runs_already_done(tmp_path):
    from sadam.study.study import known_plan
    cfg = _tiny(tmp_path, controls=())
    store = run_study(cfg)
    assert sorted(known_plan(store, cfg)) == sorted(store.records)
    more_seeds = _tiny(tmp_path, controls=(), seeds=3)  # one more seed per optimizer planned
    assert sum(key in store for key in known_plan(store, more_seeds)) == cfg.total_runs()
