"""bench/sass_report.py: the fused kernels compiled offline for sm_90 (no GPU), and what their SASS must
not contain."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

def _has_nvdisasm() -> bool:
    spec = importlib.util.find_spec("triton")
    return spec is not None and (Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "nvdisasm").exists()


pytestmark = pytest.mark.skipif(not _has_nvdisasm(), reason="needs triton with its CUDA tools (nvdisasm)")


def test_the_tps_forward_map_sums_in_registers(tmp_path):
    # The TPS forward kernels once summed the radial basis across a warp's lanes: their SASS was mostly
    # shuffles. A loop per lane needs none, and the model's launches must not spill either. Its log is the
    # hardware's lg2.approx (tu.FAST_LOG), not libdevice's logf polynomial.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "report.json"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "sass_report.py"), "--only", "^_tps_warp_fwd_kernel$",
                          "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["config"]["CHANNELS_LAST"] for r in rows} == {False, True}  # the model's two layouts
    for r in rows:
        assert r["shuffles"] == 0 and r["spill_bytes"] == 0 and 0 < r["registers"] <= 64, r
        assert r["mufu_lg2"] > 0, r
