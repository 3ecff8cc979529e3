"""A hostile corpus for the command line (issue 14, section 3: never lose or corrupt a file).

Every case runs ``onnxcomq quantize`` or ``onnxcomq eval`` on small models built with onnx.helper, in-process
(``onnxcomq.cli.main``) where it can and in a child process where it needs signals or resource limits, and asserts:
a non-zero exit status, exactly one line on stderr and that it starts with ``onnxcomq: error:`` (warning lines aside),
no traceback, and that the folder holding every input and output is exactly as it was: no output, report, external
data or ``.onnxcomq-*`` temporary left, and every file there (model, external data, calibration data, existing
outputs) byte for byte unchanged (sha256).

The bad-input cases of tests/test_cli.py (``_bad_cases``: unreadable models and calibration data, bad options, the
output is the input, a missing output folder, ...) belong to the same corpus and are not repeated here.
"""

import errno
import hashlib
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import builders
import numpy as np
import onnx
import pytest

from onnxcomq.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------------------- helpers

def snapshot(folder) -> dict:
    """{relative path: sha256 | 'dir' | 'link -> target' | 'fifo'} of everything under ``folder``, hidden files too."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, folder)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = "link -> " + os.readlink(p)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = "dir"
            elif stat.S_ISFIFO(st.st_mode):
                out[rel] = "fifo"
            else:
                with open(p, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


def error_lines(err: str) -> list:
    return [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("onnxcomq: warning:")]


def assert_one_line_error(rc, err, needle, want_rc=2):
    lines = error_lines(err)
    assert rc != 0, err
    assert rc == want_rc, (rc, err)
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("onnxcomq: error:"), err
    assert needle in lines[0], (needle, lines[0])


class Env:
    """A scratch folder with a small MLP (8 -> 6 -> 5), its calibration data and labelled data."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.model = str(tmp / "m.onnx")
        onnx.save(builders.mlp_model([8, 6, 5]), self.model)
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal((16, 8)).astype(np.float32)
        self.calib = str(tmp / "calib.npz")
        np.savez(self.calib, input=self.x)
        self.out = str(tmp / "q.onnx")
        self.report = str(tmp / "r.json")
        self.cleanups = []

    def path(self, *parts) -> str:
        return str(self.tmp.joinpath(*parts))

    def ext_model(self, location="m_ext.data", name="mx.onnx") -> str:
        """The MLP with every tensor in an external data file ``location``."""
        p = self.path(name)
        onnx.save(builders.mlp_model([8, 6, 5]), p, save_as_external_data=True, all_tensors_to_one_file=True,
                  location=location, size_threshold=0)
        assert os.path.exists(self.path(location))
        return p

    def calib_folder(self) -> str:
        d = self.tmp / "calibdir"
        d.mkdir()
        np.savez(d / "part0.npz", input=self.x[:8])
        np.savez(d / "part1.npz", input=self.x[8:])
        return str(d)

    def immutable(self, path: str) -> str:
        """chattr +i (root ignores permission bits, not the immutable flag); skips where unsupported."""
        r = subprocess.run(["chattr", "+i", path], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"chattr +i unsupported here: {r.stderr.decode().strip()}")
        self.cleanups.append(lambda: subprocess.run(["chattr", "-i", path], capture_output=True))
        return path

    def labelled(self, labels, name="data.npz", x=None) -> str:
        p = self.path(name)
        np.savez(p, input=self.x if x is None else x, labels=labels)
        return p


def quantize(env, *extra, model=None, out=None, calib=None):
    return ["quantize", model or env.model, "-o", env.out if out is None else out, "--calib",
            calib or env.calib, "--quiet", "--device", "cpu", *extra]


# ------------------------------------------------------------------------------------------------ in-process corpus
# Each case: (id, build(env) -> argv, message fragment, exit status).

def _hardlink(env, src, name):
    p = env.path(name)
    os.link(src, p)
    return p


def _symlink(env, src, name):
    p = env.path(name)
    os.symlink(src, p)
    return p


def _fifo(env, name):
    p = env.path(name)
    os.mkfifo(p)
    return p


def _existing(env, name, text="old contents\n"):
    p = env.path(name)
    with open(p, "w") as f:
        f.write(text)
    return p


LONG = "x" * 300


