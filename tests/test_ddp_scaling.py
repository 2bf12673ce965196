"""bench/ddp_scaling.py on CPU (gloo): 1 and 2 processes, ranks identical, rank 0's checkpoint resumes on 1."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ddp_scaling_runs_on_two_cpu_processes(tmp_path):
    config = tmp_path / "tiny16.yaml"  # the tiny model, 16 samples of the bundled clip per epoch
    text = (ROOT / "tests" / "configs" / "tiny.yaml").read_text()
    config.write_text(text.replace("num_repeats: 1", "num_repeats: 16").replace("num_epochs: 1", "num_epochs: 10"))
    spec = importlib.util.spec_from_file_location("ddp_scaling", ROOT / "bench" / "ddp_scaling.py")
    ddp_scaling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ddp_scaling)
    out = tmp_path / "out"
    code = ddp_scaling.main(["--out", str(out), "--device", "cpu", "--config", str(config), "--steps", "3",
                             "--batch-size", "2", "--num-workers", "0", "--log-every", "1"])
    result = json.loads((out / "ddp_scaling.json").read_text())
    assert code == 0, result
    assert result["ranks_identical"] and result["resumed_on_1_to_step"] == 5
    assert result["samples_per_s"]["1"] > 0 and result["samples_per_s"]["2"] > 0
    assert ddp_scaling.main(["--out", str(out), "--device", "cpu"]) == 2  # refuses an earlier run's folder
