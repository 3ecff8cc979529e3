"""The benchmarks' flat option names (those of the configuration and the command line before recipes had
sections) turned into an ``onnxcomq.Recipe``, so that variants such as ``damping=0.1,sweeps=1`` keep working.

    recipe(bits=3, sweeps=1, damping=0.1)            # Recipe().updated({"weights": {"bits": 3}, ...})
    recipe(bits=4, official=True)                    # Recipe.official(bits=4)
    recipe(stages=8)                                 # sequential capture on, in 8 stages
    recipe(**{"solver.zero_in_range": False})        # any recipe field as "section.field"
    cli_args(["--bits", "4", "--method", "rtn"], "x.recipe.json")   # options the CLI no longer has -> a recipe file

The optional sections are on where one of their fields is given (or ``sequential=True``), off with ``sequential=
False`` / ``avg_bits=None`` / ``act_bits=None``. A later name wins over an earlier one; ``official=True`` starts
from ``Recipe.official(bits)`` and the other names change it. This module imports onnxcomq only to build a Recipe.
"""

from __future__ import annotations

import ast
import json
import os

# flat name -> (section, field): the package's table of where 0.1.0's flat settings went
from onnxcomq.config import MOVED as FLAT  # noqa: E402

OPTIONAL = ("sequential", "mixed_precision", "activations")
TUPLES = {("layers", "keep_8bit"), ("layers", "layer_bits"), ("layers", "op_types"), ("layers", "exclude"),
          ("regularization", "grid"), ("mixed_precision", "candidates"), ("activations", "exclude")}


def names() -> str:
    return ", ".join(sorted(set(FLAT) | {"official", "sequential", "target"})) + " (or SECTION.FIELD)"


def sections(flat: dict) -> tuple[dict, bool]:
    """(the nested dict for ``Recipe.updated``, official) from flat names; raises ValueError on an unknown name."""
    d: dict = {}
    official = False
    seq_on = None  # sequential=True/False, if given
    for k, v in flat.items():
        if k == "official":
            official = bool(v)
            continue
        if k == "sequential":
            seq_on = bool(v)
            continue
        if k == "target":
            d["target"] = v
            continue
        if "." in k:
            sec, name = k.split(".", 1)
        elif k in FLAT:
            sec, name = FLAT[k]
        else:
            raise ValueError(f"unknown option {k!r}; known: {names()}")
        if v is None and (sec, name) in (("mixed_precision", "avg_bits"), ("activations", "bits")):
            d[sec] = None  # avg_bits=None / act_bits=None: the section off, as before
            continue
        if (sec, name) in TUPLES and isinstance(v, (list, str)):
            v = tuple(x for x in v.split(",") if x) if isinstance(v, str) else tuple(v)
        if d.get(sec, {}) is None:
            d[sec] = {}
        d.setdefault(sec, {})[name] = v
    if seq_on is True:
        d.setdefault("sequential", {})
    elif seq_on is False:
        if d.get("sequential"):
            raise ValueError(f"sequential=False with sequential fields {sorted(d['sequential'])}")
        d["sequential"] = None
    return d, official


def recipe(base=None, **flat):
    """An onnxcomq Recipe from flat names (module docstring); ``base``: the Recipe to change (default: Recipe(), or
    Recipe.official(bits) with official=True)."""
    from onnxcomq import Recipe

    d, official = sections(flat)
    if base is None:
        bits = (d.get("weights") or {}).get("bits", 4)
        base = Recipe.official(bits=bits) if official else Recipe()
    elif official:
        raise ValueError("official=True starts from Recipe.official: give no base")
    return base.updated(d, source="flat options")


def parse_items(text: str) -> dict:
    """``field=value,field=value`` (values Python literals, else strings; a bare name is True) -> dict. Commas
    inside brackets or quotes do not split: ``exclude=('a','b'),sweeps=1``."""
    out = {}
    for item in _split(text):
        k, eq, v = item.partition("=")
        k, v = k.strip(), v.strip()
        if not eq:
            out[k] = True
            continue
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def _split(text: str) -> list:
    items, depth, quote, cur = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(cur)
            cur = ""
            continue
        cur += ch
    items.append(cur)
    return [i for i in (s.strip() for s in items) if i]