CASES = [
    # outputs that would replace an input
    ("out is model, other spelling", lambda e: quantize(e, out=e.path("sub", "..", "m.onnx")) if
     os.makedirs(e.path("sub")) is None else None, "output path is the input model"),
    ("out is a hard link to the model", lambda e: quantize(e, out=_hardlink(e, e.model, "hl.onnx")),
     "output path is the input model"),
    ("out is a symlink to the model", lambda e: quantize(e, out=_symlink(e, e.model, "sl.onnx")),
     "output path is the input model"),
    ("out is the model through a symlinked folder",
     lambda e: quantize(e, out=os.path.join(_symlink(e, str(e.tmp), "alias"), "m.onnx")),
     "output path is the input model"),
    ("report is the model", lambda e: quantize(e, "--report", e.model), "--report path is the input model"),
    ("report is a symlink to the model", lambda e: quantize(e, "--report", _symlink(e, e.model, "r.json")),
     "--report path is the input model"),
    ("report is a hard link to the model", lambda e: quantize(e, "--report", _hardlink(e, e.model, "r.json")),
     "--report path is the input model"),
    ("out is the calibration file", lambda e: quantize(e, out=e.calib), "output path is the calibration file"),
    ("report is the calibration file", lambda e: quantize(e, "--report", e.calib),
     "--report path is the calibration file"),
    ("out is a hard link to the calibration file", lambda e: quantize(e, out=_hardlink(e, e.calib, "c2.onnx")),
     "output path is the calibration file"),
    ("out is the .npy calibration file",
     lambda e: quantize(e, calib=(np.save(e.path("c.npy"), e.x), e.path("c.npy"))[1], out=e.path("c.npy")),
     "output path is the calibration file"),
    ("out is a file of the calibration folder",
     lambda e: quantize(e, calib=e.calib_folder(), out=e.path("calibdir", "part0.npz")),
     "of the calibration folder"),
    ("out is a new .npz in the calibration folder",
     lambda e: quantize(e, calib=e.calib_folder(), out=e.path("calibdir", "model.npz")),
     "is in the calibration folder"),
    ("report is a file of the calibration folder (folder given with a slash)",
     lambda e: quantize(e, "--report", e.path("calibdir", "part1.npz"), calib=e.calib_folder() + "/"),
     "of the calibration folder"),
    ("out is a hard link elsewhere to a calibration folder file",
     lambda e: quantize(e, calib=e.calib_folder(), out=(os.mkdir(e.path("o")), _hardlink(
         e, e.path("calibdir", "part1.npz"), os.path.join("o", "q.onnx")))[1]),
     "is the calibration file part1.npz"),
    ("report is a hard link elsewhere to the model's external data",
     lambda e: quantize(e, "--report", (e.ext_model(), os.mkdir(e.path("o")), _hardlink(
         e, e.path("m_ext.data"), os.path.join("o", "r.json")))[2], model=e.path("mx.onnx")),
     "is the input model's external data file"),
    ("out is the model's external data", lambda e: quantize(e, model=e.ext_model(), out=e.path("m_ext.data")),
     "is the input model's external data file"),
    ("report is the model's external data",
     lambda e: quantize(e, "--report", e.path("m_ext.data"), model=e.ext_model()),
     "is the input model's external data file"),
    ("out's .data sidecar is the model's external data",
     lambda e: quantize(e, model=e.ext_model(location="q.onnx.data")),
     "the output's external data file"),
    ("report is the output", lambda e: quantize(e, "--report", e.out), "--report path is the same file as the output"),
    ("report is a symlink to the existing output",
     lambda e: quantize(e, "--report", _symlink(e, _existing(e, "q.onnx"), "r.json")),
     "--report path is the same file as the output"),
    ("report is the output's .data sidecar", lambda e: quantize(e, "--report", e.out + ".data"),
     "--report path is the same file as the output"),
    # output paths that cannot be written
    ("out is empty", lambda e: quantize(e, out=""), "output path is empty"),
    ("report is empty", lambda e: quantize(e, "--report", ""), "report path is empty"),
    ("out is an existing folder with a slash", lambda e: quantize(e, out=str(e.tmp) + "/"), "names a folder"),
    ("out is a new name with a slash", lambda e: quantize(e, out=e.path("new") + "/"), "names a folder"),
    ("out is .", lambda e: quantize(e, out=os.path.join(str(e.tmp), ".")), "names a folder"),
    ("report is a folder", lambda e: quantize(e, "--report", str(e.tmp)), "is a directory"),
    ("report folder missing", lambda e: quantize(e, "--report", e.path("nope", "r.json")),
     "report folder"),
    ("out below a file", lambda e: quantize(e, out=os.path.join(e.model, "q.onnx")), "is not a folder"),
    ("out name too long", lambda e: quantize(e, out=e.path(LONG + ".onnx")), "longer than the file system's limit"),
    ("report name too long", lambda e: quantize(e, "--report", e.path(LONG + ".json")),
     "longer than the file system's limit"),
    ("out in /proc", lambda e: quantize(e, out="/proc/onnxcomq-hostile.onnx"), "cannot write the output"),
    ("report in /proc/self", lambda e: quantize(e, "--report", "/proc/self/onnxcomq-hostile.json"),
     "cannot write the report"),
    ("out is a fifo", lambda e: quantize(e, out=_fifo(e, "fifo.onnx")), "not a regular file"),
    ("report is a fifo", lambda e: quantize(e, "--report", _fifo(e, "fifo.json")), "not a regular file"),
    ("out in an immutable folder",
     lambda e: quantize(e, out=os.path.join(e.immutable((os.mkdir(e.path("ro")), e.path("ro"))[1]), "q.onnx")),
     "cannot write the output"),
    ("report in an immutable folder",
     lambda e: quantize(e, "--report", os.path.join(e.immutable((os.mkdir(e.path("ro")), e.path("ro"))[1]),
                                                    "r.json")),
     "cannot write the report"),
    # the run goes to the end and the write fails: nothing may be left, existing outputs stay as they were
    ("existing out is immutable", lambda e: quantize(e, out=e.immutable(_existing(e, "q.onnx"))),
     "cannot write"),
    ("existing report is immutable: no model either",
     lambda e: quantize(e, "--report", e.immutable(_existing(e, "r.json"))), "cannot write"),
    ("existing report immutable, existing out kept",
     lambda e: quantize(e, "--report", e.immutable(_existing(e, "r.json")), out=_existing(e, "q.onnx", "v1\n")),
     "cannot write"),
    # options that cannot run
    ("device gpu without a GPU", lambda e: quantize(e)[:-2] + ["--device", "gpu"], "--device gpu"),
    ("block size wider than every layer",
     lambda e: quantize(e, "--granularity", "block", "--block-size", "100000"), "fan-in 8"),
    ("argparse: bits not a number", lambda e: quantize(e, "--bits", "four"), "invalid int value"),
    ("argparse: unknown option", lambda e: quantize(e, "--frobnicate"), "unrecognized arguments"),
    ("argparse: missing --calib", lambda e: ["quantize", e.model, "-o", e.out], "--calib"),
    # eval
    ("eval batch size 0", lambda e: ["eval", e.model, "--data", e.labelled(np.zeros(16, np.int64)),
                                     "--batch-size", "0"], "--batch-size must be a positive integer"),
    ("eval batch size -1", lambda e: ["eval", e.model, "--data", e.labelled(np.zeros(16, np.int64)),
                                      "--batch-size", "-1"], "--batch-size must be a positive integer"),
    ("eval float labels", lambda e: ["eval", e.model, "--data", e.labelled(np.zeros(16, np.float32))],
     "integer class indices, got dtype float32"),
    ("eval bool labels", lambda e: ["eval", e.model, "--data", e.labelled(np.zeros(16, bool))],
     "integer class indices"),
    ("eval labels too short", lambda e: ["eval", e.model, "--data", e.labelled(np.zeros(15, np.int64))],
     "'labels' has 15 entries, the inputs have 16"),
    ("eval labels out of range", lambda e: ["eval", e.model, "--data", e.labelled(np.full(16, 5, np.int64))],
     "has 5 classes"),
    ("eval negative labels", lambda e: ["eval", e.model, "--data", e.labelled(np.full(16, -1, np.int64))],
     "negative class index"),
    ("eval labels 2-D", lambda e: ["eval", e.model, "--data", e.labelled(np.zeros((16, 5), np.int64))],
     "one class index per sample"),
    ("eval data is a folder", lambda e: ["eval", e.model, "--data", str(e.tmp)], "cannot read"),
]


