"""Text calibration for decoder language models: a UTF-8 text file and a tokenizer -> feed dicts.

Each non-empty line (or, with ``paragraphs=True``, each blank-line-separated paragraph) is one sample, encoded by a
``tokenizers`` tokenizer (its tokenizer.json, or the folder holding it) with its special tokens and truncated to
``max_length`` tokens. A batch is right-padded to its longest sample; the model's inputs are fed as:

- ``input_ids``: the token ids, padded with the tokenizer's pad id (0 if it has none);
- ``attention_mask``: 1 on tokens, 0 on padding (the pipeline leaves the padded positions out of the statistics);
- ``position_ids`` (where the model has it): cumsum(attention_mask) - 1, clipped at 0;
- every ``past_key_values.*`` / ``past_key*`` / ``past_value*`` input: an EMPTY cache, shape (batch, kv_heads, 0,
  head_dim), the dims from the input's static shape or, where those are dynamic (onnxruntime-genai's
  ``kv_cache_dim``), from the GroupQueryAttention node that reads it.

Samples are batched longest first (little padding; the first batch, which sizes the batch to memory, is the
largest). ``TextCalibration`` is a source that ``Calibration`` (and so ``onnxcomq.run``) accepts; ``text_feeds``
returns the feed dicts as a list.
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnx

from ..errors import UserError
from .caches import cache_shape, static_cache

CACHE_PREFIXES = ("past_key_values", "past_key", "past_value")
_TOKEN_INPUTS = ("input_ids", "attention_mask", "position_ids")


def load_tokenizer(path):
    """A ``tokenizers.Tokenizer`` from a tokenizer.json or a folder holding one; and its pad id (0 if none)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise UserError("text calibration needs the tokenizers library: pip install tokenizers") from None
    path = os.fspath(path)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise UserError(f"{path}: no tokenizer there (a tokenizer.json, or a folder holding one)")
    try:
        tok = Tokenizer.from_file(file)
    except Exception as e:  # (tokenizers raises its own Exception subclass for unreadable files)
        raise UserError(f"{file}: cannot read the tokenizer: {str(e).splitlines()[0] if str(e) else e}") from None
    return tok, _pad_id(tok, folder)


def _pad_id(tok, folder: str) -> int:
    if tok.padding and tok.padding.get("pad_id") is not None:
        return int(tok.padding["pad_id"])
    cfg = os.path.join(folder, "tokenizer_config.json")
    pad = None
    if os.path.isfile(cfg):
        try:
            with open(cfg, encoding="utf-8") as f:
                pad = json.load(f).get("pad_token")
        except (OSError, ValueError, AttributeError):
            pad = None
    if isinstance(pad, dict):
        pad = pad.get("content")
    pid = tok.token_to_id(pad) if isinstance(pad, str) else None
    return int(pid) if pid is not None else 0