# ------------------------------------------------------------------------------------------- the command line
# Options of ``onnxcomq quantize`` as it is now: passed on unchanged. Every other option of the old command line
# (--method, --order, --sweeps, --damping, --sequential, --act-method, ...) goes into a recipe file (--recipe).
CLI_OPTIONS = {"preset", "recipe", "bits", "granularity", "block-size", "scheme", "format", "exclude", "act-bits",
               "target", "device", "max-samples", "batch-size", "max-memory", "calib", "report", "write-unverified",
               "quiet", "debug", "output"}
CLI_BOOLEANS = {"scale-update", "bias-correction", "sequential", "correct-few-rows", "rewrite-matmul", "act-aware",
                "lambda-search", "zero-in-range", "verify"}
CLI_APPEND = {"layer-bits", "act-exclude"}  # repeatable


def cli_args(tokens: list, recipe_path: str) -> list:
    """``tokens`` (options for ``onnxcomq quantize``) with the old command line's options that the CLI no longer
    has written into a recipe file at ``recipe_path`` and replaced by ``--recipe recipe_path`` (merged with a
    --recipe given in ``tokens``); ``--official`` becomes ``--preset official``. Unchanged when there are none."""
    out, flat, user_recipe = [], {}, None
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        i += 1
        if not tok.startswith("--"):
            out.append(tok)
            continue
        name, eq, value = tok[2:].partition("=")
        if name == "recipe":
            if not eq:
                value, i = tokens[i], i + 1
            user_recipe = value
            continue
        if name in CLI_OPTIONS:
            out.append(tok)
            continue
        if name == "official":
            out += ["--preset", "official"]
            continue
        if name.startswith("no-") and name[3:] in CLI_BOOLEANS:
            flat[name[3:].replace("-", "_")] = False
            continue
        if name in CLI_BOOLEANS and not eq:
            flat[name.replace("-", "_")] = True
            continue
        key = name.replace("-", "_")
        if key not in FLAT:
            raise ValueError(f"unknown onnxcomq option --{name}")
        if not eq:
            if i >= len(tokens):
                raise ValueError(f"--{name} needs a value")
            value, i = tokens[i], i + 1
        if name in CLI_APPEND:
            flat[key] = tuple(flat.get(key, ())) + (value,)
            continue
        try:
            v = ast.literal_eval(value)
            v = value if isinstance(v, tuple) else v  # "5,6,8": the comma list below, not a tuple of ints
        except (ValueError, SyntaxError):
            v = value
        if key == "mp_bits":
            v = tuple(int(b) for b in str(v).split(",") if b)
        flat[key] = v
    if not flat:
        return out + (["--recipe", user_recipe] if user_recipe else [])
    d, _ = sections(flat)
    if user_recipe:
        from onnxcomq import Recipe

        base = Recipe.read(user_recipe)
        for k, v in d.items():
            base[k] = {**(base.get(k) or {}), **v} if isinstance(v, dict) else v
        d = base
    os.makedirs(os.path.dirname(os.path.abspath(recipe_path)), exist_ok=True)
    with open(recipe_path, "w") as f:
        json.dump(d, f, indent=1)
        f.write("\n")
    return out + ["--recipe", recipe_path]


def keep_unverified(run):
    """``onnxcomq.run`` that returns a model failing the check before writing (an output far from float, e.g.
    round-to-nearest at 4 bits) instead of raising, as the CLI's ``--write-unverified`` writes it: a benchmark
    measures what a recipe produced."""
    from onnxcomq import VerificationError

    def run_anyway(*args, **kwargs):
        try:
            return run(*args, **kwargs)
        except VerificationError as e:
            if e.model is None:
                raise
            return e.model, e.report

    return run_anyway
