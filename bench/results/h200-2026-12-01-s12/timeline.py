"""One-off measurement of the twelfth session (PYTHONPATH=. from the repo root; B=1): the compiled, graphed fused frame's kernels in launch order, full names (now bench/profile_model.py --timeline)."""
import os, sys, json
from pathlib import Path
import torch
from torch.profiler import profile, ProfilerActivity
from ostnet_fast import OSTNet
from ostnet_fast.runtime.cuda_graph import GraphedStep
torch.backends.cudnn.benchmark = True
b = int(os.environ.get("B", "1"))
model = OSTNet("ostnet-vox-256", fused=True).cuda().eval()
model.cast_conv_weights(torch.float16)
model = model.to(memory_format=torch.channels_last)
cl = lambda t: t.contiguous(memory_format=torch.channels_last)
src = cl(torch.rand(1, 3, 256, 256, device="cuda")); drv = cl(torch.rand(b, 3, 256, 256, device="cuda"))
with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
    st = model.encode_source(src)
    frame = torch.compile(lambda d: model.animate(st, d)["prediction"])
    frame(drv)
    g = GraphedStep(frame, (drv,))
    for _ in range(5): g(drv)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        g(drv); torch.cuda.synchronize()
ev = sorted([e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA], key=lambda e: e.time_range.start)
t0 = ev[0].time_range.start
rows = []
for e in ev:
    rows.append((round(e.time_range.start - t0, 1), round(e.time_range.elapsed_us(), 2), e.name[:200]))
    print(f"{rows[-1][0]:8.1f} {rows[-1][1]:6.2f}  {e.name[:200]}")
print("sum", sum(r[1] for r in rows), "span", ev[-1].time_range.end - t0)
o = Path(os.environ.get("OUT", "/tmp")); o.mkdir(parents=True, exist_ok=True)
(o / f"timeline_b{b}.json").write_text(json.dumps(rows, indent=0))
