"""Whole model on the GPU: fused kernels vs the reference (issue 4's acceptance figures)."""
import pytest
import torch

from ostnet_fast import OSTNet

pytestmark = pytest.mark.gpu


def pair(config, seed=0):
    torch.manual_seed(seed)
    ref = OSTNet(config).cuda()
    fused = OSTNet(config, fused=True).cuda()
    fused.load_state_dict(ref.state_dict())
    # Off-identity scale transformation and z embedding, so every fused op is exercised for real.
    with torch.no_grad():
        for m in (ref, fused):
            torch.manual_seed(1)
            m.scale_transform.F_fc.weight.normal_(0, 0.05)
    return ref, fused


@pytest.mark.parametrize("config", ["ostnet-vox-256", "fomm-vox-256"])
@pytest.mark.parametrize("batch", [1, 3])
def test_fused_matches_reference_fp32(config, batch):
    ref, fused = pair(config)
    ref.eval(), fused.eval()
    src = torch.rand(1, 3, 256, 256, device="cuda")
    drv = torch.rand(batch, 3, 256, 256, device="cuda")
    with torch.no_grad():
        a = ref.animate(ref.encode_source(src), drv)
        b = fused.animate(fused.encode_source(src), drv)
    assert (a["rectified"] - b["rectified"]).abs().max() <= 1e-3
    assert (a["prediction"] - b["prediction"]).abs().max() <= 1e-3


def test_fused_matches_reference_fp16():
    ref, fused = pair("ostnet-vox-256")
    ref.eval(), fused.eval()
    src = torch.rand(1, 3, 256, 256, device="cuda")
    drv = torch.rand(2, 3, 256, 256, device="cuda")
    with torch.no_grad():
        a = ref.animate(ref.encode_source(src), drv)["prediction"]  # fp32 reference
        with torch.autocast("cuda", dtype=torch.float16):
            b = fused.animate(fused.encode_source(src), drv)["prediction"]
    assert b.dtype in (torch.float16, torch.float32)
    assert (a - b.float()).abs().max() <= 2e-2


def test_training_step_gradients_agree():
    # float64: in training mode, batch-statistics BN over the hourglass's 2x2 bottom and the temperature
    # 0.1 keypoint softmax amplify fp32 rounding differences between two correct implementations into
    # O(1) relative gradient differences, so fp32 cannot tell a bug from rounding here; float64 can.
    ref, fused = pair("ostnet-vox-256")
    ref.double().train(), fused.double().train()
    src = torch.rand(2, 3, 256, 256, device="cuda", dtype=torch.float64)
    drv = torch.rand(2, 3, 256, 256, device="cuda", dtype=torch.float64)
    up = None
    grads = []
    for m in (ref, fused):
        out = m(src, drv)
        if up is None:
            torch.manual_seed(5)
            up = torch.randn_like(out["prediction"])
        loss = (out["prediction"] * up).sum() + out["rectified"].sum() + out["kp_source"]["value"].sum()
        loss.backward()
        grads.append({n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    # Conv biases feeding training-mode BN have an exactly-zero true gradient: floor the scale so their
    # float64 residue (~1e-15) is not read as a relative error.
    floor = 1e-8 * max(g.abs().max().item() for g in grads[0].values())
    for n, g in grads[0].items():
        scale = g.abs().max().clamp_min(floor)
        err = (g - grads[1][n]).abs().max() / scale
        assert err <= 1e-6, f"{n}: relative gradient error {err:.2e}"


def test_cuda_graph_step_replays_exactly():
    from ostnet_fast.runtime.cuda_graph import GraphedStep
    _, fused = pair("ostnet-vox-256")
    fused.eval()
    src = torch.rand(1, 3, 256, 256, device="cuda")
    with torch.no_grad():
        state = fused.encode_source(src)
        step = lambda d: fused.animate(state, d)["prediction"]
        d1, d2 = torch.rand(2, 2, 3, 256, 256, device="cuda")
        graphed = GraphedStep(step, (d1,))
        torch.testing.assert_close(graphed(d2).clone(), step(d2), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(graphed(d1).clone(), step(d1), atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="captured for shapes"):
            graphed(torch.rand(1, 3, 256, 256, device="cuda"))
