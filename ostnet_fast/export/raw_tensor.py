"""The raw tensor files csrc/ostnet_infer reads and writes (csrc/include/ostnet/raw_io.h):
b"OSTT" + uint32 rank + rank x int64 dims (little-endian), then float32 data in C order."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch


def write_ostt(path: str | Path, tensor: torch.Tensor) -> None:
    data = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
    with open(path, "wb") as f:
        f.write(b"OSTT" + struct.pack("<I", data.ndim) + struct.pack(f"<{data.ndim}q", *data.shape))
        f.write(data.astype("<f4").tobytes())


def read_ostt(path: str | Path) -> torch.Tensor:
    raw = Path(path).read_bytes()
    if raw[:4] != b"OSTT":
        raise ValueError(f"{path} is not an OSTT tensor file")
    (rank,) = struct.unpack_from("<I", raw, 4)
    shape = struct.unpack_from(f"<{rank}q", raw, 8)
    data = np.frombuffer(raw, dtype="<f4", offset=8 + 8 * rank)
    return torch.from_numpy(data.reshape(shape).copy())
