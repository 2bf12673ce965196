"""Checkpoints: safetensors written atomically with the config in the header; FOMM checkpoint import.

Loading never unpickles arbitrary objects (safetensors, or torch.load(weights_only=True) for FOMM's
.pth.tar), and validates every key and shape before touching the model: a bad file changes nothing.
"""
from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ._errors import first_line
from ._files import give_default_mode
from ._version import __version__
from .config import Config, config_from_dict, load_config

FORMAT = "ostnet-fast"


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not match the model."""


def atomic_write(path: str | Path, write) -> Path:
    """Call write(tmp_path), then rename onto `path`: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        give_default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_pickled_tensors(path: str | Path, what: str):
    """torch.load(weights_only=True): tensors and plain containers, never arbitrary objects. Any failure is
    one CheckpointError line naming `what` (not torch's advice to unpickle the file fully)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # not a pickle at all, or objects weights_only refuses
        detail = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0] if "WeightsUnpickler" in str(e) else ""
        raise CheckpointError(f"{path} is not a loadable {what}: not a file of tensors and plain containers "
                              f"({detail or 'unreadable pickle'}; files are never fully unpickled)") from None
    except Exception as e:  # truncated or corrupt archives: torch's first line says which
        raise CheckpointError(f"{path} is not a loadable {what} ({type(e).__name__}: {first_line(e)})") from None


def load_state_dict_file(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch pickle (weights only; {'state_dict': ...}
    unwrapped), e.g. VGG-19 or LPIPS weights. Unreadable: one CheckpointError line naming `what`."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path} is not a loadable {what} ({type(e).__name__}: {first_line(e)})") from None
    state = load_pickled_tensors(path, what)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a {what}, got {type(state).__name__}")
    return state


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint ({e})") from None


def checkpoint_metadata(config: Config, **extra_metadata: str) -> dict[str, str]:
    """The safetensors header of a model checkpoint: format, version and the whole config."""
    return {"format": FORMAT, "version": __version__, "config": json.dumps(config.to_dict()),
            "config_name": config.name, **extra_metadata}


def save_checkpoint(path: str | Path, model: torch.nn.Module, config: Config, **extra_metadata: str) -> Path:
    """Model weights (unwrapped module, no DDP/compile prefixes) + config, atomically."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return save_tensors(path, model.state_dict(), checkpoint_metadata(config, **extra_metadata))


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
                     optional_missing: tuple[str, ...] = ()) -> None:
    """Raise CheckpointError naming every missing / unexpected / mis-shaped key; change nothing."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not any(k.startswith(p) or k.endswith(p)
                                                                   for p in optional_missing)]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in state if k in expected and state[k].shape != expected[k].shape]
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            problems.append(f"{len(items)} {title}: " + ", ".join(items[:6]) + (" ..." if len(items) > 6 else ""))
    if problems:
        raise CheckpointError(f"{source} does not match the model ({'; '.join(problems)})")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", fused: bool = False):
    """-> (OSTNet, Config) rebuilt from the config stored in the checkpoint."""
    from .model import OSTNet
    state, metadata = read_tensors(path)
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise CheckpointError(f"{path} is a safetensors file but not an ostnet-fast checkpoint "
                              f"(metadata format={metadata.get('format')!r})")
    config = config_from_dict(json.loads(metadata["config"]), name=metadata.get("config_name", "checkpoint"))
    model = OSTNet(config.model, fused=fused)
    check_state_dict(model, state, str(path))
    model.load_state_dict(state)
    return model.to(device).eval(), config


def load_weights_into(model: torch.nn.Module, path: str | Path) -> dict[str, str]:
    """Load a checkpoint's weights into an existing model (validated first); returns the metadata."""
    state, metadata = read_tensors(path)
    check_state_dict(model, state, str(path))
    model.load_state_dict(state)
    return metadata


def load_fomm_checkpoint(path: str | Path, config: Config | str = "fomm-vox-256", device="cpu",
                         fused: bool = False):
    """Load a FOMM `vox-cpk.pth.tar`-style checkpoint ({'generator': ..., 'kp_detector': ...}).

    The keypoint detector, dense motion network and the generator's shared layers take FOMM's weights
    (strict key and shape check); OSTNet's own parts start as the identity (W_i = 0, fiducials = targets)
    so the output equals FOMM's. Returns (OSTNet, Config)."""
    from .model import OSTNet
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"FOMM checkpoint not found: {path}")
    ckpt = load_pickled_tensors(path, "FOMM checkpoint")
    if not isinstance(ckpt, dict) or not {"generator", "kp_detector"} <= set(ckpt):
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: expected a dict with 'generator' and 'kp_detector', got {keys}")
    config = load_config(config)
    model = OSTNet(config.model, fused=fused)
    model.reset_scale_embedding()
    state = {f"generator.{k}": v for k, v in ckpt["generator"].items()}
    state.update({f"kp_detector.{k}": v for k, v in ckpt["kp_detector"].items()})
    own = ("scale_transform.", "generator.W_down.", "generator.W_up.", "num_batches_tracked")
    check_state_dict(model, state, str(path), optional_missing=own)
    model.load_state_dict(state, strict=False)
    return model.to(device).eval(), config
