#!/usr/bin/env python
"""Compile OSTNet to AOTInductor packages for C++. See ostnet_fast/export/aoti.py (`--help`)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source tree, uninstalled

from ostnet_fast.export.aoti import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