def read_samples(path, paragraphs: bool = False) -> list[str]:
    """The samples of a UTF-8 text file: its non-empty lines, or its paragraphs (lines joined by a space)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise UserError(f"{path}: calibration text file not found") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read calibration text: {e.strerror or e}") from None
    if paragraphs:
        out = [" ".join(p.split()) for p in text.replace("\r\n", "\n").split("\n\n")]
    else:
        out = [line.strip() for line in text.splitlines()]
    out = [s for s in out if s]
    if not out:
        raise UserError(f"{path}: the calibration text holds no sample (no non-empty line)")
    return out


class TextCalibration:
    """A calibration source of text samples and a tokenizer, for ``Calibration`` / ``onnxcomq.run``.

    ``model`` (a path or ModelProto; optional) is read only where a cache input's dims are dynamic. Batches take
    the ``Calibration``'s batch size at the time they are made (after it was fitted to memory)."""

    def __init__(self, path, tokenizer, model=None, max_length: int = 512, max_samples: int | None = None,
                 paragraphs: bool = False):
        if not isinstance(max_length, int) or max_length < 1:
            raise UserError(f"max_length must be a positive integer, got {max_length!r}")
        self.path = os.fspath(path)
        self.tok, self.pad_id = load_tokenizer(tokenizer)
        self.texts = read_samples(self.path, paragraphs)
        self.model, self.max_length, self.max_samples = model, max_length, max_samples
        self.inputs = None
        self.batch_size = 8
        self._ids = None

    def bind(self, inputs: list, max_samples: int | None = None) -> int:
        """Check the model's inputs (InputInfo) and tokenize; returns the number of samples."""
        names = [i.name for i in inputs]
        if "input_ids" not in names:
            raise UserError(f"{self.path}: text calibration feeds input_ids, which the model does not have (its "
                            f"inputs: {', '.join(names)})")
        unknown = [n for n in names if n not in _TOKEN_INPUTS and not n.startswith(CACHE_PREFIXES)]
        if unknown:
            raise UserError(f"{self.path}: text calibration does not know what to feed model input "
                            f"{unknown[0]} (it feeds input_ids, attention_mask, position_ids and empty "
                            "past_key_values.* caches); give an .npz instead")
        caches = [i for i in inputs if i.name.startswith(CACHE_PREFIXES)]
        model = self.model
        if isinstance(model, (str, os.PathLike)) and any(not static_cache(i) for i in caches):  # (read only if needed)
            model = onnx.load(os.fspath(model), load_external_data=False)
        self.caches = {i.name: (i.dtype, cache_shape(model, i)) for i in caches}
        self.inputs = inputs
        limits = [n for n in (self.max_samples, max_samples) if n]
        texts = self.texts[:min(limits)] if limits else self.texts
        ids = [e.ids[:self.max_length] for e in self.tok.encode_batch(texts)]
        ids = [x for x in ids if x]
        if not ids:
            raise UserError(f"{self.path}: the tokenizer makes no token of any sample")
        self._ids = sorted(ids, key=len, reverse=True)  # (stable: equal lengths keep the file's order)
        return len(self._ids)

    def text_feeds(self, batch_size: int | None = None):
        """Yield one feed dict per batch of ``batch_size`` samples (default: ``self.batch_size``)."""
        if self._ids is None:
            raise UserError("TextCalibration: bind it to the model's inputs first (Calibration does)")
        size = batch_size or self.batch_size
        dtypes = {i.name: i.dtype for i in self.inputs}
        for start in range(0, len(self._ids), size):
            rows = self._ids[start:start + size]
            n, length = len(rows), max(len(r) for r in rows)
            ids = np.full((n, length), self.pad_id, np.int64)
            mask = np.zeros((n, length), np.int64)
            for k, r in enumerate(rows):
                ids[k, :len(r)] = r
                mask[k, :len(r)] = 1
            feed = {"input_ids": ids.astype(dtypes["input_ids"])}
            if "attention_mask" in dtypes:
                feed["attention_mask"] = mask.astype(dtypes["attention_mask"])
            if "position_ids" in dtypes:
                feed["position_ids"] = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(dtypes["position_ids"])
            for name, (dtype, (heads, dim)) in self.caches.items():
                feed[name] = np.zeros((n, heads, 0, dim), dtype)
            yield feed

    def __iter__(self):
        return self.text_feeds()


def text_feeds(path, tokenizer, model, batch_size: int = 8, max_length: int = 512, max_samples: int | None = None,
               paragraphs: bool = False) -> list[dict]:
    """The calibration feed dicts of a text file for a decoder ``model`` (path or ModelProto): see the module
    docstring."""
    from .calib import model_inputs

    m = onnx.load(os.fspath(model), load_external_data=False) if isinstance(model, (str, os.PathLike)) else model
    src = TextCalibration(path, tokenizer, m, max_length, max_samples, paragraphs)
    src.bind(model_inputs(m))
    return list(src.text_feeds(batch_size))
