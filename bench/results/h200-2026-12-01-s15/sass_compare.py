"""Compare the SASS of csrc/ext/grid_sample_small_c.cu's kernels between two git revisions, without a GPU:
the device code is cut from the file (no torch headers needed), compiled with nvcc -cubin for sm_90a and
disassembled with nvdisasm (pip package nvidia-cuda-nvdisasm), then each kernel's instructions compared.

    python3 bench/results/h200-2026-12-01-s15/sass_compare.py OLD_REV [NEW_REV]   (NEW_REV: the working tree)
"""
import re
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = "csrc/ext/grid_sample_small_c.cu"
ARGS = "(const float*, const float4*, const float2*, float4*, float2*, int, int, int, int64_t, int64_t)"


def device_code(text: str) -> str:
    text = text.replace("#include <torch/extension.h>", "#include <cstdint>\n#include <cuda_runtime.h>")
    text = re.sub(r"#include <c10/[^>]*>\n", "", text)
    body = text[:text.index("unsigned int blocks_for")].replace("namespace {", "namespace k {", 1)
    inst = "".join(f"template __global__ void k::backward_kernel<{a}, {b}>{ARGS};\n"
                   for a, b in (("true", "true"), ("true", "false"), ("false", "true")))
    return body + "}  // namespace k\n" + inst


def kernels(text: str, tmp: Path, tag: str, nvdisasm: str) -> dict:
    cu, cubin = tmp / f"{tag}.cu", tmp / f"{tag}.cubin"
    cu.write_text(device_code(text))
    subprocess.run(["nvcc", "-cubin", "-std=c++17", "-arch=sm_90a", "-O3", str(cu), "-o", str(cubin)],
                   check=True, capture_output=True)
    sass = subprocess.run([nvdisasm, "-c", str(cubin)], check=True, capture_output=True, text=True).stdout
    out, cur = {}, None
    for line in sass.splitlines():
        m = re.match(r"\.text\.(\S+):", line.strip())
        if m:
            cur = out.setdefault(m.group(1), [])
        elif cur is not None and line.strip():
            cur.append(re.sub(r"/\*[0-9a-f]*\*/|\.reuse", "", line).strip())
    return out


def main():
    nvdisasm = subprocess.run(["python3", "-c", "import nvidia, pathlib; print(next(pathlib.Path(nvidia.__path__[0])"
                               ".rglob('nvdisasm')))"], capture_output=True, text=True).stdout.strip() or "nvdisasm"
    old = subprocess.run(["git", "show", f"{sys.argv[1]}:{SRC}"], check=True, capture_output=True, text=True).stdout
    new = (subprocess.run(["git", "show", f"{sys.argv[2]}:{SRC}"], check=True, capture_output=True, text=True).stdout
           if len(sys.argv) > 2 else Path(SRC).read_text())
    with tempfile.TemporaryDirectory() as d:
        a, b = kernels(old, Path(d), "old", nvdisasm), kernels(new, Path(d), "new", nvdisasm)
    for name in sorted(set(a) | set(b)):
        x, y = a.get(name, []), b.get(name, [])
        verdict = ("same instructions, same order" if x == y else
                   "same instructions, other order" if sorted(x) == sorted(y) else "DIFFERENT")
        print(f"{name[:60]:60s} {verdict} ({len(x)} / {len(y)} lines)")


if __name__ == "__main__":
    main()
