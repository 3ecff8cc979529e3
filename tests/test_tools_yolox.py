"""tools/bench/yolox.py: the YOLOX decoding (ddddocr's demo_postprocess and NMS) and the captcha views' drawn
characters, on hand-made outputs and images (the model and the photos are not needed)."""

import builders
import numpy as np
import pytest

PIL = pytest.importorskip("PIL")


@pytest.fixture(scope="module")
def yx():
    return builders.load_bench("yolox")


def _anchor(stride: int, gx: int, gy: int) -> int:
    """The row of the output [3549, 6] of the anchor point (gx, gy) at ``stride`` (416 input: 52^2, 26^2, 13^2)."""
    off = {8: 0, 16: 52 * 52, 32: 52 * 52 + 26 * 26}[stride]
    return off + gy * (416 // stride) + gx


def _put(out, stride, gx, gy, dx, dy, w, h, obj, cls):
    i = _anchor(stride, gx, gy)
    out[i] = [dx, dy, np.log(w / stride), np.log(h / stride), obj, cls]
    centre = ((gx + dx) * stride, (gy + dy) * stride)
    return [centre[0] - w / 2, centre[1] - h / 2, centre[0] + w / 2, centre[1] + h / 2]


def test_decode_places_boxes_on_their_grid_and_stride(yx):
    out = np.zeros((3549, 6), np.float32)  # every score 0: no box
    a = _put(out, 8, 10, 20, 0.5, 0.25, 40.0, 32.0, 0.95, 0.9)  # score 0.855
    b = _put(out, 32, 3, 7, 0.0, 0.5, 64.0, 96.0, 0.5, 0.5)  # 0.25
    _put(out, 16, 5, 5, 0.5, 0.5, 30.0, 30.0, 0.3, 0.3)  # 0.09: under ddddocr's 0.1
    got = yx.decode(out, 0.1)
    assert np.allclose(got["boxes"], [a, b], atol=1e-4)  # highest score first
    assert np.allclose(got["score"], [0.95 * 0.9, 0.25], atol=1e-6)
    assert got["cls"].tolist() == [0, 0]
    assert len(yx.decode(out, 0.3)["boxes"]) == 1  # the threshold is on objectness x class score
    assert len(yx.decode(np.zeros((3549, 6), np.float32), 0.1)["boxes"]) == 0


def test_decode_suppresses_overlaps_above_045_only(yx):
    out = np.zeros((3549, 6), np.float32)
    a = _put(out, 8, 10, 10, 0.5, 0.5, 40.0, 40.0, 1.0, 0.9)
    _put(out, 8, 11, 10, 0.5, 0.5, 40.0, 40.0, 1.0, 0.8)  # shifted 8 px: IoU 32/48 = 0.67 with a, dropped
    c = _put(out, 8, 13, 10, 0.5, 0.5, 40.0, 40.0, 1.0, 0.7)  # shifted 24 px: IoU 16/64 = 0.25 with a, kept
    got = yx.decode(out, 0.1)
    assert np.allclose(got["boxes"], [a, c], atol=1e-4)
    assert np.allclose(got["score"], [0.9, 0.7], atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_drawn_characters_are_inside_apart_and_the_only_change(yx, seed):
    from PIL import Image, ImageFont

    rng = np.random.default_rng(seed)
    base = (np.arange(200 * 300 * 3).reshape(200, 300, 3) % 251).astype(np.uint8)
    img = Image.fromarray(base)
    boxes = yx.draw_captcha(rng, img, [ImageFont.load_default(size=32)], "ABCDEFGHKMNPRSTWXYZ")
    assert 1 <= len(boxes) <= 6
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 300).all() and (boxes[:, 3] <= 200).all()
    iou = yx.iou_matrix(boxes, boxes)
    assert np.allclose(iou - np.eye(len(boxes)), 0)  # no two characters overlap
    changed = (np.asarray(img) != base).any(2)
    inside = np.zeros_like(changed)
    for x1, y1, x2, y2 in boxes.astype(int):
        assert changed[y1:y2, x1:x2].any()  # something was drawn in each box
        inside[y1:y2, x1:x2] = True
    assert not changed[~inside].any()  # and nothing outside them
