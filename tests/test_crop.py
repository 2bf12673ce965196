"""Face crop geometry: boxes, crop and paste-back land known squares where they should; the fallback
crop warns once; smoothing moves boxes gradually."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
import warnings

import numpy as np
import pytest
import torch

from ostnet_fast.pipeline.crop import (FaceCropper, FaceCropWarning, center_box, crop, crop_resize, fit_box,
                                       paste_back, paste_back_batch, square_box)


@pytest.mark.parametrize("h,w,box", [
    (144, 176, (16, 0, 160, 144)),  # landscape (the bundled video)
    (100, 60, (0, 20, 60, 80)),     # portrait
    (37, 53, (8, 0, 45, 37)),       # odd sizes
    (64, 64, (0, 0, 64, 64)),       # square: the whole frame
])
def test_center_box(h, w, box):
    assert center_box(h, w) == box


def test_square_box_adds_margin_and_fits_the_frame():
    # A 20x30 face at the centre of 200x200: side = 30 * (1 + 2 * 0.5) = 60.
    assert square_box((90, 85, 110, 115), 200, 200, margin=0.5) == (70, 70, 130, 130)
    # Near the top-left corner: shifted inside, never cut.
    x0, y0, x1, y1 = square_box((0, 0, 20, 20), 100, 120, margin=0.5)
    assert (x0, y0) == (0, 0) and x1 - x0 == y1 - y0 == 40
    # Bigger than the frame: shrunk to the short side.
    assert fit_box(50, 40, 500, 80, 100) == (10, 0, 90, 80)
    with pytest.raises(ValueError, match="x1 > x0"):
        square_box((10, 10, 5, 20), 50, 50)


def _frame_with_square(h, w, box, value=255):
    frame = np.zeros((h, w, 3), np.uint8)
    x0, y0, x1, y1 = box
    frame[y0:y1, x0:x1] = value
    return frame


@pytest.mark.parametrize("box,size", [
    ((30, 20, 70, 60), 40),   # side == size: an exact copy
    ((30, 20, 70, 60), 80),   # 2x upscale
    ((10, 0, 90, 80), 40),    # 2x downscale
])
def test_crop_lands_the_square(box, size):
    x0, y0, x1, y1 = box
    side = x1 - x0
    # A white square covering the middle half of the box.
    q = (x0 + side // 4, y0 + side // 4, x0 + 3 * side // 4, y0 + 3 * side // 4)
    frame = _frame_with_square(80, 120, q)
    face = crop(frame, box, size)
    assert face.shape == (size, size, 3) and face.dtype == np.uint8
    a, b = size // 4, 3 * size // 4
    assert (face[a + 1:b - 1, a + 1:b - 1] == 255).all()  # inside (1 px slack for bilinear edges)
    outside = np.ones((size, size), bool)
    outside[a - 1:b + 1, a - 1:b + 1] = False
    assert (face[outside] == 0).all()
    if side == size:
        np.testing.assert_array_equal(face, frame[y0:y1, x0:x1])


@pytest.mark.parametrize("box,size", [
    ((30, 20, 70, 60), 40),   # same size: exact placement
    ((30, 20, 70, 60), 64),   # the face is shrunk into the box
    ((0, 0, 80, 80), 32),     # at the corner, enlarged
])
def test_paste_back_lands_the_square(box, size):
    h, w = 80, 120
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 100, (h, w, 3), dtype=np.uint8)  # off-zero background
    face = np.zeros((size, size, 3), np.uint8)
    face[size // 4:3 * size // 4, size // 4:3 * size // 4] = 255  # a square in the middle half
    before = frame.copy()
    out = paste_back(frame, face, box)
    x0, y0, x1, y1 = box
    side = x1 - x0
    assert out.shape == frame.shape and out.dtype == np.uint8
    # Outside the box: the frame, untouched.
    mask = np.zeros((h, w), bool)
    mask[y0:y1, x0:x1] = True
    np.testing.assert_array_equal(out[~mask], frame[~mask])
    # Inside: the face's square lands in the middle half of the box.
    a, b = side // 4, 3 * side // 4
    inner = out[y0:y1, x0:x1]
    assert (inner[a + 1:b - 1, a + 1:b - 1] == 255).all()
    ring = np.ones((side, side), bool)
    ring[a - 1:b + 1, a - 1:b + 1] = False
    assert (inner[ring] == 0).all()
    if side == size:
        np.testing.assert_array_equal(inner, face)
    np.testing.assert_array_equal(frame, before)  # the input frame is not modified


def test_crop_then_paste_back_is_the_identity_inside_the_box():
    torch.manual_seed(0)
    frames = torch.rand(2, 3, 50, 70)
    boxes = torch.tensor([[10, 5, 50, 45], [30, 10, 70, 50]])  # side 40, different places
    faces = crop_resize(frames, boxes, 40)
    out = paste_back_batch(frames, faces, boxes)
    torch.testing.assert_close(out, frames, atol=1e-5, rtol=0)  # grid normalisation rounding only


def test_paste_back_feather_blends_only_inside():
    frame = np.zeros((60, 60, 3), np.uint8)
    face = np.full((32, 32, 3), 200, np.uint8)
    out = paste_back(frame, face, (10, 10, 50, 50), feather=0.2)
    assert (out[:10] == 0).all() and (out[:, :10] == 0).all()
    assert (out[30, 30] == 200).all()         # centre: the face
    assert 0 < out[30, 11, 0] < 200           # edge: a blend


def test_paste_back_rejects_bad_shapes():
    with pytest.raises(ValueError, match="boxes must be"):
        paste_back_batch(torch.zeros(2, 3, 20, 20), torch.zeros(2, 3, 8, 8), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="faces must be"):
        paste_back_batch(torch.zeros(2, 3, 20, 20), torch.zeros(1, 3, 8, 8), torch.zeros(2, 4))


def test_fallback_cropper_warns_once_and_centres():
    with pytest.warns(FaceCropWarning, match="centre") as record:
        cropper = FaceCropper("auto") if not importlib.util.find_spec("facenet_pytorch") else FaceCropper(
            lambda frames: [None] * len(frames))
        boxes = cropper.boxes(np.zeros((3, 144, 176, 3), np.uint8))
        boxes2 = cropper.boxes(np.zeros((2, 144, 176, 3), np.uint8))
    assert len(record) == 1
    assert (boxes == (16, 0, 160, 144)).all() and boxes2.shape == (2, 4)


def test_center_detector_is_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cropper = FaceCropper("center")
        assert cropper.box(np.zeros((100, 60, 3), np.uint8)) == (0, 20, 60, 80)


def test_no_face_found_falls_back_with_a_warning():
    calls = []

    def detector(frames):  # a face only in the second frame of each call
        calls.append(len(frames))
        return [None if i != 1 else (60, 40, 100, 80) for i in range(len(frames))]

    cropper = FaceCropper(detector, margin=0.0, smoothing=0.0)
    with pytest.warns(FaceCropWarning, match="no face found") as record:
        boxes = cropper.boxes(np.zeros((3, 120, 160, 3), np.uint8))
    assert len(record) == 1
    assert tuple(boxes[0]) == center_box(120, 160)  # nothing found yet: the centre
    assert tuple(boxes[1]) == (60, 40, 100, 80)     # the face (margin 0)
    assert tuple(boxes[2]) == (60, 40, 100, 80)     # lost again: keep the last face
    with pytest.warns(FaceCropWarning, match="source image"):
        assert cropper.box(np.zeros((120, 160, 3), np.uint8)) == center_box(120, 160)


def test_smoothing_moves_boxes_gradually_and_detect_every_holds():
    faces = iter([(0, 0, 40, 40)] + [(100, 60, 140, 100)] * 20)
    seen = []

    def detector(frames):
        seen.append(len(frames))
        return [next(faces) for _ in frames]

    cropper = FaceCropper(detector, margin=0.0, smoothing=0.5)
    boxes = cropper.boxes(np.zeros((6, 120, 160, 3), np.uint8))
    x0 = boxes[:, 0]
    assert x0[0] == 0 and np.all(np.diff(x0) > 0) and x0[-1] < 100 and x0[-1] > 90  # EMA: approaches 100
    assert (boxes[:, 2] - boxes[:, 0] == 40).all()
    cropper = FaceCropper(detector, margin=0.0, smoothing=0.0, detect_every=3)
    seen.clear()
    cropper.boxes(np.zeros((7, 120, 160, 3), np.uint8))
    assert seen == [3]  # frames 0, 3, 6


@pytest.mark.skipif(importlib.util.find_spec("facenet_pytorch") is not None, reason="facenet-pytorch installed")
def test_mtcnn_asked_for_but_missing():
    with pytest.raises(ImportError, match="facenet-pytorch"):
        FaceCropper("mtcnn")


def test_bad_cropper_arguments():
    with pytest.raises(ValueError, match="smoothing"):
        FaceCropper("center", smoothing=1.0)
    with pytest.raises(ValueError, match="detector"):
        FaceCropper("haar")


def _fake_facenet(monkeypatch, mtcnn_class):
    """Install a stand-in `facenet_pytorch` module (the real one needs a torchvision built for this torch):
    what is checked is our adapter around MTCNN.detect, not the detector."""
    module = types.ModuleType("facenet_pytorch")
    module.__spec__ = importlib.machinery.ModuleSpec("facenet_pytorch", None)
    module.MTCNN = mtcnn_class
    monkeypatch.setitem(sys.modules, "facenet_pytorch", module)


class _BatchMTCNN:
    """MTCNN.detect's batch output as facenet-pytorch 2.6 gives it: per frame a (K, 4) box array and (K,)
    probabilities, unsorted; a faceless frame gives None and [None]; ragged, so object arrays."""

    def __init__(self, keep_all, device):
        assert keep_all is False and device == torch.device("cpu")

    def detect(self, batch):
        assert batch.shape == (3, 40, 60, 3) and batch.dtype == np.uint8
        boxes = np.empty(3, dtype=object)
        boxes[:] = [np.array([[1.0, 2.0, 11.0, 12.0], [20.0, 10.0, 40.0, 30.0]]), None,
                    np.array([[3.0, 4.0, 13.0, 14.0]])]
        probs = np.empty(3, dtype=object)
        probs[:] = [np.array([0.71, 0.99]), [None], np.array([0.9])]
        return boxes, probs


def test_mtcnn_adapter_takes_each_frames_most_confident_face(monkeypatch):
    from ostnet_fast.pipeline.crop import _load_mtcnn
    _fake_facenet(monkeypatch, _BatchMTCNN)
    detect, why = _load_mtcnn("cpu")
    assert why == ""
    frames = [np.zeros((40, 60, 3), np.uint8)] * 3
    first, faceless, last = detect(frames)
    np.testing.assert_array_equal(first, [20.0, 10.0, 40.0, 30.0])  # probability 0.99, listed second
    assert faceless is None and first.dtype == np.float64
    np.testing.assert_array_equal(last, [3.0, 4.0, 13.0, 14.0])
    cropper = FaceCropper("mtcnn", margin=0.0, smoothing=0.0)
    assert cropper.method == "mtcnn"
    with pytest.warns(FaceCropWarning, match="no face found in frame 1"):
        boxes = cropper.boxes(np.stack(frames))
    # the 20 x 20 face (no margin), held over the faceless frame, then the 10 x 10 one
    assert np.asarray(boxes).tolist() == [[20, 10, 40, 30], [20, 10, 40, 30], [3, 4, 13, 14]]


def test_mtcnn_that_cannot_start_is_a_clear_error_or_the_centre_crop(monkeypatch):
    class Broken:
        def __init__(self, keep_all, device):
            raise RuntimeError("operator torchvision::nms does not exist")

    _fake_facenet(monkeypatch, Broken)
    with pytest.raises(ImportError, match="torchvision::nms"):
        FaceCropper("mtcnn")
    with pytest.warns(FaceCropWarning, match="could not start"):
        cropper = FaceCropper("auto")
    assert cropper.method == "center"
