"""Datasets: video files and frame folders (FOMM layout), frame pairs, workers, clear errors."""
import pickle

import av
import numpy as np
import pytest
import torch
from PIL import Image

from ostnet_fast.data.dataset import DatasetError, FramePairs, find_videos, read_video


def make_video(path, n=6, h=48, w=64, seed=0, codec="libx264"):
    """A small synthetic video: a moving bright box on a background that changes per frame."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 120, size=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=10)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            img = np.zeros((h, w, 3), np.uint8) + base.astype(np.uint8)
            img[..., 0] = (base[0] + 20 * i) % 256
            img[8:20, 4 + 4 * i:20 + 4 * i] = 220
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def make_frame_folder(path, n=5, size=40, seed=0):
    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path / f"{i:07d}.png")
    return path


def fomm_layout(root):
    make_video(root / "train" / "a.mp4", n=6, seed=1)
    make_frame_folder(root / "train" / "b", n=5)
    make_video(root / "test" / "c.mp4", n=4, seed=2)
    return root


def test_fomm_layout_pairs(tmp_path):
    root = fomm_layout(tmp_path / "vox")
    ds = FramePairs(root, size=32, num_repeats=3)
    assert [p.name for p in ds.videos] == ["a.mp4", "b"]  # train/ only
    assert len(ds) == 6  # 2 videos x num_repeats
    for i in range(len(ds)):
        item = ds[i]
        assert item["video"] == i % 2
        for key in ("source", "driving"):
            x = item[key]
            assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
        a, b = item["frames"].tolist()
        assert a != b  # two distinct frames of one video


def test_pairs_are_a_function_of_seed_epoch_index(tmp_path):
    root = fomm_layout(tmp_path / "vox")
    ds1, ds2 = FramePairs(root, 32, num_repeats=4), FramePairs(root, 32, num_repeats=4)
    assert all(torch.equal(ds1[i]["frames"], ds2[i]["frames"]) for i in range(len(ds1)))
    before = [ds1[i]["frames"].tolist() for i in range(len(ds1))]
    ds1.set_epoch(1)
    after = [ds1[i]["frames"].tolist() for i in range(len(ds1))]
    assert before != after  # a new epoch draws new pairs


def test_flat_folder_and_single_video(tmp_path):
    make_video(tmp_path / "x.mkv", n=3, codec="libx264")
    make_video(tmp_path / "y.mp4", n=3)
    assert [p.name for p in find_videos(tmp_path)] == ["x.mkv", "y.mp4"]
    ds = FramePairs(tmp_path / "y.mp4", size=24)
    assert len(ds) == 1 and ds[0]["source"].shape == (3, 24, 24)


def test_non_square_video_is_centre_cropped(tmp_path):
    # 48 x 64 frame: the centre 48 x 48 square is kept; the box at columns 4..20 of frame 0 starts
    # left of the crop (columns 8..56), so its visible part sits at the crop's left edge.
    frames = read_video(make_video(tmp_path / "v.mp4", n=2))
    assert frames.shape == (2, 48, 64, 3)
    ds = FramePairs(tmp_path / "v.mp4", size=48)
    x = ds._video_frames(0)[0].float()  # (C, 48, 48), no resize
    assert x.shape == (3, 48, 48)
    assert x[:, 12:16, 0:8].mean() > 180 and x[:, 12:16, 20:].mean() < 150


def test_dataloader_workers(tmp_path):
    root = fomm_layout(tmp_path / "vox")
    ds = FramePairs(root, size=32, num_repeats=4)
    ds.check()
    assert len(ds._cache) == 0  # nothing decoded stays in the main process
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, shuffle=False)
    batches = list(loader)
    assert len(batches) == 4 and batches[0]["source"].shape == (2, 3, 32, 32)
    single = [ds[i] for i in range(len(ds))]  # same content without workers
    assert torch.equal(batches[1]["driving"][0], single[2]["driving"])


def test_cache_is_small_and_not_pickled(tmp_path):
    for k in range(3):
        make_video(tmp_path / f"v{k}.mp4", n=3, seed=k)
    ds = FramePairs(tmp_path, size=16, cache_videos=2)
    for i in range(3):
        ds[i]
    assert len(ds._cache) == 2  # LRU bound
    assert len(pickle.loads(pickle.dumps(ds))._cache) == 0  # workers start empty


def test_errors_are_clear(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        FramePairs(tmp_path / "missing", 32)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no videos under"):
        FramePairs(tmp_path / "empty", 32)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.mp4").write_bytes(b"\x00" * 100 + b"not a video" * 50)
    ds = FramePairs(tmp_path / "bad", 32)  # lazy: nothing opened yet
    with pytest.raises(DatasetError, match="broken.mp4"):
        ds.check()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="not a video"):
        FramePairs(tmp_path / "notes.txt", 32)