@pytest.mark.parametrize("build,needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_cli_case(tmp_path, capsys, build, needle):
    env = Env(tmp_path)
    try:
        argv = build(env)
        before = snapshot(tmp_path)
        capsys.readouterr()
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse's errors (and only they) leave main this way
            rc = e.code
        err = capsys.readouterr().err
        assert_one_line_error(rc, err, needle)
        assert snapshot(tmp_path) == before
    finally:
        for c in env.cleanups:
            c()


# --------------------------------------------------------------------- failures injected in-process (monkeypatch)

def _boom(exc):
    def f(*a, **k):
        raise exc
    return f


INJECTED = [
    # (id, target, replacement factory, fragment, exit status)
    ("unexpected exception in the run", "onnxcomq.pipeline.run", lambda: _boom(ValueError("boom\nsecond line")),
     "internal error: ValueError: boom; second line (rerun with --debug for the traceback)", 1),
    ("out of memory in the run", "onnxcomq.pipeline.run",
     lambda: _boom(MemoryError("Unable to allocate 37.3 GiB for an array")), "out of memory", 1),
    ("Ctrl-C in the run", "onnxcomq.pipeline.run", lambda: _boom(KeyboardInterrupt()), "interrupted", 130),
    ("disk full while writing the model", "onnx.save",
     lambda: _boom(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))), "No space left on device", 2),
]


