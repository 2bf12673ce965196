"""Training losses: VGG-19 loading, perceptual loss, equivariance under a random TPS, keypoint distance."""
import pytest
import torch
from safetensors.torch import save_file

from ostnet_fast import OSTNet, load_config
from ostnet_fast.train.losses import (VGG19_FILE, ImagePyramide, PerceptualLoss, TrainingModel, Transform, Vgg19,
                                      equivariance_losses, keypoint_distance_loss, load_vgg19)

TINY = "tests/configs/tiny.yaml"
# torchvision's vgg19 `features` convs sit at these indices; its state dict also holds classifier.*.
TORCHVISION_CONV_INDICES = [0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34]


def torchvision_like_state_dict(seed=0):
    g = torch.Generator().manual_seed(seed)
    widths = [64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512]
    state, c_in = {}, 3
    for idx, c_out in zip(TORCHVISION_CONV_INDICES, widths):
        state[f"features.{idx}.weight"] = 0.01 * torch.randn(c_out, c_in, 3, 3, generator=g)
        state[f"features.{idx}.bias"] = 0.01 * torch.randn(c_out, generator=g)
        c_in = c_out
    state["classifier.0.weight"] = torch.zeros(4, 8)  # present in the real file; ignored by the loader
    return state


def test_vgg19_module_indices_match_torchvision():
    keys = set(Vgg19().state_dict())
    expected = {f"features.{i}.{p}" for i in TORCHVISION_CONV_INDICES for p in ("weight", "bias")}
    assert keys == expected


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_load_vgg19_from_path(tmp_path, fmt):
    state = torchvision_like_state_dict()
    path = tmp_path / (VGG19_FILE if fmt == "pth" else "vgg19.safetensors")
    torch.save(state, path) if fmt == "pth" else save_file(state, str(path))
    vgg = load_vgg19(path)
    torch.testing.assert_close(vgg.features[34].weight, state["features.34.weight"], rtol=0, atol=0)
    assert not any(p.requires_grad for p in vgg.parameters())


def test_load_vgg19_from_torch_home_cache(tmp_path, monkeypatch):
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(torchvision_like_state_dict(1), tmp_path / "hub" / "checkpoints" / VGG19_FILE)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    vgg = load_vgg19()
    assert vgg.features[0].weight.shape == (64, 3, 3, 3)


def test_missing_vgg19_names_the_file_and_the_ways_to_give_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        load_vgg19()
    msg = str(e.value)
    assert VGG19_FILE in msg and "TORCH_HOME" in msg and "--vgg" in msg and str(tmp_path) in msg


def test_wrong_file_is_refused(tmp_path):
    path = tmp_path / "not_vgg.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not torchvision's VGG-19"):
        load_vgg19(path)


@pytest.mark.parametrize("name", ["vgg19.pth", "vgg19.safetensors"])
def test_unreadable_vgg_file_is_one_line(tmp_path, name):
    junk = tmp_path / name
    junk.write_bytes(b"\x80\x04junk" * 50)
    with pytest.raises(ValueError) as e:
        load_vgg19(junk)
    assert str(e.value).count("is not a loadable VGG-19 state dict") == 1 and "\n" not in str(e.value)


def test_random_vgg_is_deterministic_and_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    a = load_vgg19(random_weights=True)
    after = torch.rand(1)
    b = load_vgg19(random_weights=True)
    assert torch.equal(before, after)
    assert torch.equal(a.features[0].weight, b.features[0].weight)


def test_vgg19_slices_shapes():
    vgg = load_vgg19(random_weights=True, width_divisor=8)
    outs = vgg(torch.rand(1, 3, 32, 32))
    assert [o.shape[-1] for o in outs] == [32, 16, 8, 4, 2]  # relu1_1 .. relu5_1: 4 pools before relu5_1


def test_image_pyramid_scales():
    pyr = ImagePyramide([1, 0.5, 0.25], 3)(torch.rand(2, 3, 64, 64))
    assert {k: tuple(v.shape) for k, v in pyr.items()} == {
        "prediction_1.0": (2, 3, 64, 64), "prediction_0.5": (2, 3, 32, 32), "prediction_0.25": (2, 3, 16, 16)}


