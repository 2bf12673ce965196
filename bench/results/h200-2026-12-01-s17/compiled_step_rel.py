"""Why test_the_compiled_fused_step_runs_our_kernels_and_equals_eager missed its 1e-4 (s17): the relative
gradient difference of the compiled fused step against the eager one, beside the run-to-run spread of each side,
with the CUDA extension on and off; then the same for the reference model (none of our kernels on either side),
and the parameters whose gradients differ most. Run from the repo root on a GPU: python3 <this file> [--second]."""
import sys
import os

import torch

from tests.test_train_gpu import batches, rel, setup


def step(module, inputs, params, reference_zconv):
    for p in params:
        p.grad = None
    if reference_zconv:
        os.environ["OSTNET_REFERENCE_OPS"] = "zconv_block"
    try:
        loss, _ = module(*inputs)
        loss.backward()
    finally:
        os.environ.pop("OSTNET_REFERENCE_OPS", None)
    return loss.detach(), torch.cat([p.grad.flatten() for p in params if p.grad is not None])


torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


def worst(model, c, e, n=6):
    """The n parameters with the largest relative gradient difference, and their share of the whole."""
    rows, at = [], 0
    total = (c - e).norm()
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        k = p.numel()
        d = (c[at:at + k] - e[at:at + k]).norm()
        rows.append((rel(c[at:at + k], e[at:at + k]), (d / total).item() ** 2, name))
        at += k
    for r, share, name in sorted(rows, reverse=True)[:n]:
        print(f"    {name}: rel {r:.2e}, share of the squared difference {share:.2f}")
    for r, share, name in sorted(rows, key=lambda t: -t[1])[:n]:
        print(f"    (by share) {name}: rel {r:.2e}, share {share:.2f}")


second = "--second" in sys.argv
for fused, ext in ((True, "1"), (False, "1")) if second else ((True, "1"), (True, "0")):
    os.environ["OSTNET_CUDA_EXT"] = ext
    cfg, model, tm, _, _, params = setup(fused, False, "bf16")
    torch._dynamo.reset()
    compiled = torch.compile(tm)
    inputs = next(batches(cfg, 1))
    e1 = step(tm, inputs, params, fused)
    e2 = step(tm, inputs, params, fused)
    c1 = step(compiled, inputs, params, False)
    c2 = step(compiled, inputs, params, False)
    print(f"fused={fused} OSTNET_CUDA_EXT={ext}: eager vs eager {rel(e2[1], e1[1]):.2e}, compiled vs compiled "
          f"{rel(c2[1], c1[1]):.2e}, compiled vs eager {rel(c1[1], e1[1]):.2e} / {rel(c2[1], e2[1]):.2e}; "
          f"loss {e1[0].item():.6f} {c1[0].item():.6f}", flush=True)
    if second:
        worst(model, c1[1], e1[1])
