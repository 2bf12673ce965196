"""Static report of the fused kernels' sm_90 machine code, made without a GPU: registers, spills,
instructions, shuffles, barriers, shared-memory traffic and the size of the hottest loop, per kernel
and launch configuration.

How: (1) the fused model runs one training step (forward + backward) and one inference frame on small
CPU tensors under the Triton interpreter, every kernel forced, in fp32, NCHW and channels-last; each
kernel launch is recorded (argument types, constexprs, num_warps) instead of run. (2) A second process compiles every
distinct launch for sm_90 with Triton's own ptxas and reads the SASS with its nvdisasm.

This is not a timing. It is how to compare a kernel before and after a change when no GPU is at hand:
shuffle-bound reductions, register blow-ups and spills show up here. The TPS forward kernels were found
this way to be mostly warp shuffles. Static counts say nothing about memory traffic or occupancy in
practice: confirm on a GPU (bench_kernels.py).

    python bench/sass_report.py [--config ostnet-vox-256] [--size 128] [--only REGEX] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import collections
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's kernels, also when another one is installed


# -- phase 1: record the launches (runs with TRITON_INTERPRET=1) -------------------------------------------
def record_launches(config: str, size: int) -> list[dict]:
    import torch
    import triton.language as tl
    from triton._C.libtriton import native_specialize_impl  # what JITFunction.run calls on each argument
    from triton.backends.compiler import BaseBackend
    from triton.runtime.interpreter import InterpretedFunction

    from ostnet_fast import OSTNet

    launches: dict[str, dict] = {}

    def describe(value, constexpr: bool):
        """How Triton's launcher specialises the argument: its type, a value of 1 as a constant, a
        16-divisible pointer or integer marked so (the real launch's own function, not a copy)."""
        if isinstance(value, tl.dtype):
            return {"constexpr": {"tl_dtype": value.name}}
        if constexpr or value is None:
            return {"constexpr": value}
        kind, key = native_specialize_impl(BaseBackend, value, False, True, True)
        if kind == "constexpr":
            return {"constexpr": key}
        if kind.startswith("*"):
            return {"ptr": kind[1:], "div16": key == "D"}
        return {"scalar": kind, "div16": key == "D"}

    def recording_run(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        bound = dict(zip(self.arg_names, args), **kwargs)
        constexprs = {n for n, p in inspect.signature(self.fn).parameters.items()
                      if p.annotation in (tl.constexpr, "tl.constexpr")}
        spec = {"module": self.fn.__module__, "kernel": self.fn.__name__, "options": options,
                "args": {n: describe(bound[n], n in constexprs) for n in self.arg_names if n in bound}}
        launches.setdefault(json.dumps(spec, sort_keys=True), spec)
        # Not run: interpreting every kernel at the model's sizes takes many minutes, and only the launch
        # matters here. Outputs keep whatever their buffers held; shapes, and so the launches, are the same.

    InterpretedFunction.run = recording_run
    os.environ["OSTNET_IMPL"] = "triton"  # every fused op takes its kernel, on CPU through the interpreter
    torch.manual_seed(0)
    for channels_last in (False, True):
        model = OSTNet(config, fused=True).train()
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(memory_format=fmt)
        src, drv = (torch.rand(2, 3, size, size).contiguous(memory_format=fmt) for _ in range(2))
        out = model(src, drv)["prediction"]
        out.mean().backward()
        with torch.no_grad():
            model.eval()(src, drv)
    return list(launches.values())


# -- phase 2: compile and read the SASS (runs without the interpreter) ------------------------------------
def sass_stats(spec: dict, bin_dir: Path, work: Path) -> dict:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        arg = spec["args"].get(name)
        if arg is None:  # a parameter with a default the launcher did not pass
            default = fn.params[i].default
            arg = {"constexpr": default.value if hasattr(default, "value") else default}
        if "constexpr" in arg:
            value = arg["constexpr"]
            if isinstance(value, dict):
                value = tl.dtype(value["tl_dtype"])
            signature[name], constexprs[(i,)] = "constexpr", value
        else:
            signature[name] = "*" + arg["ptr"] if "ptr" in arg else arg["scalar"]
            if arg.get("div16"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=spec["options"])
    cubin = work / "k.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    sass = subprocess.run([str(bin_dir / "nvdisasm"), str(cubin)], capture_output=True, text=True, check=True).stdout
    usage = subprocess.run([str(bin_dir / "cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True,
                           text=True, check=True).stdout
    lines = [(int(a, 16), text.strip()) for a, text in re.findall(r"/\*([0-9a-f]{4,6})\*/\s+([^;]+);", sass)]
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for _, t in lines)
    labels = {m.group(1): int(m.group(2), 16) for m in re.finditer(r"\.(L_x_\d+):\s*\n\s*/\*([0-9a-f]{4,6})\*/", sass)}
    hottest = 0  # the largest body of a backward branch: the unrolled inner loop, usually
    for addr, text in lines:
        m = re.search(r"BRA\s+`\(\.(L_x_\d+)\)", text)
        if m and labels.get(m.group(1), addr) < addr:
            hottest = max(hottest, (addr - labels[m.group(1)]) // 16 + 1)
    config = {k: v["constexpr"] if not isinstance(v["constexpr"], dict) else v["constexpr"]["tl_dtype"]
              for k, v in spec["args"].items() if "constexpr" in v and k.isupper()}
    pointers = sorted({v["ptr"] for v in spec["args"].values() if "ptr" in v})
    return {"kernel": spec["kernel"], "config": config, "pointers": pointers,
            "num_warps": spec["options"].get("num_warps", 4),
            "registers": int(re.search(r"REG:(\d+)", usage).group(1)),
            "spill_bytes": int(re.search(r"LOCAL:(\d+)", usage).group(1)),
            "shared_bytes": kernel.metadata.shared, "instructions": len(lines),
            "shuffles": ops["SHFL"], "barriers": ops["BAR"], "shared_loads": ops["LDS"], "shared_stores": ops["STS"],
            "global_loads": ops["LDG"], "global_stores": ops["STG"], "atomics": ops["RED"] + ops["ATOMG"] + ops["ATOM"],
            "ffma": ops["FFMA"], "mufu": ops["MUFU"], "mufu_lg2": sum("MUFU.LG2" in t for _, t in lines),
            "hottest_loop": hottest}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="ostnet-vox-256", help="model config whose kernels are recorded")
    ap.add_argument("--size", type=int, default=128, help="image side of the recorded step (the smallest the model takes: interpreted)")
    ap.add_argument("--only", metavar="REGEX", help="report only the kernels whose name matches")
    ap.add_argument("--out", help="also write the rows as JSON here")
    ap.add_argument("--record-only", metavar="FILE", help=argparse.SUPPRESS)  # phase 1, in the child process
    args = ap.parse_args(argv)
    if args.record_only:
        Path(args.record_only).write_text(json.dumps(record_launches(args.config, args.size)))
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("sass_report: run it without TRITON_INTERPRET=1 (the compile step needs the real Triton)",
              file=sys.stderr)
        return 2
    import triton
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (bin_dir / "nvdisasm").exists():
        print(f"sass_report: this Triton has no nvdisasm in {bin_dir}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ostnet-sass-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        print("recording the kernel launches of one training step and one frame (Triton interpreter) ...", flush=True)
        subprocess.run([sys.executable, __file__, "--config", args.config, "--size", str(args.size),
                        "--record-only", str(work / "launches.json")], env=env, check=True)
        specs = [s for s in json.loads((work / "launches.json").read_text())
                 if args.only is None or re.search(args.only, s["kernel"])]
        rows: dict[str, dict] = {}
        for spec in specs:  # launches that differ only in specialisations the SASS ignores: one row
            row = sass_stats(spec, bin_dir, work)
            rows.setdefault(json.dumps(row, sort_keys=True), dict(row, launches=0))["launches"] += 1
    rows = sorted(rows.values(), key=lambda r: (r["kernel"], json.dumps(r["config"], sort_keys=True), r["pointers"]))
    cols = ["registers", "spill_bytes", "instructions", "shuffles", "barriers", "shared_loads", "atomics", "hottest_loop"]
    print(f"{'kernel':34s} {'warps':>5s} " + " ".join(f"{c[:12]:>12s}" for c in cols) + "  config")
    for r in rows:
        print(f"{r['kernel']:34s} {r['num_warps']:5d} " + " ".join(f"{r[c]:12d}" for c in cols)
              + f"  {' '.join(f'{k}={v}' for k, v in r['config'].items())} {','.join(r['pointers'])}")
    if args.out:
        Path(args.out).write_text(json.dumps({"target": "sm_90", "triton": triton.__version__, "config": args.config,
                                              "size": args.size, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
