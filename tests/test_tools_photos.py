"""tools/export/efficientnet.py's photo search and split: --wide-calib adds calibration photos without changing
which photos the evaluation crops come from."""

import importlib.util
import os
import sys

import pytest

# loaded by file path under a name of its own: tools/export/ is not put on sys.path (its efficientnet.py would
# shadow any module of that name for the rest of the session)
_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools", "export", "efficientnet.py")
_SPEC = importlib.util.spec_from_file_location("tools_export_efficientnet", _PATH)
ee = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = ee
_SPEC.loader.exec_module(ee)


def _photo(source, name, group=None):
    return {"source": source, "name": name, "path": f"/x/{source}/{name}.jpg", "group": group or f"{source}/{name}"}


def _base(n):
    srcs = ["scikit-image", "darknet", "mate-backgrounds"]
    return [_photo(srcs[i % 3], f"p{i}") for i in range(n)]


@pytest.mark.parametrize("seed", [0, 1, 5])
@pytest.mark.parametrize("n_base,n_extra", [(2, 1), (9, 4), (42, 35)])
def test_calib_only_photos_leave_the_evaluation_split_alone(seed, n_base, n_extra):
    base = _base(n_base)
    extra = [_photo("opencv" if i % 2 else "plasma-wallpapers", f"e{i}", "opencv/pair" if i in (1, 3) else None)
             for i in range(n_extra)]
    cal0, ev0, how0 = ee.split_photos(base, "auto", 1 / 3, seed)
    # the calibration-only photos anywhere in the list: the split of the others must not move
    mixed = base[: n_base // 2] + extra + base[n_base // 2:]
    cal, ev, how = ee.split_with_calib_only(mixed, "auto", 1 / 3, seed)
    assert how == how0 == "photos"
    assert ev == ev0
    assert cal == cal0 + extra
    assert not {p["path"] for p in cal} & {p["path"] for p in ev}


def test_wide_search_finds_the_calibration_only_sources(tmp_path, monkeypatch):
    ocv1, ocv2, plasma = tmp_path / "ocv1", tmp_path / "ocv2", tmp_path / "plasma"
    for d in (ocv1, ocv2):
        d.mkdir()
        for n in ("aero1.jpg", "aero3.jpg", "apple.jpg"):
            (d / n).write_bytes(b"x")
    (ocv1 / "starry_night.jpg").write_bytes(b"x")  # a painting: not listed, not taken
    imgs = plasma / "Path" / "contents" / "images"
    imgs.mkdir(parents=True)
    for n in ("640x480.jpg", "2560x1600.jpg", "5120x600.jpg", "1920x1080.jpg"):
        (imgs / n).write_bytes(b"x")
    monkeypatch.setattr(ee, "OPENCV_DIRS", [str(ocv1), str(ocv2)])
    monkeypatch.setattr(ee, "PLASMA_DIRS", [str(plasma)])
    monkeypatch.setattr(ee, "DARKNET_DIRS", [])
    monkeypatch.setattr(ee, "_package_dir", lambda name: None)
    monkeypatch.setattr(ee.glob, "glob", _only_under(tmp_path, ee.glob.glob))

    assert [p for p in ee.find_photos([]) if p["source"] in ee.CALIB_ONLY_SOURCES] == []
    # files given with --photos are all kept, even with one name in two folders
    extra = [p for p in ee.find_photos([str(ocv1 / "apple.jpg"), str(ocv2 / "apple.jpg")]) if p["source"] == "extra"]
    assert [p["path"] for p in extra] == [str(ocv1 / "apple.jpg"), str(ocv2 / "apple.jpg")]
    found = ee.find_photos([], wide=True)
    got = {(p["source"], p["name"]): p for p in found if p["source"] in ee.CALIB_ONLY_SOURCES}
    # one copy of each photo although two folders hold it; the two aerial views share a scene
    assert sorted(got) == [("opencv", "aero1"), ("opencv", "aero3"), ("opencv", "apple"),
                           ("plasma-wallpapers", "Path")]
    assert got["opencv", "aero1"]["path"] == str(ocv1 / "aero1.jpg")
    assert got["opencv", "aero1"]["group"] == got["opencv", "aero3"]["group"] != got["opencv", "apple"]["group"]
    # the largest wallpaper by pixels (2560x1600: 4.1 M), not the widest (5120x600: 3.1 M)
    assert os.path.basename(got["plasma-wallpapers", "Path"]["path"]) == "2560x1600.jpg"


def _only_under(root, real_glob):
    """glob that sees only the test's folder (the machine's /usr/share/backgrounds must not leak in)."""
    def g(pattern, *a, **k):
        return real_glob(pattern, *a, **k) if str(pattern).startswith(str(root)) else []
    return g
