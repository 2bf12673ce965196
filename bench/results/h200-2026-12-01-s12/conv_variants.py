"""One-off measurement of the twelfth session (run from the repo root with PYTHONPATH=.; writes $OUT/variants.json, committed as conv_variants.json): the blur and odd-channel convolution variants, compiled, CUDA-graph GPU time, batch 1 and 8, fp16 channels-last."""
import os, sys, json
from pathlib import Path
import torch, torch.nn.functional as F
sys.path.insert(0, "bench")
from common import time_graph_ms
from ostnet_fast.model.blocks import AntiAliasInterpolation2d
torch.backends.cudnn.benchmark = True
dev = "cuda"
cl = lambda t: t.contiguous(memory_format=torch.channels_last)
t = lambda fn: round(time_graph_ms(fn, iters=30)["median_ms"] * 1000, 2)
blur = AntiAliasInterpolation2d(3, 0.25).to(dev)
k2 = blur.weight.half()
g = blur.weight[0, 0].sum(1).half().to(dev)
def conv(x):
    return F.conv2d(x, k2, groups=3, stride=4, padding=6)
def unf2d(x):
    xp = F.pad(x, (6, 6, 6, 6))
    win = xp.unfold(2, 13, 4).unfold(3, 13, 4)[:, :, :64, :64]
    return (win.float() * blur.weight[0, 0].view(1, 1, 1, 1, 13, 13)).sum((-1, -2)).to(x.dtype)
def sep(x):
    xp = F.pad(x, (6, 6, 6, 6))
    rows = (xp.unfold(2, 13, 4)[:, :, :64].float() * g.float()).sum(-1)     # (B, C, 64, W + 12)
    return (rows.unfold(3, 13, 4)[:, :, :, :64] * g.float()).sum(-1).to(x.dtype)
res = []
for b in (1, 8):
    x = cl(torch.rand(b, 3, 256, 256, device=dev, dtype=torch.half))
    # a producer, as in the frame (the rectified image is a kernel output): x * 1
    ref = conv(x)
    r = {"op": "blur", "batch": b}
    for name, f in (("cudnn", conv), ("unfold2d_c", torch.compile(lambda x: unf2d(x * 1))),
                    ("sep_c", torch.compile(lambda x: sep(x * 1))), ("cudnn_c", torch.compile(lambda x: conv(x * 1)))):
        with torch.no_grad():
            r[name + "_err"] = (f(x).float() - ref.float()).abs().max().item()
            r[name + "_us"] = t(lambda: f(x))
    res.append(r); print(r)
    for cin, cout, hw, k, pin, pout in ((35, 75, 64, 7, 40, 80), (128, 17, 64, 7, 128, 24), (35, 75, 64, 7, 48, 80)):
        r = {"op": f"conv {cin}->{cout} {k}x{k} {hw}", "batch": b, "pad_to": [pin, pout]}
        x = cl(torch.rand(b, cin, hw, hw, device=dev, dtype=torch.half))
        w = cl(torch.randn(cout, cin, k, k, device=dev, dtype=torch.half) / (cin * k * k) ** 0.5)
        bias = torch.randn(cout, device=dev, dtype=torch.half)
        wp = cl(F.pad(w, (0, 0, 0, 0, 0, pin - cin, 0, pout - cout))); bp = F.pad(bias, (0, pout - cout))
        plain = torch.compile(lambda x: F.conv2d(torch.relu(x), w, bias, padding=k // 2) * 2)
        padded = torch.compile(lambda x: F.conv2d(F.pad(torch.relu(x), (0, 0, 0, 0, 0, pin - cin)), wp, bp,
                                                  padding=k // 2)[:, :cout] * 2)
        padw = torch.compile(lambda x: F.conv2d(F.pad(torch.relu(x), (0, 0, 0, 0, 0, pin - cin)),
                                                F.pad(w, (0, 0, 0, 0, 0, pin - cin, 0, pout - cout)),
                                                F.pad(bias, (0, pout - cout)), padding=k // 2)[:, :cout] * 2)
        with torch.no_grad():
            ref = plain(x)
            for name, f in (("plain_c", plain), ("padded_c", padded), ("padded_w_per_call_c", padw)):
                r[name + "_err"] = (f(x).float() - ref.float()).abs().max().item()
                r[name + "_us"] = t(lambda: f(x))
        res.append(r); print(r)
o = Path(os.environ.get("OUT", "/tmp")); o.mkdir(parents=True, exist_ok=True)
(o / "variants.json").write_text(json.dumps(res, indent=1))
