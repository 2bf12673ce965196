"""Which of our custom ops (torch.ops.ostnet.*) end up inside torch.compile's graphs of a training step.

A compiled "fused" model only runs our kernels where dynamo traced the fused path, so a timing of
`fused+compile` says nothing until this count is non-zero. The step (TrainingModel forward + backward, AMP) is
compiled through AOTAutograd with a backend that records the forward and backward graphs and runs them
eagerly (no inductor: fast, and the ops seen are exactly what inductor would get).

    python bench/compiled_ops.py                          # GPU, ostnet-vox-256, batch 2
    TRITON_INTERPRET=1 OSTNET_IMPL=triton python bench/compiled_ops.py --device cpu \\
        --config tests/configs/tiny.yaml --amp off        # CPU, through the Triton interpreter

Prints, per graph, the ostnet ops and their counts, and the number of graphs (graph breaks + 1);
exits 1 when a fused model's graphs hold no ostnet op.
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import layout  # noqa: E402

from ostnet_fast import OSTNet, load_config  # noqa: E402
from ostnet_fast.kernels._dispatch import ops_in_graph, recording_backend  # noqa: E402
from ostnet_fast.train.losses import TrainingModel, load_vgg19  # noqa: E402
from ostnet_fast.train.trainer import autocast_context, prepare_batch, resolve_amp  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="ostnet-vox-256")
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    ap.add_argument("--reference", action="store_true", help="the reference model (expect no ostnet op)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    config = load_config(args.config)
    size = args.size or config.model.image_size
    config.model.image_size = size
    amp = resolve_amp(args.amp, device)
    torch.manual_seed(0)
    model = OSTNet(config.model, fused=not args.reference).to(device).train()
    tm = TrainingModel(model, config.train, load_vgg19(random_weights=True).to(device)).to(device)
    mode = "fused+cl" if args.channels_last else "fused"
    if args.channels_last:
        tm = tm.to(memory_format=torch.channels_last)
    graphs: list[tuple[str, torch.fx.GraphModule]] = []
    compiled = torch.compile(tm, backend=recording_backend(graphs))
    g = torch.Generator().manual_seed(0)
    batch = {"source": torch.rand(args.batch_size, 3, size, size, generator=g),
             "driving": torch.rand(args.batch_size, 3, size, size, generator=g)}
    inputs = layout(prepare_batch(batch, g, config, device), mode)
    with autocast_context(amp, device):
        total, _ = compiled(*inputs)
    total.backward()
    print(f"{'fused' if not args.reference else 'reference'} model, {device}, amp {amp}, "
          f"{'channels-last' if args.channels_last else 'NCHW'}: {len(graphs)} graphs "
          f"({sum(k == 'forward' for k, _ in graphs)} forward)")
    total_ops = collections.Counter()
    for i, (kind, gm) in enumerate(graphs):
        ops = ops_in_graph(gm)
        total_ops += ops
        listed = ", ".join(f"{k} x{v}" for k, v in sorted(ops.items())) or "none"
        print(f"  graph {i} {kind:<8} {len(gm.graph.nodes):5d} nodes; ostnet ops: {listed}")
    print(f"ostnet ops in all graphs: {sum(total_ops.values())}")
    return 1 if not args.reference and not total_ops else 0


if __name__ == "__main__":
    sys.exit(main())
