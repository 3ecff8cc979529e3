"""tools/bench/loops.py: its text windows and its split of the Debian descriptions (the training and the torch
export are not run here)."""

import os

import builders
import numpy as np
import pytest


@pytest.fixture(scope="module")
def lp():
    return builders.load_bench("loops")


def test_windows_are_runs_of_each_text_in_turn(lp):
    texts = ["abcdefghijklmnopqrstuvwxyz", "short", "caf\u00e9 au lait, s'il vous pla\u00eet"]
    w = lp.windows(texts, 8, 7, seed=0)
    assert w.shape == (9, 7) and w.dtype == np.int64 and w.min() >= 0 and w.max() < 128
    for i in range(7):
        raw = texts[i % 3].encode("ascii", "replace")
        run = bytes(w[:, i].astype(np.uint8))
        assert run in raw * 4  # (a text shorter than a window repeats)
    assert set(lp.windows(["\u00e9\u00e8" * 20], 8, 2, seed=0).ravel().tolist()) == {ord("?")}  # (non-ASCII)


@pytest.mark.skipif(not os.path.exists("/var/lib/dpkg/status"), reason="no Debian package database here")
def test_the_text_sets_share_no_text_and_calibration_is_capped(lp):
    sets = lp.text_sets(calib=10)
    assert len(sets["calibration"]) == 10 and all(sets[s] for s in ("dev", "E1", "E2", "E3"))
    seen = {}
    for name, texts in sets.items():
        for t in texts:
            assert seen.setdefault(t, name) == name, (t[:40], name, seen[t])
