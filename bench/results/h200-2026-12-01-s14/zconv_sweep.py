"""z-conv blocks, batch 8: the fused block under several epilogue settings against the unfused eager block,
GPU time (CUDA-graph replays, bench.common.time_graph_ms), one run.

Settings (ostnet_fast.kernels.zconv module constants): CONV_CHANNELS_LAST (down / same blocks convolve
channels-last inside an NCHW block), RED_TILE / RED_WARPS (the reductions' tile and warps), TILE / TILE_WARPS
(the epilogue passes'), RED_LOOP (tiles a reduction program sums), CL_BLOCK_C (channels of a channels-last
tile). The committed defaults are sweep 4's "cl 32, red 4096/4 x2" (CL_BLOCK_C=32, RED_TILE=4096,
RED_WARPS=4, RED_LOOP=2).

    PYTHONPATH=. python3 bench/results/h200-2026-12-01-s14/zconv_sweep.py [--quick] > zconv_sweep.txt

With ostnet_fast/kernels/zconv_s13.py present (not in the repository; made for the run from the session-13
commit: git show 1ce52d5:ostnet_fast/kernels/zconv.py | sed 's/ostnet::zconv_epilogue/&_s13/' > ...), a
column "s13 code" times that module's block in the same run. It shares conv2d.py (the up blocks'
sub-pixel convolution) with the current code.
"""
import importlib
import json
import os
import sys

import torch

from bench.common import env_info, time_graph_ms

zc = importlib.import_module("ostnet_fast.kernels.zconv")
DEV = "cuda"
BLOCKS = (("down", 64, 128, 256), ("down", 128, 256, 128), ("down", 256, 512, 64), ("up", 512, 256, 32),
          ("up", 128, 64, 128))
S4 = dict(CL_BLOCK_C=64, RED_TILE=4096, RED_WARPS=8, RED_LOOP=1)  # zconv_sweep4's "default"
SETTINGS = {  # zconv_sweep4's columns (each run's own are the column names of its .txt), and the layouts
    "committed": {},
    "sweep-4 default": S4,
    "red 4096/4": dict(S4, RED_WARPS=4),
    "red 4096/4 x2": dict(S4, RED_WARPS=4, RED_LOOP=2),
    "red 4096/4 x4": dict(S4, RED_WARPS=4, RED_LOOP=4),
    "red 4096/8 x2": dict(S4, RED_LOOP=2),
    "red 8192/8 x2": dict(S4, RED_TILE=8192, RED_LOOP=2),
    "red 2048/4 x4": dict(S4, RED_TILE=2048, RED_WARPS=4, RED_LOOP=4),
    "nchw conv": dict(CONV_CHANNELS_LAST=False),
}


def cases(dtype):
    for mode, cin, cout, hw in BLOCKS:
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(cin, cout, 3, padding=1).to(DEV)
        norm = torch.nn.BatchNorm2d(cout).to(DEV)
        x = (torch.rand(8, cin, hw, hw, device=DEV) * 2 - 1).to(dtype).requires_grad_(True)
        zb = (torch.rand(8, cin, device=DEV) * 2 - 1).to(dtype).requires_grad_(True)
        for training in (False, True):
            def run(fn, conv=conv, norm=norm, x=x, zb=zb, mode=mode, training=training):
                norm.train(training)
                with torch.autocast("cuda", dtype=torch.float16, enabled=dtype == torch.float16):
                    if not training:
                        with torch.no_grad():
                            return fn(x, zb, conv, norm, mode)
                    out = fn(x, zb, conv, norm, mode)
                out.backward(torch.ones_like(out))
            label = f"{mode} {cin}->{cout} @{hw} {str(dtype)[6:]} {'train fwd+bwd' if training else 'eval fwd'}"
            yield label, run, [x, zb, conv.weight, conv.bias, norm.weight, norm.bias]


def ours(x, zb, conv, norm, mode):
    return zc.zconv_block(x, zb, conv, norm, mode, impl="triton")


def earlier(x, zb, conv, norm, mode):
    return zc_s13.zconv_block(x, zb, conv, norm, mode, impl="triton")


try:  # the z-conv module of an earlier commit, for an A/B in one run (see the module docstring)
    zc_s13 = importlib.import_module("ostnet_fast.kernels.zconv_s13")
except ImportError:
    zc_s13 = None


def main():
    quick = "--quick" in sys.argv
    iters = 20 if quick else 40
    defaults = {k: getattr(zc, k) for s in SETTINGS.values() for k in s}
    rows = []
    for dtype in (torch.float32, torch.float16):
        for label, run, leaves in cases(dtype):
            base = time_graph_ms(lambda: run(zc.zconv_block_reference), iters=iters, grad_to_none=leaves)["median_ms"]
            row = dict(case=label, base_ms=base)
            for name, setting in SETTINGS.items():
                for k, v in defaults.items():
                    setattr(zc, k, setting.get(k, v))
                ms = time_graph_ms(lambda: run(ours), iters=iters, grad_to_none=leaves)["median_ms"]
                row[name] = base / ms
            for k, v in defaults.items():
                setattr(zc, k, v)
            if zc_s13 is not None:
                row["s13 code"] = base / time_graph_ms(lambda: run(earlier), iters=iters,
                                                       grad_to_none=leaves)["median_ms"]
            rows.append(row)
            print(f"{label:40s} base {base:7.3f} ms  " + "  ".join(f"{n} {v:.2f}x" for n, v in row.items()
                                                                  if n not in ("case", "base_ms")), flush=True)
    json.dump(dict(benchmark="zconv_sweep", env=env_info(), settings=SETTINGS, rows=rows),
              open(os.path.join(os.environ.get("OUT", "."), "zconv_sweep.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
