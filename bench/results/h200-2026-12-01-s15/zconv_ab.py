"""z-conv blocks, batch 8: the committed fused block and the block of other module copies, each against the
unfused eager block, GPU time (CUDA-graph replays, bench.common.time_graph_ms), one run.

    PYTHONPATH=. python3 bench/results/h200-2026-12-01-s15/zconv_ab.py [--quick] [NAME=MODULE ...] > zconv_ab.txt

NAME=MODULE: a column NAME timing the block of ostnet_fast.kernels.MODULE, a copy of zconv.py from another
commit made for the run (not in the repository), its custom-op names renamed so both register, e.g.
    git show 6212a45:ostnet_fast/kernels/zconv.py | sed 's/ostnet::zconv_epilogue/&_prev/' \\
        > ostnet_fast/kernels/zconv_prev.py
It shares conv2d.py with the committed code.
"""
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

from bench.common import env_info, time_graph_ms

# The blocks and their run functions are session 14's sweep's (its folder's name is no module name).
_spec = importlib.util.spec_from_file_location(
    "zconv_sweep", Path(__file__).resolve().parents[1] / "h200-2026-12-01-s14" / "zconv_sweep.py")
_sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_sweep)
cases = _sweep.cases


def main():
    quick = "--quick" in sys.argv
    iters = 20 if quick else 40
    columns = {"committed": importlib.import_module("ostnet_fast.kernels.zconv")}
    for arg in sys.argv[1:]:
        if "=" in arg:
            name, module = arg.split("=", 1)
            columns[name] = importlib.import_module(f"ostnet_fast.kernels.{module}")
    ref = columns["committed"].zconv_block_reference
    rows = []
    for dtype in (torch.float32, torch.float16):
        for label, run, leaves in cases(dtype):
            base = time_graph_ms(lambda: run(ref), iters=iters, grad_to_none=leaves)["median_ms"]
            row = dict(case=label, base_ms=base)
            for name, mod in columns.items():
                def fused(x, zb, conv, norm, mode, mod=mod):
                    return mod.zconv_block(x, zb, conv, norm, mode, impl="triton")
                row[name] = base / time_graph_ms(lambda: run(fused), iters=iters, grad_to_none=leaves)["median_ms"]
            rows.append(row)
            print(f"{label:40s} base {base:7.3f} ms  " + "  ".join(f"{n} {v:.3f}x" for n, v in row.items()
                                                                  if n not in ("case", "base_ms")), flush=True)
    json.dump(dict(benchmark="zconv_ab", env=env_info(), columns=list(columns), rows=rows),
              open(os.path.join(os.environ.get("OUT", "."), "zconv_ab.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
