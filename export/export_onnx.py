#!/usr/bin/env python
"""Export OSTNet to source.onnx + frame.onnx. See ostnet_fast/export/onnx_export.py (`--help`)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source tree, uninstalled

from ostnet_fast.export.onnx_export import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
