#!/usr/bin/env python
"""Build TensorRT engines (standard TensorRT or TensorRT for RTX). See ostnet_fast/export/build_trt.py."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source tree, uninstalled

from ostnet_fast.export.build_trt import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
