"""The recipe (onnxcomq/config.py): sections that validate themselves, presets as constructors, recipe files, the
command line's precedence (preset < recipe file < options), and a run reproduced from its report's recipe."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import onnx
import pytest

from onnxcomq import Recipe, UserError, run
from onnxcomq.cli import main
from onnxcomq.config import OPTIONAL, SECTIONS, Activations, Sequential, Weights

MODELS = os.path.join(os.path.dirname(__file__), "..", "models")
CNN = os.path.join(MODELS, "fmnist_cnn.onnx")


def calib(n=32):
    return {"input": np.load(os.path.join(MODELS, "fmnist_calib.npz"))["input"][:n]}


def test_sections_are_frozen():
    r = Recipe()
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.weights.bits = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.target = "tensorrt"


def test_dict_round_trip_of_every_preset():
    for r in (Recipe(), Recipe.official(bits=3), Recipe.fast(), Recipe.preset("best", bits=5),
              Recipe(activations=Activations(exclude=("Add",)), target="tensorrt")):
        d = json.loads(json.dumps(r.to_dict()))  # (through JSON: tuples come back as lists)
        assert Recipe.from_dict(d) == r
        assert set(d) == {"target", *SECTIONS}


def test_presets_differ_only_where_they_say():
    default, official = Recipe().to_dict(), Recipe.official().to_dict()
    assert official["solver"]["order"] == "greedy" and official["solver"]["sweeps"] == 1
    assert official["regularization"]["damping"] == 0.0 and not official["solver"]["bias_correction"]
    assert official["data"] == default["data"] and official["layers"] == default["layers"]
    # sequential capture is the default; fast and official take one float pass; best (its old name) is the default
    assert Recipe().sequential == Sequential() and Recipe().sequential_capture() == Sequential()
    assert Recipe.fast().sequential is None and Recipe.official().sequential is None
    assert Recipe.preset("best", bits=3) == Recipe.preset("default", bits=3) == Recipe(weights=Weights(bits=3))
    assert Recipe.fast().solver.lambda_solves == 1
    assert Recipe.official().is_official() and not Recipe().is_official()
    assert Recipe.preset("official", bits=3) == Recipe.official(bits=3)
    with pytest.raises(UserError, match="--preset must be one of"):
        Recipe.preset("turbo")


@pytest.mark.parametrize("d, needle", [
    ({"weight": {"bits": 3}}, "unknown section"),
    ({"weights": {"bitz": 3}}, r"unknown field\(s\) weights.bitz"),
    ({"weights": None}, "cannot be turned off"),
    ({"weights": 3}, "expected a mapping of fields"),
    ({"weights": {"bits": 9}}, "2..8"),
    ({"weights": {"format": "matmulnbits"}}, "needs --granularity block"),
    ({"solver": {"order": "random"}}, "solver.order must be one of"),
    ({"regularization": {"damping": -1}}, "damping must be"),
    ({"sequential": {"correction": "some"}}, "sequential.correction"),
    ({"mixed_precision": {"avg_bits": 3.0}}, "avg_bits must be between"),
    ({"activations": {"method": "max"}}, "activations.method"),
    ({"target": "tensorrt"}, "target tensorrt takes 4-bit weights only block-wise"),
    ({"data": {"max_memory": "lots"}}, "max memory"),
    ({"layers": {"op_types": ["Conv", "Softmax"]}}, "unsupported op type.*Softmax"),
])
def test_each_section_validates_itself(d, needle):
    with pytest.raises(UserError, match=needle):
        Recipe().updated(d).validate()


@pytest.mark.parametrize("d", [{"activations": {"bits": 8}}, {"weights": {"method": "rtn"}}])
def test_sequential_capture_steps_aside_where_it_cannot_apply(d):
    # activation quantization needs every layer's float statistics at once; RTN fits nothing. (A size budget keeps
    # the stages: its bits come from a float pass before them.)
    r = Recipe().updated(d).validate()
    assert r.sequential == Sequential() and r.sequential_capture() is None
    assert Recipe().updated({"mixed_precision": {"avg_bits": 5}}).sequential_capture() == Sequential()
    assert Recipe.official().updated({"sequential": {}}).sequential_capture() is None
    assert Recipe().updated({"sequential": {"stages": 3}}).sequential_capture().stages == 3


def test_one_value_for_a_list_field_is_a_list_of_one():
    r = Recipe().updated({"mixed_precision": {"candidates": 8}, "layers": {"exclude": "*head*"}}).validate()
    assert r.mixed_precision.candidates == (8,) and r.layers.exclude == ("*head*",)


def test_optional_sections_turn_on_and_off():
    r = Recipe().updated({"sequential": {"stages": 4}, "mixed_precision": {"avg_bits": 4.5}})
    assert r.sequential.stages == 4 and r.sequential.correction == "entry" and r.mixed_precision.avg_bits == 4.5
    assert r.updated({"sequential": None}).sequential is None
    assert set(OPTIONAL) == {n for n in SECTIONS if getattr(Recipe.fast(), n) is None}


def test_recipe_files_yaml_and_json(tmp_path):
    d = {"weights": {"bits": 3, "granularity": "block", "block_size": 16}, "solver": {"sweeps": 2}}
    (tmp_path / "r.json").write_text(json.dumps(d))
    (tmp_path / "r.yaml").write_text("weights: {bits: 3, granularity: block, block_size: 16}\nsolver:\n  sweeps: 2\n")
    a, b = Recipe.load(tmp_path / "r.json"), Recipe.load(tmp_path / "r.yaml")
    assert a == b == Recipe(weights=Weights(bits=3, granularity="block", block_size=16)).updated(
        {"solver": {"sweeps": 2}})
    (tmp_path / "bad.yaml").write_text("weights: [bits\n")
    with pytest.raises(UserError, match="not valid YAML"):
        Recipe.load(tmp_path / "bad.yaml")
    with pytest.raises(UserError, match="cannot read the recipe"):
        Recipe.load(tmp_path / "missing.json")


def test_schema_covers_every_field():
    schema = Recipe.schema()
    dumped = Recipe().to_dict()
    assert set(schema["properties"]) == set(dumped)
    for name, fields in dumped.items():
        if isinstance(fields, dict):
            props = schema["properties"][name]
            props = props["anyOf"][0] if "anyOf" in props else props
            assert set(props["properties"]) == set(fields), name
    assert schema["properties"]["sequential"]["anyOf"][1] == {"type": "null"}


def test_cli_precedence_preset_then_file_then_options(tmp_path, capsys):
    (tmp_path / "r.json").write_text(json.dumps({"weights": {"bits": 3, "scheme": "sym"}, "solver": {"sweeps": 2},
                                                 "sequential": {"stages": 5}}))
    assert main(["recipe", "--preset", "official", "--recipe", str(tmp_path / "r.json"), "--bits", "5",
                 "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["weights"]["bits"] == 5  # the option over the file
    assert d["weights"]["scheme"] == "sym" and d["solver"]["sweeps"] == 2  # the file over the preset
    assert d["solver"]["order"] == "greedy"  # the preset where nothing else spoke
    assert d["sequential"]["stages"] == 5
    assert main(["recipe", "--schema"]) == 0
    assert json.loads(capsys.readouterr().out)["title"] == "onnxcomq recipe"


def test_cli_refuses_a_bad_recipe_file_in_one_line(tmp_path, capsys):
    (tmp_path / "r.json").write_text(json.dumps({"solver": {"sweep": 2}}))
    rc = main(["quantize", CNN, "-o", str(tmp_path / "q.onnx"), "--calib", "random", "--recipe",
               str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown field(s) solver.sweep" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "q.onnx")


def test_a_run_is_reproduced_from_its_report(tmp_path):
    r = Recipe(weights=Weights(bits=3)).updated({"solver": {"sweeps": 2}, "data": {"batch_size": 8}})
    q1, rep = run(CNN, calib(), r)
    again = Recipe.from_dict(json.loads(json.dumps(rep.to_dict()["recipe"])))
    assert again == r
    q2, _ = run(CNN, calib(), again)
    assert q1.SerializeToString() == q2.SerializeToString()
    assert onnx.load_from_string(q1.SerializeToString()).graph.node  # (a model, not an empty proto)


def test_stats_cache_gives_the_same_model_without_a_second_capture():
    cache, one_pass = {}, Recipe.fast().updated({"solver": {"lambda_solves": 7}})  # (the cache: one float pass)
    q1, rep1 = run(CNN, calib(), one_pass, stats_cache=cache)
    assert len(cache) == 1
    q2, rep2 = run(CNN, calib(), one_pass.updated({"weights": {"bits": 3}}), stats_cache=cache)
    q3, _ = run(CNN, calib(), one_pass.updated({"weights": {"bits": 3}}))
    assert len(cache) == 1 and rep2.capture_seconds < rep1.capture_seconds
    run(CNN, calib(), Recipe(), stats_cache=cache)  # sequential stages capture their own statistics
    assert len(cache) == 1
    assert q2.SerializeToString() == q3.SerializeToString()
    # a budget's allocation pass is that float pass: taken from the cache, the same model as without it
    budget = Recipe().updated({"mixed_precision": {"avg_bits": 5.0, "samples": 4}})
    q4, _ = run(CNN, calib(), budget, stats_cache=cache)
    q5, _ = run(CNN, calib(), budget)
    assert len(cache) == 1 and q4.SerializeToString() == q5.SerializeToString()


def test_an_option_of_the_old_command_line_names_where_it_went(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # (argparse's exit)
        main(["quantize", CNN, "-o", str(tmp_path / "q.onnx"), "--calib", "random", "--sweeps", "2",
              "--no-scale-update", "--official", "--sequential"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    for where in ("--sweeps is now the recipe's solver.sweeps", "--no-scale-update is now the recipe's "
                  "solver.scale_update", "--official is now --preset official", "--sequential is now the default "
                  "(sequential capture"):
        assert where in err
