"""One-off measurement of the twelfth session (run from the repo root with PYTHONPATH=.; writes $OUT/odd_convs.json): which cuDNN kernels the eager fused frame's convolutions launch, and alternatives for the odd-channel ones."""
import json, os, sys, statistics
from pathlib import Path
import torch, torch.nn.functional as F
sys.path.insert(0, "bench")
from common import time_graph_ms
from torch.profiler import profile, ProfilerActivity
from ostnet_fast import OSTNet
torch.backends.cudnn.benchmark = True
out = {}
dev = "cuda"
model = OSTNet("ostnet-vox-256", fused=True).cuda().eval()
model.cast_conv_weights(torch.float16)
model = model.to(memory_format=torch.channels_last)
cl = lambda t: t.contiguous(memory_format=torch.channels_last)
src = cl(torch.rand(1, 3, 256, 256, device=dev)); drv = cl(torch.rand(1, 3, 256, 256, device=dev))
with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
    st = model.encode_source(src)
    for _ in range(3):
        model.animate(st, drv)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        model.animate(st, drv); torch.cuda.synchronize()
def kern(ev):
    ks = [(k.name[:90], k.duration) for k in ev.kernels]
    for c in ev.cpu_children:
        ks += kern(c)
    return ks
rows = []
for ev in prof.events():
    if ev.name == "aten::convolution":
        ks = kern(ev)
        rows.append({"shapes": ev.input_shapes[:2], "kernels": ks, "us": sum(d for _, d in ks)})
        print(f"{rows[-1]['us']:7.1f} us {ev.input_shapes[:2]} {[k for k, _ in ks]}")
out["eager_convs"] = rows
# alternatives, fp16 channels-last
def t(fn):
    return round(time_graph_ms(fn, iters=30)["median_ms"] * 1000, 2)
res = []
for b in (1, 8):
    with torch.no_grad():
        x = cl(torch.rand(b, 3, 256, 256, device=dev, dtype=torch.half))
        blur = model.kp_detector.down
        w = blur.weight.half()
        ref = F.conv2d(x, w, groups=3, stride=4, padding=6)
        g = blur.weight[0, 0].double().sum(1)  # k = g g^T: its row sums are the 1D factor
        n, ks = 256, 13
        A = torch.zeros(64, n, dtype=torch.double)
        for i in range(64):
            for u in range(ks):
                h = 4 * i + u - 6
                if 0 <= h < n: A[i, h] = g[u]
        A = A.to(dev).half()
        def sep():
            xv = x.permute(0, 2, 3, 1).reshape(b, 256, 256 * 3)
            tt = (A @ xv).view(b * 64, 256, 3)
            return (A @ tt).view(b, 64, 64, 3).permute(0, 3, 1, 2)
        err = (sep().float() - ref.float()).abs().max().item()
        def unf():
            xp = F.pad(x, (6, 6, 6, 6))
            win = xp.unfold(2, 13, 4).unfold(3, 13, 4)[:, :, :64, :64]
            return (win.float() * blur.weight[0, 0].view(1, 1, 1, 1, 13, 13)).sum((-1, -2)).half()
        unf_c = torch.compile(unf)
        err2 = (unf_c().float() - ref.float()).abs().max().item()
        res.append({"op": "blur 3x256x256 s4", "batch": b, "cudnn_us": t(lambda: F.conv2d(x, w, groups=3, stride=4, padding=6)),
                    "sep_matmul_us": t(sep), "sep_err": err, "unfold_compiled_us": t(unf_c), "unf_err": err2})
        print(res[-1])
        # first conv 3->64 on 64x64, padded to 8 channels
        x2 = cl(torch.rand(b, 3, 64, 64, device=dev, dtype=torch.half))
        w2 = cl(torch.randn(64, 3, 3, 3, device=dev, dtype=torch.half)); b2 = torch.randn(64, device=dev, dtype=torch.half)
        w2p = cl(F.pad(w2, (0, 0, 0, 0, 0, 5)))
        x2p = cl(F.pad(x2, (0, 0, 0, 0, 0, 5)))
        e3 = (F.conv2d(x2p, w2p, b2, padding=1).float() - F.conv2d(x2, w2, b2, padding=1).float()).abs().max().item()
        res.append({"op": "conv 3->64 64x64", "batch": b, "cudnn_us": t(lambda: F.conv2d(x2, w2, b2, padding=1)),
                    "padded8_conv_only_us": t(lambda: F.conv2d(x2p, w2p, b2, padding=1)),
                    "pad_plus_conv_us": t(lambda: F.conv2d(cl(F.pad(x2, (0, 0, 0, 0, 0, 5))), w2p, b2, padding=1)), "err": e3})
        print(res[-1])
        # final 1x1 64->3 at 256x256 + sigmoid
        x3 = cl(torch.rand(b, 64, 256, 256, device=dev, dtype=torch.half))
        w3 = cl(torch.randn(3, 64, 1, 1, device=dev, dtype=torch.half)); b3 = torch.randn(3, device=dev, dtype=torch.half)
        w3p = cl(F.pad(w3, (0, 0, 0, 0, 0, 0, 0, 5))); b3p = F.pad(b3, (0, 5))
        res.append({"op": "final 1x1 64->3 256", "batch": b, "cudnn_us": t(lambda: F.conv2d(x3, w3, b3)),
                    "cout8_us": t(lambda: F.conv2d(x3, w3p, b3p)),
                    "linear_us": t(lambda: F.linear(x3.permute(0, 2, 3, 1), w3.view(3, 64), b3))})
        print(res[-1])
out["alternatives"] = res
o = Path(os.environ.get("OUT", "/tmp")); o.mkdir(parents=True, exist_ok=True)
(o / "odd_convs.json").write_text(json.dumps(out, indent=1, default=str))
