"""Should batch-1 up blocks take the low-resolution (subpixel) convolution too? bench_kernels' z-conv rows at
batch 1, alternately with conv2d.SUBPIXEL_FROM as committed (2**22 output values: the upsampled convolution
at batch 1) and at 0 (every eager up block on the low-resolution map), two rounds each, in one process.
Run from the repo root on a GPU: python3 <this file> OUT_DIR."""
import importlib
import os
import sys

conv2d = importlib.import_module("ostnet_fast.kernels.conv2d")  # the module (the package re-exports its function)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # bench/
import bench_kernels  # noqa: E402

out = sys.argv[1]
committed = conv2d.SUBPIXEL_FROM
for round_ in (1, 2):
    for name, threshold in (("upsampled", committed), ("subpixel", 0)):
        conv2d.SUBPIXEL_FROM = threshold
        print(f"=== round {round_}: {name} (SUBPIXEL_FROM={threshold}) ===", flush=True)
        bench_kernels.main(["--quick", "--batches", "1", "--ops", "zconv_block",
                            "--out", os.path.join(out, f"{name}_r{round_}")])