@pytest.mark.parametrize("target,factory,needle,want_rc", [c[1:] for c in INJECTED], ids=[c[0] for c in INJECTED])
def test_hostile_cli_injected(tmp_path, capsys, monkeypatch, target, factory, needle, want_rc):
    env = Env(tmp_path)
    _existing(env, "q.onnx", "previous model\n")
    monkeypatch.setattr(target, factory())
    before = snapshot(tmp_path)
    rc = main(quantize(env, "--report", env.report))
    assert_one_line_error(rc, capsys.readouterr().err, needle, want_rc)
    assert snapshot(tmp_path) == before


def _interrupt_after_write(exc):
    """onnx.save that writes its file, then fails as if Ctrl-C (or an error) arrived just after."""
    real = onnx.save

    def save(model, path, *a, **k):
        real(model, path, *a, **k)
        assert os.path.basename(os.path.dirname(str(path))).startswith(".onnxcomq-")  # staged, not in place
        raise exc
    return save


@pytest.mark.parametrize("exc,needle,want_rc", [(KeyboardInterrupt(), "interrupted", 130),
                                                (OSError(errno.EFBIG, "File too large"), "File too large", 2)],
                         ids=["Ctrl-C after the model is staged", "error after the model is staged"])
def test_hostile_cli_failure_after_staging(tmp_path, capsys, monkeypatch, exc, needle, want_rc):
    env = Env(tmp_path)
    monkeypatch.setattr("onnx.save", _interrupt_after_write(exc))
    before = snapshot(tmp_path)
    rc = main(quantize(env, "--report", env.report))
    assert_one_line_error(rc, capsys.readouterr().err, needle, want_rc)
    assert snapshot(tmp_path) == before


def test_hostile_cli_commit_rolls_back(tmp_path, capsys, monkeypatch):
    """The second rename of the model + report pair fails: the first is undone, the old files are back."""
    env = Env(tmp_path)
    _existing(env, "q.onnx", "previous model\n")
    _existing(env, "r.json", "previous report\n")
    real, calls = os.replace, []

    def replace(src, dst, *a, **k):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.EIO, "Input/output error")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)
    before = snapshot(tmp_path)
    rc = main(quantize(env, "--report", env.report))
    assert_one_line_error(rc, capsys.readouterr().err, "Input/output error")
    assert snapshot(tmp_path) == before
    assert len(calls) >= 2


def test_internal_error_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    env = Env(tmp_path)
    monkeypatch.setattr("onnxcomq.pipeline.run", _boom(ValueError("boom")))
    for argv in (["--debug"] + quantize(env), quantize(env, "--debug")):
        with pytest.raises(ValueError, match="boom"):
            main(argv)
    assert not os.path.exists(env.out)


def test_success_writes_model_and_report_without_leftovers(tmp_path, capsys):
    """The positive twin of the corpus: the model, the report and its plot are written, nothing else, permissions as
    for any new file."""
    env = Env(tmp_path)
    _existing(env, "r.json", "previous report\n")
    assert main(quantize(env, "--report", env.report)) == 0
    names = sorted(os.listdir(tmp_path))
    assert names == ["calib.npz", "m.onnx", "q.onnx", "r.json", "r.png"]
    assert open(tmp_path / "r.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    import json
    assert json.load(open(env.report))["layers"]
    onnx.checker.check_model(env.out)
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(env.report).st_mode & 0o777 == 0o666 & ~umask


def test_non_calibration_file_in_calibration_folder_is_allowed(tmp_path, capsys):
    env = Env(tmp_path)
    folder = env.calib_folder()
    out = os.path.join(folder, "q.onnx")
    assert main(quantize(env, calib=folder, out=out)) == 0
    assert main(quantize(env, calib=folder, out=out)) == 0  # and replaced on the next run
    assert sorted(os.listdir(folder)) == ["part0.npz", "part1.npz", "q.onnx"]


def test_recipe_ops_match_graph():
    from onnxcomq.cli import _parser, recipe_from_args
    from onnxcomq.graph.layers import SUPPORTED_OPS

    a = _parser().parse_args(["quantize", "m", "-o", "o", "--calib", "c"])
    assert recipe_from_args(a).layers.op_types == SUPPORTED_OPS


# ------------------------------------------------------------------- child processes: signals and resource limits

def _child(script: str, tmp, limit_bytes=None):
    def preexec():
        # Ctrl-C as in a terminal, even when the tests run in a background job (a non-interactive shell starts
        # those with SIGINT ignored, which the child would inherit, and Python then installs no handler)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if limit_bytes is not None:
            import resource
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], cwd=str(tmp), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=preexec,
                            env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})


