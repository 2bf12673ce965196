"""The optional CUDA C++ extension `ostnet_fast._C` (sources in csrc/ext/): kernels for the cases where the
Triton ones did not reach their target. Today one: grid_sample on NCHW fp32 images of 1 to 4 channels
(csrc/ext/grid_sample_small_c.cu says why), with two sets of kernels: images that fit in shared memory
(the backward's image and grad sums in one block's, e.g. 64x64), batched, and the packed ones for the rest.

It is built only on request, where nvcc and a CUDA build of torch are installed:

    OSTNET_BUILD_CUDA=1 pip install --no-build-isolation -e .

(TORCH_CUDA_ARCH_LIST="8.6" and the like build for a GPU that is not in this machine.) Without it, every op
runs its Triton kernel exactly as before. OSTNET_CUDA_EXT=0 turns a built extension off, to compare the two
or to rule it out. The extension runs inside the same autograd Functions and custom ops as the Triton kernels,
so torch.compile and CUDA graphs see no difference.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os

import torch

log = logging.getLogger("ostnet_fast.kernels")

GRID_SAMPLE_MAX_CHANNELS = 4  # csrc/ext/grid_sample_small_c.cu's kMaxChannels


@functools.lru_cache(maxsize=None)
def module():
    """The loaded extension, or None when it was not built (or cannot load: then say why, once)."""
    try:
        return importlib.import_module("ostnet_fast._C")
    except ModuleNotFoundError:  # not built
        return None
    except ImportError as e:  # built, but it does not load (e.g. built against another torch): say so
        log.warning("ostnet_fast._C is there but does not load (%s); using the Triton kernels", e)
        return None


_turned_off = False


def enabled() -> bool:
    return not _turned_off and os.environ.get("OSTNET_CUDA_EXT", "1") != "0" and module() is not None


@contextlib.contextmanager
def turned_off():
    """Run the Triton kernels only, for what runs inside (forward and backward), e.g. to time both in one run."""
    global _turned_off
    before, _turned_off = _turned_off, True
    try:
        yield
    finally:
        _turned_off = before


_runs_on: dict[int, bool] = {}


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _probe(index: int) -> None:
    module().grid_sample_pack(torch.zeros(1, 1, 1, 1, device=torch.device("cuda", index)))


def runs_on(device: torch.device) -> bool:
    """The extension has code for this GPU: one tiny launch, once per device. A build for other GPUs (e.g.
    sm_90a only, on an RTX 3090) fails to launch; then say so once, and the Triton kernels run there."""
    index = _index(device)
    if index not in _runs_on:
        try:
            _probe(index)
            _runs_on[index] = True
        except RuntimeError as e:
            log.warning("ostnet_fast._C has no code for GPU %d (%s); using the Triton kernels there. Rebuild with "
                        "TORCH_CUDA_ARCH_LIST set to its compute capability.", index, str(e).splitlines()[0])
            _runs_on[index] = False
    return _runs_on[index]


def grid_sample_applies(input: torch.Tensor, grid: torch.Tensor) -> bool:
    """grid_sample (forward and backward) runs on the extension: CUDA, fp32, NCHW, 1-4 channels, a
    contiguous grid whose (x, y) pairs are 8-byte aligned (the kernel loads them as float2), on a GPU the
    build has code for."""
    return (input.is_cuda and input.dtype == torch.float32 and grid.dtype == torch.float32
            and 1 <= input.shape[1] <= GRID_SAMPLE_MAX_CHANNELS and input.is_contiguous() and grid.is_contiguous()
            and grid.data_ptr() % 8 == 0 and enabled() and runs_on(input.device))


# An image whose backward (the image and its grad's sums) fits in one block's shared memory takes the
# shared-memory kernels (one block per sample) from this many samples; None: half the GPU's SMs, so the
# blocks fill most of it (fewer samples leave SMs idle, where the packed kernels spread over all of them).
SHARED_MIN_SAMPLES: int | None = None


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def grid_sample_shared(input: torch.Tensor) -> bool:
    """Given grid_sample_applies: the image takes the shared-memory kernels (e.g. 64x64 with 3 channels,
    48 KB; a build without them, or a GPU with too little shared memory, takes the packed ones)."""
    ext = module()
    if not hasattr(ext, "grid_sample_shared_fits"):
        return False
    if SHARED_MIN_SAMPLES is not None:
        wanted = SHARED_MIN_SAMPLES
    else:
        wanted = max(1, _sm_count(_index(input.device)) // 2)
    return input.shape[0] >= wanted and ext.grid_sample_shared_fits(input)


def grid_sample_kernels(input: torch.Tensor, grid: torch.Tensor) -> str | None:
    """Which of the extension's kernels run this grid_sample, forward and backward: "shared" (the image in
    shared memory), "packed", or None where the extension does not apply (the Triton kernels do)."""
    if not grid_sample_applies(input, grid):
        return None
    return "shared" if grid_sample_shared(input) else "packed"


def grid_sample_shared_forward(input: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    return module().grid_sample_shared_forward(input, grid)


def grid_sample_shared_backward(grad_out: torch.Tensor, input: torch.Tensor, grid: torch.Tensor, need_input: bool,
                                need_grid: bool):
    """-> (grad_input (B, C, H_in, W_in) NCHW fp32 or None, grad_grid or None)."""
    return _grads(module().grid_sample_shared_backward, grad_out, input, grid, need_input, need_grid)


def _grads(backward, grad_out, saved, grid, need_input: bool, need_grid: bool):
    """Call one of the module's backwards (it returns empty tensors for the grads not needed) -> grads or None."""
    gin, ggrid = backward(grad_out.contiguous().float(), saved, grid, need_input, need_grid)
    return (gin if need_input else None), (ggrid if need_grid else None)


def grid_sample_pack(input: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H, W, 4) fp32, zeros past C: what the forward and the grid grad gather from."""
    return module().grid_sample_pack(input)


def grid_sample_forward(input: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Gathering from the NCHW planes: for calls with no backward to come (no pack)."""
    return module().grid_sample_forward(input, grid)


def grid_sample_packed_forward(packed: torch.Tensor, grid: torch.Tensor, channels: int,
                               grad_scratch: torch.Tensor | None = None) -> torch.Tensor:
    """grad_scratch (packed's shape, e.g. torch.empty_like(packed)), if given, comes back zeroed: the
    backward's scratch, filled in the same kernel (it saves the backward a fill and a launch)."""
    return module().grid_sample_packed_forward(packed, grid, channels, grad_scratch)


def grid_sample_backward(grad_out: torch.Tensor, packed: torch.Tensor, grid: torch.Tensor, need_input: bool,
                         need_grid: bool, grad_scratch: torch.Tensor | None = None):
    """-> (grad_input (B, C, H_in, W_in) NCHW fp32 or None, grad_grid or None); C is grad_out's.
    grad_scratch: one the forward zeroed, used once (the input grad's sums go into it); None: a fresh one."""
    return _grads(functools.partial(module().grid_sample_packed_backward, grad_scratch=grad_scratch), grad_out,
                  packed, grid, need_input, need_grid)
