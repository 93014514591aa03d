"""bench/plot.py reads the extra_info convention of the benchmark suites and draws the chart."""
import importlib.util
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _plot_module():
    spec = importlib.util.spec_from_file_location("bench_plot", ROOT / "bench" / "plot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench(name, group, params=None, ratio=None, series=None):
    info = {} if params is None else {"params": params, "ratio_vs_fused_adamw": ratio}
    if series:
        info["series"] = series
    return {"name": name, "fullname": f"bench/bench_x.py::{name}", "group": group,
            "extra_info": info}


def test_series_groups_by_label_sorts_by_size_and_skips_benchmarks_without_the_convention(
        tmp_path, capsys):
    plot = _plot_module()
    results = {"datetime": "2026-01-01T00:00:00", "benchmarks": [
        _bench("test_step[1000000]", "triton", 1_000_000, 0.9),
        _bench("test_step[1000]", "triton", 1000, 2.5),
        _bench("test_cpu[1000]", None, 1000, 1.5, series="cpu lag=1"),
        _bench("test_fused_adamw[1000]", "baseline"),
    ]}
    lines, skipped = plot.series(results)
    assert lines == {"cpu lag=1": [(1000, 1.5)], "triton": [(1000, 2.5), (1_000_000, 0.9)]}
    assert skipped == ["bench/bench_x.py::test_fused_adamw[1000]"]
    path = tmp_path / "some-machine.json"
    path.write_text(json.dumps(results))
    assert plot.main([str(path)]) == 0
    assert (tmp_path / "some-machine.png").stat().st_size > 1000
    assert "test_fused_adamw" in capsys.readouterr().err


def test_machine_name_is_file_name_safe():
    name = _plot_module().machine_name()
    assert name and all(c.isalnum() or c in "_.-" for c in name)
