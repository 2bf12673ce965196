"""The optional face packages, exercised for real when installed (skipped otherwise):

- facenet-pytorch's MTCNN behind `FaceCropper(detector="mtcnn"|"auto")` on the bundled photo and video;
- dlib + face-recognition-models behind `FaceMetrics` (AKD / AED) and `ostnet-fast eval --face-metrics`.

The expected boxes and tolerances were measured with facenet-pytorch 2.6.0 (torchvision 0.28, torch 2.13)
and dlib-bin 20.0.1 with face-recognition-models 0.3.0; the margins are several times the spread seen.
"""
import importlib.util
import warnings

import numpy as np
import pytest
import torch

from ostnet_fast.data import bundled
from ostnet_fast.pipeline.crop import FaceCropper, FaceCropWarning, _load_mtcnn, center_box

TINY = "tests/configs/tiny.yaml"


# --------------------------------------------------------------------------------------------------
# MTCNN (facenet-pytorch)


@pytest.fixture(scope="module")
def mtcnn():
    if importlib.util.find_spec("facenet_pytorch") is None:
        pytest.skip("facenet-pytorch is not installed")
    detect, why = _load_mtcnn("cpu")
    if detect is None:  # e.g. a torchvision built for another torch: an environment problem, not ours
        pytest.skip(why)
    return detect


@pytest.fixture(scope="module")
def driving_frames():
    from ostnet_fast.pipeline.video import read_video
    frames, _ = read_video(bundled.driving_video_path(), max_frames=4)
    return frames  # (4, 144, 176, 3) uint8


def test_mtcnn_finds_the_bundled_face(mtcnn):
    image = bundled.source_image()  # (512, 512, 3); measured face box (181.1, 62.2, 267.7, 172.1)
    (face,) = mtcnn([image])
    assert face is not None and face.shape == (4,) and face.dtype == np.float64
    x0, y0, x1, y1 = face
    assert 150 < x0 < 210 and 40 < y0 < 90 and 240 < x1 < 300 and 145 < y1 < 200, face
    box = FaceCropper("mtcnn").box(image)  # measured (125, 18, 323, 216)
    bx0, by0, bx1, by1 = box
    assert bx1 - bx0 == by1 - by0 and 0 <= bx0 and 0 <= by0 and bx1 <= 512 and by1 <= 512, box
    assert bx0 <= x0 and by0 <= y0 and x1 <= bx1 and y1 <= by1, (box, face)  # margin 0.4 around the face


def test_mtcnn_tracks_the_driving_video_face(mtcnn, driving_frames):
    faces = mtcnn(list(driving_frames))  # measured boxes about (63, 36, 111, 95) in 176 x 144 frames
    assert all(f is not None for f in faces)
    centres = np.array([[(f[0] + f[2]) / 2, (f[1] + f[3]) / 2] for f in faces])  # (4, 2) about (87, 66)
    assert np.abs(centres - [87, 66]).max() < 15, centres
    boxes = FaceCropper("mtcnn", smoothing=0.8).boxes(driving_frames)  # (4, 4), measured (36, 15, 140, 119)
    sides = boxes[:, 2] - boxes[:, 0]
    assert (sides == boxes[:, 3] - boxes[:, 1]).all() and (boxes[:, :2] >= 0).all()
    assert (boxes[:, 2] <= 176).all() and (boxes[:, 3] <= 144).all()
    assert (sides > 80).all() and (sides < 144).all(), boxes  # face plus margin, not the centre square


def test_mtcnn_batch_with_a_faceless_frame(mtcnn, driving_frames):
    frame = driving_frames[0]
    faces = mtcnn([frame, np.zeros_like(frame), frame])  # facenet returns ragged object arrays here
    assert faces[1] is None
    assert faces[0].dtype == np.float64 and np.array_equal(faces[0], faces[2])


def test_mtcnn_no_face_keeps_the_centre_square(mtcnn):
    blank = np.zeros((64, 80, 3), np.uint8)
    with pytest.warns(FaceCropWarning, match="no face"):
        assert FaceCropper("mtcnn").box(blank) == center_box(64, 80)


def test_auto_picks_mtcnn_when_it_loads(mtcnn):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FaceCropWarning)
        assert FaceCropper("auto").method == "mtcnn"


# --------------------------------------------------------------------------------------------------
# AKD / AED (dlib + face-recognition-models)


@pytest.fixture(scope="module")
def face_metrics():
    pytest.importorskip("dlib")
    # Not importorskip: face_recognition_models' __init__ imports pkg_resources (gone from current setuptools),
    # and FaceMetrics locates its model files without importing it.
    if importlib.util.find_spec("face_recognition_models") is None:
        pytest.skip("face-recognition-models is not installed")
    from ostnet_fast.train.metrics import FaceMetrics
    return FaceMetrics()


@pytest.fixture(scope="module")
def source():
    return torch.from_numpy(bundled.source_image()).permute(2, 0, 1)[None].float() / 255  # (1, 3, 512, 512)


@pytest.mark.parametrize("layout", [
    "hwc_memory",  # a permuted view of an HWC array, as from a decoded frame
    "chw_contiguous",  # as a model's output: dlib then needs a C-order HWC copy (a TypeError before)
])
def test_akd_aed_of_an_image_with_itself_are_zero(face_metrics, source, layout):
    x = source if layout == "hwc_memory" else source.contiguous()
    akd, aed = face_metrics(x, x)
    assert akd == [0.0] and aed == [0.0]


@pytest.mark.parametrize("shift", [
    3,   # below the HOG detector's box step: the landmarks alone follow (measured 2.83)
    10,  # the detector box steps along too (measured 10.00)
])
def test_akd_of_a_shifted_image_is_the_shift(face_metrics, source, shift):
    moved = torch.roll(source, shifts=shift, dims=3)  # the face moves `shift` px right
    akd, aed = face_metrics(source, moved)
    assert akd[0] == pytest.approx(shift, abs=0.5)  # measured within 0.2 px for shifts 1 .. 20
    assert 0 <= aed[0] < 0.1  # same face: embeddings move little (measured <= 0.05; 0.6 = another person)


def test_face_missing_in_one_image_gives_none(face_metrics, source):
    small = torch.nn.functional.interpolate(source, size=256, mode="bilinear", antialias=True, align_corners=False)
    other = torch.cat([torch.roll(small, 2, dims=3), torch.zeros_like(small)])  # moved 2 px; no face
    akd, aed = face_metrics(torch.cat([small, small]), other)
    assert akd[0] == pytest.approx(2, abs=0.5) and aed[0] < 0.1  # measured 2.03, 0.03
    assert akd[1] is None and aed[1] is None


def test_eval_face_metrics_counts_missing_faces(face_metrics, tmp_path):
    from ostnet_fast import OSTNet, load_config, save_checkpoint
    from ostnet_fast.train.evaluate import EvalOptions, evaluate

    from .test_dataset import make_video
    torch.manual_seed(0)
    cfg = load_config(TINY)
    save_checkpoint(tmp_path / "model.safetensors", OSTNet(cfg.model), cfg)
    make_video(tmp_path / "data" / "test" / "t0.mp4", n=3, seed=3)  # a moving box: no face anywhere
    doc = evaluate(EvalOptions(checkpoint=str(tmp_path / "model.safetensors"), data=str(tmp_path / "data"),
                               device="cpu", protocols=("same_scale",), max_frames=2, face_metrics=True),
                   progress=False)
    r = doc["results"]["same_scale"]
    assert r["pairs"] == 2 and r["face_missing"] == 2 and r["akd"] is None and r["aed"] is None
    assert doc["definitions"]["akd_aed"].startswith("dlib")