def test_perceptual_loss_zero_on_identical_and_differentiable():
    torch.manual_seed(0)
    loss = PerceptualLoss(load_vgg19(random_weights=True, width_divisor=8), [1, 0.5], [10] * 5)
    y = torch.rand(2, 3, 32, 32)
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    same, diff = loss(y, y.clone(), x)
    assert same.item() == 0.0 and diff.item() > 0
    diff.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def _autograd_jacobian(transform, pts):
    pts = pts.clone().requires_grad_(True)
    new = transform.warp_coordinates(pts)
    gx = torch.autograd.grad(new[..., 0].sum(), pts, retain_graph=True)[0]
    gy = torch.autograd.grad(new[..., 1].sum(), pts)[0]
    return torch.stack([gx, gy], dim=-2)  # FOMM's Transform.jacobian


def test_transform_jacobian_closed_form_matches_autograd():
    g = torch.Generator().manual_seed(0)
    theta, params = Transform.draw(3, 0.05, 0.5, 5, g)  # large TPS weights: the TPS term matters
    t = Transform(theta.double(), params.double())
    pts = (torch.rand(3, 17, 2, generator=g, dtype=torch.float64) * 2 - 1) * 0.95
    torch.testing.assert_close(t.jacobian(pts), _autograd_jacobian(t, pts), rtol=1e-10, atol=1e-10)


def test_identity_transform_returns_the_frame():
    theta, params = Transform.draw(2, 0.0, 0.0, 5)
    frame = torch.rand(2, 3, 19, 23)
    torch.testing.assert_close(Transform(theta, params).transform_frame(frame), frame, atol=1e-5, rtol=0)


def test_equivariance_losses_vanish_for_equivariant_keypoints():
    g = torch.Generator().manual_seed(1)
    theta, params = Transform.draw(2, 0.05, 0.005, 5, g)
    t = Transform(theta.double(), params.double())
    kp_t = {"value": torch.rand(2, 5, 2, generator=g, dtype=torch.float64) - 0.5,
            "jacobian": torch.eye(2, dtype=torch.float64) + 0.1 * torch.randn(2, 5, 2, 2, generator=g, dtype=torch.float64)}
    kp = {"value": t.warp_coordinates(kp_t["value"]), "jacobian": t.jacobian(kp_t["value"]) @ kp_t["jacobian"]}
    value, jac = equivariance_losses(kp, kp_t, t)
    assert value.item() < 1e-6 and jac.item() < 1e-6
    kp["value"] = kp["value"] + 0.1
    assert equivariance_losses(kp, kp_t, t)[0].item() == pytest.approx(0.1, abs=1e-5)


def test_keypoint_distance_loss():
    # Two keypoints 0.05 apart in L1: each ordered pair costs gamma - 0.05 = 0.05.
    kp = torch.tensor([[[0.0, 0.0], [0.03, 0.02]]])
    assert keypoint_distance_loss(kp, 0.1).item() == pytest.approx(0.05, abs=1e-6)
    # Far apart keypoints cost nothing; the pair i == i is excluded.
    assert keypoint_distance_loss(torch.tensor([[[-0.5, 0.0], [0.5, 0.0]]]), 0.1).item() == 0.0
    # Mean over the 6 ordered pairs of 3 keypoints (not the 9 with i == j): one close pair costs 2 x 0.05.
    kp3 = torch.tensor([[[0.0, 0.0], [0.05, 0.0], [1.0, 0.0]]]).repeat(2, 1, 1)
    assert keypoint_distance_loss(kp3, 0.1).item() == pytest.approx(0.1 / 6, abs=1e-6)
    kp = torch.zeros(2, 4, 2, requires_grad=True)
    keypoint_distance_loss(kp + torch.randn(2, 4, 2) * 0.01, 0.1).backward()
    assert kp.grad.abs().sum() > 0  # pushes clustered keypoints apart


def test_training_model_terms_and_gradients():
    torch.manual_seed(0)
    cfg = load_config(TINY)
    model = OSTNet(cfg.model).train()
    tm = TrainingModel(model, cfg.train, load_vgg19(random_weights=True, width_divisor=8))
    src, drv = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    theta, params = Transform.draw(2, 0.05, 0.005, 5, torch.Generator().manual_seed(0))
    total, losses = tm(src, drv, drv, theta, params)
    assert set(losses) == {"perceptual", "perceptual_rectified", "equivariance_value", "equivariance_jacobian",
                           "keypoint_distance"}
    assert torch.isfinite(total) and total.item() == pytest.approx(sum(v.item() for v in losses.values()), rel=1e-5)
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert not any(p.grad is not None for p in tm.perceptual.vgg.parameters())  # VGG stays frozen
