"""bench/bench_kernels.py on CPU: its --ops names are the ops its cases yield, and a misspelt one is refused."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "bench" / "bench_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ops_are_the_cases_ops(monkeypatch):
    bench = _load()
    monkeypatch.setattr(bench, "DEV", "cpu")  # the cases only build tensors and lambdas
    assert {case["op"] for case in bench.cases(quick=True)} == set(bench.OPS)


def test_unknown_op_is_refused(capsys):
    bench = _load()
    with pytest.raises(SystemExit) as err:
        bench.main(["--ops", "zconv"])
    assert err.value.code == 2 and "zconv_block" in capsys.readouterr().err


def test_batches(monkeypatch, capsys):
    bench = _load()
    monkeypatch.setattr(bench, "DEV", "cpu")
    shapes = lambda **kw: {case["shape"].split()[0] for case in bench.cases(**kw) if case["op"] == "tps_grid"}
    assert shapes(quick=True) == {"B8"} and shapes(quick=False) == {"B1", "B8"}
    assert shapes(quick=True, batches=(1,)) == {"B1"}
    for bad in ("1,x", "0"):
        with pytest.raises(SystemExit) as err:
            bench.main(["--batches", bad])
        assert err.value.code == 2 and "--batches" in capsys.readouterr().err
