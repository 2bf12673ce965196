"""Checkpoints: safetensors round trip, atomic writes, clear errors that change nothing, FOMM import."""
import dataclasses
import pickle

import pytest
import torch

from ostnet_fast import OSTNet, load_checkpoint, load_config, load_fomm_checkpoint, save_checkpoint
from ostnet_fast.checkpoint import CheckpointError, load_weights_into

TINY = "tests/configs/tiny.yaml"


def tiny(seed=0):
    torch.manual_seed(seed)
    return OSTNet(TINY).eval(), load_config(TINY)


def params_snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_round_trip_rebuilds_model_from_stored_config(tmp_path):
    model, cfg = tiny()
    path = save_checkpoint(tmp_path / "ckpt" / "model.safetensors", model, cfg)
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]  # no temp file left
    loaded, loaded_cfg = load_checkpoint(path)
    assert loaded_cfg.model == cfg.model
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x, x)["prediction"], loaded(x, x)["prediction"])


def test_save_strips_wrapper_prefixes(tmp_path):
    model, cfg = tiny()
    wrapped = torch.nn.Module()
    wrapped.module = model  # what DDP looks like
    path = save_checkpoint(tmp_path / "m.safetensors", wrapped, cfg)
    loaded, _ = load_checkpoint(path)
    assert set(loaded.state_dict()) == set(model.state_dict())


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_corrupt_file_gives_clear_error_and_changes_nothing(tmp_path):
    model, cfg = tiny()
    path = save_checkpoint(tmp_path / "m.safetensors", model, cfg)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(path)
    target, _ = tiny(seed=1)
    before = params_snapshot(target)
    with pytest.raises(CheckpointError):
        load_weights_into(target, path)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_mismatched_model_gives_clear_error_and_changes_nothing(tmp_path):
    model, cfg = tiny()
    path = save_checkpoint(tmp_path / "m.safetensors", model, cfg)
    torch.manual_seed(3)
    other = OSTNet(dataclasses.replace(cfg.model, num_kp=4))
    before = params_snapshot(other)
    with pytest.raises(CheckpointError, match="shape mismatch|missing|unexpected"):
        load_weights_into(other, path)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def fomm_layout_state(model):
    """A synthetic FOMM vox-cpk.pth.tar: generator + kp_detector state dicts with FOMM's key names."""
    state = model.state_dict()
    gen = {k[len("generator."):]: v.clone() for k, v in state.items()
           if k.startswith("generator.") and ".W_" not in k and not k.endswith("num_batches_tracked")}
    kp = {k[len("kp_detector."):]: v.clone() for k, v in state.items() if k.startswith("kp_detector.")}
    return {"generator": gen, "kp_detector": kp, "discriminator": {}, "epoch": 99}


def test_fomm_checkpoint_loads_and_ostnet_parts_start_as_identity(tmp_path):
    donor, cfg = tiny(seed=7)
    path = tmp_path / "vox-cpk.pth.tar"
    torch.save(fomm_layout_state(donor), path)
    model, _ = load_fomm_checkpoint(path, TINY)
    for k, v in fomm_layout_state(donor)["generator"].items():
        assert torch.equal(model.generator.state_dict()[k], v), k
    assert all((w.weight == 0).all() for w in list(model.generator.W_down) + list(model.generator.W_up))
    src, drv = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        out = model(src, drv)
    # Identity TPS: the driving frame is not rescaled, so FOMM's data flow is reproduced exactly.
    torch.testing.assert_close(out["rectified"], drv, atol=1e-4, rtol=0)


def test_fomm_checkpoint_key_and_shape_errors(tmp_path):
    donor, _ = tiny()
    state = fomm_layout_state(donor)
    del state["generator"]["final.weight"]
    state["generator"]["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth.tar"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"missing: generator\.final\.weight.*unexpected: generator\.extra\.weight"):
        load_fomm_checkpoint(path, TINY)
    torch.save({"generator": {}}, path)
    with pytest.raises(CheckpointError, match="'generator' and 'kp_detector'"):
        load_fomm_checkpoint(path, TINY)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_fomm_loader_refuses_arbitrary_pickles(tmp_path):
    path = tmp_path / "evil.pth.tar"
    with open(path, "wb") as f:
        pickle.dump({"generator": Evil(), "kp_detector": {}}, f)
    with pytest.raises(CheckpointError, match="not a loadable FOMM checkpoint"):
        load_fomm_checkpoint(path, TINY)


def test_fomm_config_loads_fomm_shaped_state(tmp_path):
    # The real FOMM vox-256 layout: 10 keypoints, 2 down blocks, 7x7 final conv.
    torch.manual_seed(0)
    fomm = OSTNet("fomm-vox-256")
    path = tmp_path / "vox-cpk.pth.tar"
    torch.save(fomm_layout_state(fomm), path)
    model, cfg = load_fomm_checkpoint(path)
    assert cfg.name == "fomm-vox-256"
    assert torch.equal(model.generator.final.weight, fomm.generator.final.weight)


def test_written_files_get_the_mode_open_would_give(tmp_path):
    import os
    from ostnet_fast.checkpoint import atomic_write
    mask = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "x.json", lambda tmp: open(tmp, "w").write("{}"))
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
