"""The README's examples run, so that the front page cannot rot (as onnx-graphsurgeon tests its README examples).

Every fenced ```bash / ```sh block of README.md runs with ``bash -e`` and every ```python block with ``exec`` in a
namespace of its own, each in a fresh temporary folder that holds:

- ``models`` -> the repository's ``models/`` (a symlink: nothing is copied) and an empty ``out/``;
- the files of the blocks marked ``<!-- readme-test: file NAME -->`` (e.g. the recipe file the examples read).

``onnxcomq`` and ``python`` resolve to this interpreter's environment (its bin folder first on PATH, or a shim that
runs ``sys.executable -m onnxcomq.cli``), and the repository comes first on PYTHONPATH. Not run: the set-up commands
``bash tools/demo.sh`` and ``bash tools/test.sh`` (this suite is one of them) and ``pip install`` lines; a block
preceded by ``<!-- readme-test: skip -->`` (sparingly: e.g. a command that needs a GPU); a block that reads a YAML
recipe where PyYAML is not installed (it is optional).

Also checked: the README stays a front page (at most 200 lines), every fenced block names its language, relative
links in README.md, CHANGELOG.md and docs/*.md point to existing files and headings, and every ``tools/...`` path
they mention exists.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = [README, REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]
MAX_README_LINES = 200
BLOCK_TIMEOUT_S = 600

MARK = re.compile(r"<!--\s*readme-test:\s*(skip|file\s+(\S+))\s*-->")
OPEN_FENCE = re.compile(r"^```(\S*)\s*$")
SHELL = ("bash", "sh", "shell")
PYTHON = ("python", "py")
KNOWN = SHELL + PYTHON + ("yaml", "yml", "json", "text", "console", "toml", "ini")
# set-up commands: the demo and the test suite (this file runs inside it), and installs
SETUP = re.compile(r"^\s*(bash\s+(\./)?tools/(demo|test)\.sh\b|(\S*/)?(python3?\s+-m\s+)?pip3?\s+install\b|"
                   r"(\S*/)?python3?\s+-m\s+pip\s+install\b)")


@dataclass
class Block:
    lang: str
    code: str
    line: int  # of the opening fence, 1-based
    skip: bool = False
    file: str | None = None  # written into the work folder under this name


def parse(text: str) -> list[Block]:
    """The fenced blocks of a markdown text, with the readme-test marker (if any) of the comment line before each
    (blank lines may separate them)."""
    lines = text.splitlines()
    blocks, mark, i = [], None, 0
    while i < len(lines):
        line = lines[i]
        m = MARK.fullmatch(line.strip())
        if m:
            mark = m
            i += 1
            continue
        f = OPEN_FENCE.match(line)
        if f:
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
            if end is None:
                raise ValueError(f"README.md:{i + 1}: code block without a closing fence")
            blocks.append(Block(f.group(1).lower(), "\n".join(lines[i + 1:end]) + "\n", i + 1,
                                skip=bool(mark and mark.group(1) == "skip"), file=mark.group(2) if mark else None))
            mark, i = None, end + 1
            continue
        if line.strip():  # a marker applies only to the block right after it
            mark = None
        i += 1
    return blocks


def shell_commands(code: str) -> tuple[str, list[str]]:
    """The script to run (set-up commands left out, as comments) and the commands left out."""
    out, skipped, cmd = [], [], []
    for line in code.splitlines():
        cmd.append(line)
        if line.rstrip().endswith("\\"):
            continue
        joined = " ".join(c.rstrip().rstrip("\\") for c in cmd)
        if SETUP.match(joined):
            skipped.append(joined.strip())
            out.extend("# (not run) " + c for c in cmd)
        else:
            out.extend(cmd)
        cmd = []
    out.extend(cmd)
    return "\n".join(out) + "\n", skipped


def _runs(block: Block) -> bool:
    if block.lang in SHELL:
        script, _ = shell_commands(block.code)
        return any(ln.strip() and not ln.lstrip().startswith("#") for ln in script.splitlines())
    return block.lang in PYTHON


BLOCKS = parse(README.read_text(encoding="utf-8"))
RUNNABLE = [b for b in BLOCKS if b.lang in SHELL + PYTHON]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch) -> Path:
    """A fresh folder with models/ (a symlink to the repository's), out/ and the README's file blocks."""
    (tmp_path / "models").symlink_to(REPO / "models", target_is_directory=True)
    (tmp_path / "out").mkdir()
    for b in BLOCKS:
        if b.file:
            (tmp_path / b.file).write_text(b.code, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _env(tmp_path: Path) -> dict:
    """PATH with this interpreter's bin folder first (shims where it lacks ``onnxcomq`` or ``python``) and the
    repository first on PYTHONPATH."""
    env = dict(os.environ)
    bindir = Path(sys.executable).parent
    shims = tmp_path / ".shims"
    shims.mkdir()
    for name, target in (("onnxcomq", f'"{sys.executable}" -m onnxcomq.cli'), ("python", f'"{sys.executable}"')):
        if not (bindir / name).is_file() or not os.access(bindir / name, os.X_OK):
            shim = shims / name
            shim.write_text(f'#!/bin/sh\nexec {target} "$@"\n')
            shim.chmod(0o755)
    env["PATH"] = os.pathsep.join([str(shims), str(bindir), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.pop("PYTHONHOME", None)
    return env


@pytest.mark.parametrize("block", RUNNABLE, ids=[f"{b.lang}-line{b.line}" for b in RUNNABLE])
def test_readme_block(block: Block, workdir: Path):
    if block.skip:
        pytest.skip("marked <!-- readme-test: skip -->")
    if not _runs(block):
        pytest.skip("set-up commands only (bash tools/demo.sh, bash tools/test.sh, pip install)")
    if re.search(r"\.ya?ml\b", block.code):
        pytest.importorskip("yaml", reason="the block reads a YAML recipe, which needs PyYAML")
    if block.lang in SHELL:
        script, _ = shell_commands(block.code)
        path = workdir / ".block.sh"
        path.write_text("set -o pipefail\n" + script, encoding="utf-8")
        r = subprocess.run(["bash", "-e", str(path)], cwd=workdir, env=_env(workdir), capture_output=True,
                           text=True, timeout=BLOCK_TIMEOUT_S, check=False)
        assert r.returncode == 0, (f"README.md:{block.line}: the {block.lang} block failed with exit status "
                                   f"{r.returncode}\n--- script\n{script}--- stdout\n{r.stdout[-4000:]}"
                                   f"--- stderr\n{r.stderr[-4000:]}")
    else:
        sys.path.insert(0, str(REPO))
        try:
            exec(compile(block.code, f"README.md:{block.line}", "exec"), {"__name__": "__readme__"})  # noqa: S102
        finally:
            sys.path.remove(str(REPO))


def test_readme_has_examples():
    langs = {b.lang for b in RUNNABLE if _runs(b)}
    assert langs & set(SHELL) and langs & set(PYTHON), "README.md should show both the CLI and the Python API"
    assert not [b for b in BLOCKS if b.file and b.lang in SHELL + PYTHON], "file blocks are data, not code to run"


def test_readme_is_a_front_page():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; move details to docs/ (at most {MAX_README_LINES})"


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_code_blocks_name_their_language(doc: Path):
    bad = [b.line for b in parse(doc.read_text(encoding="utf-8")) if b.lang not in KNOWN]
    assert not bad, f"{doc.name}: code blocks without a known language (bash, python, yaml, text...) at lines {bad}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(doc: Path) -> set:
    out, code = set(), False
    for line in doc.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            code = not code
        elif not code and line.startswith("#"):
            out.add(_slug(line.lstrip("#")))
    return out


def _prose(doc: Path) -> str:
    return re.sub(r"^```.*?^```", "", doc.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE)


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_links_resolve(doc: Path):
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _prose(doc)):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked here
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target} (no such heading)")
    assert not bad, f"{doc.name}: broken links: {', '.join(bad)}"


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_tool_paths_exist(doc: Path):
    paths = set(re.findall(r"(?<![\w/.])tools/[\w./-]*\w\.(?:py|sh)\b", doc.read_text(encoding="utf-8")))
    missing = sorted(p for p in paths if not (REPO / p).is_file())
    assert not missing, f"{doc.name} mentions tools that do not exist: {', '.join(missing)}"