def _big_env(tmp):
    """A model whose quantized file (~5 kB) is larger than its report (~2 kB)."""
    env = Env(tmp)
    onnx.save(builders.mlp_model([64, 64, 32]), env.model)
    np.savez(env.calib, input=np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32))
    return env


@pytest.mark.parametrize("limit,big", [(1500, False), (3000, True)],
                         ids=["file size limit hits the report", "file size limit hits the model"])
def test_hostile_cli_file_size_limit(tmp_path, limit, big):
    """RLIMIT_FSIZE (``ulimit -f``): writes past it fail with EFBIG, as on a full disk; the pair is all or nothing."""
    env = _big_env(tmp_path) if big else Env(tmp_path)
    before = snapshot(tmp_path)
    p = _child(f"""
        import sys
        from onnxcomq.cli import main
        sys.exit(main({quantize(env, "--report", env.report)!r}))
        """, tmp_path, limit)
    _, err = p.communicate(timeout=120)
    assert_one_line_error(p.returncode, err, "File too large")
    assert snapshot(tmp_path) == before


SIGNAL_SCRIPT = """
    import os, sys, time
    import onnx
    from onnxcomq.cli import main
    real = onnx.save
    def save(model, path, *a, **k):  # the model is staged in its temporary folder: now the signal comes
        real(model, path, *a, **k)
        open({marker!r}, "w").close()
        time.sleep(60)
    onnx.save = save
    sys.exit(main({argv!r}))
    """


@pytest.mark.parametrize("sig,want_rc,needle", [(signal.SIGTERM, 143, "terminated by SIGTERM"),
                                                (signal.SIGINT, 130, "interrupted")], ids=["SIGTERM", "SIGINT"])
def test_hostile_cli_signal_while_writing(tmp_path, sig, want_rc, needle):
    env = Env(tmp_path)
    marker = str(tmp_path.parent / f"{tmp_path.name}.marker")
    before = snapshot(tmp_path)
    p = _child(SIGNAL_SCRIPT.format(marker=marker, argv=quantize(env, "--report", env.report)), tmp_path)
    deadline = time.time() + 120
    while not os.path.exists(marker) and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert os.path.exists(marker), p.communicate()[1]
    assert any(n.startswith(".onnxcomq-") for n in os.listdir(tmp_path))  # the staged files exist now
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert_one_line_error(p.returncode, err, needle, want_rc)
    assert snapshot(tmp_path) == before


IMPORT_INTERRUPT = """
    import os, signal, sys

    class Hook:  # Ctrl-C arrives while numpy is being imported (inside main: the package imports it lazily)
        def find_spec(self, name, path=None, target=None):
            if name == "numpy":
                sys.meta_path.remove(self)
                os.kill(os.getpid(), signal.SIGINT)
            return None

    sys.meta_path.insert(0, Hook())
    from onnxcomq.cli import main
    assert "numpy" not in sys.modules, "importing onnxcomq.cli imported numpy"
    sys.exit(main({argv!r}))
    """


def test_hostile_cli_ctrl_c_while_importing(tmp_path):
    env = Env(tmp_path)
    before = snapshot(tmp_path)
    p = _child(IMPORT_INTERRUPT.format(argv=quantize(env)), tmp_path)
    _, err = p.communicate(timeout=120)
    assert_one_line_error(p.returncode, err, "interrupted", 130)
    assert snapshot(tmp_path) == before


def test_corpus_size():
    n = len(CASES) + len(INJECTED) + 2 + 1 + 2 + 2 + 1  # + staging failures, rollback, rlimits, signals, import
    assert n >= 45, n
