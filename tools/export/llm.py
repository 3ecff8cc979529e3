#!/usr/bin/env python
"""Random-initialised Llama decoders (no download), a local BPE tokenizer, and their ONNX exports.

    python tools/export/llm.py --size tiny --no-past-too   # out/llm/tiny/{hf,genai,optimum,torch}, *-nopast too
    python tools/export/llm.py --size 7b --exporters genai optimum

Sizes (``SIZES``; transformers.LlamaConfig, fp32, ``torch.manual_seed(0)``, default init, untied lm_head):
``tiny`` hidden 64, MLP 172, 2 layers, 4 heads / 2 KV heads (GQA), vocab = the tokenizer's (1024);
``tinyllama`` hidden 2048, MLP 5632, 4 layers, 32 heads / 4 KV heads, vocab 32000;
``7b`` hidden 4096, MLP 11008, 2 layers, 32 heads / 32 KV heads, vocab 32000.

Tokenizer: a byte-level BPE trained with the ``tokenizers`` library on the Debian package descriptions of
/var/lib/dpkg/status and the texts of /usr/share/common-licenses (specials ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2,
``<pad>`` 3; ``<s>`` prepended), saved beside the model (tokenizer.json, tokenizer_config.json): ``<out>/hf`` is a
complete local model folder. ``<out>/calib.txt`` holds 64 package descriptions (one a line) for ``--calib``.

Exporters (all into ``<out>/<exporter>/``), as run by this script; all worked for all three sizes (``-nopast``
run for tiny and tinyllama) with torch 2.13.0+cpu, transformers 4.57.6, tokenizers 0.22.2, onnx 1.23.2,
onnxruntime 1.32.0. Seconds on 2 shared CPU cores, tiny / tinyllama / 7b: genai 8 / 19 / 40, optimum 8 / 71 / 335,
torch about 2 / 60 / 84.

* ``genai``: onnxruntime-genai 0.15.2's model builder (0.16+ import transformers 5 classes and fail on 4.57:
  ``cannot import name 'Qwen3_5ForConditionalGeneration'``; it also needs onnx-ir)::

      python -m onnxruntime_genai.models.builder -i <out>/hf -o <out>/genai -p fp32 -e cpu -c <out>/genai/cache

  model.onnx (+ model.onnx.data) and genai_config.json: a KV-cache decoder (GroupQueryAttention with rotary
  caches, SkipSimplifiedLayerNormalization, one fused q|k|v MatMul per layer), opset 21 + com.microsoft; inputs
  input_ids, attention_mask, past_key_values.N.key/value [batch, kv_heads, past_sequence_length, kv_cache_dim] (the
  head size a dynamic dim); outputs logits, present.N.key/value.
* ``optimum`` / ``optimum-nopast``: optimum 2.1.0 + optimum-onnx 0.1.0 (opset 18)::

      optimum-cli export onnx --model <out>/hf --task text-generation-with-past <out>/optimum
      optimum-cli export onnx --model <out>/hf --task text-generation <out>/optimum-nopast

  inputs input_ids, attention_mask, position_ids (+ past_key_values.N.key/value [batch, kv_heads, past, head_dim]),
  outputs logits (+ present.N.key/value); 7b writes model.onnx_data.
* ``torch`` / ``torch-nopast``: ``torch.onnx.export(..., dynamo=False)`` (opset 17) of the HF model
  (``export_torch``), with Optimum's input and output names; the cache enters as a transformers DynamicCache and
  the 4D attention mask is built in the wrapper (transformers' own mask uses torch.vmap, which the TorchScript
  exporter cannot trace: ``RuntimeError: unordered_map::at``). 7b: external data as one file per tensor.

On the tiny model all five give the same logits to float32 rounding and the same quantization result.

Needs torch, transformers (4.57), tokenizers; optimum-onnx and onnxruntime-genai for their exporters. Writes only
under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=None, max_position_embeddings=512),
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=4, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048),
}
TOKENIZER_VOCAB = {"tiny": 1024, "tinyllama": 32000, "7b": 32000}
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
EXPORTERS = ("genai", "optimum", "torch")
DPKG_STATUS = "/var/lib/dpkg/status"
LICENSES = "/usr/share/common-licenses"


def descriptions(path: str = DPKG_STATUS) -> list[str]:
    """Each package's description (short line and long text, joined), in file order."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        stanzas = f.read().split("\n\n")
    out = []
    for stanza in stanzas:
        desc, on = [], False
        for line in stanza.split("\n"):
            if line.startswith((" ", "\t")):
                if on and line.strip() != ".":
                    desc.append(line.strip())
                continue
            key, _, value = line.partition(":")
            on = key == "Description"
            if on:
                desc.append(value.strip())
        if desc:
            out.append(" ".join(desc))
    return out


def corpus() -> list[str]:
    """The tokenizer's training text: package descriptions, then the paragraphs of the common licenses."""
    texts = descriptions()
    if os.path.isdir(LICENSES):
        for name in sorted(os.listdir(LICENSES)):
            p = os.path.join(LICENSES, name)
            if os.path.isfile(p):
                with open(p, encoding="utf-8", errors="replace") as f:
                    texts += [" ".join(s.split()) for s in f.read().split("\n\n") if s.strip()]
    if not texts:
        raise SystemExit(f"no training text: neither {DPKG_STATUS} nor {LICENSES} is readable")
    return texts


def train_tokenizer(vocab_size: int, texts: list[str] | None = None):
    """A byte-level BPE tokenizers.Tokenizer with SPECIALS, ``<s>`` prepended to every encoding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts if texts is not None else corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return tok


def build_hf(size: str, hf_dir: str, seed: int = 0) -> None:
    """Train the tokenizer, build the random model of ``size``, save both into ``hf_dir``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = train_tokenizer(TOKENIZER_VOCAB[size])
    spec = dict(SIZES[size])
    spec["vocab_size"] = spec["vocab_size"] or tok.get_vocab_size()
    config = LlamaConfig(**spec, bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False,
                         torch_dtype="float32")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3)
    os.makedirs(hf_dir, exist_ok=True)
    model.save_pretrained(hf_dir, safe_serialization=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=spec["max_position_embeddings"])
    fast.save_pretrained(hf_dir)


def write_calib_text(path: str, n: int = 64, skip: int = 1000) -> None:
    """``n`` package descriptions (from the ``skip``-th on, so mostly not the first training texts), one a line."""
    texts = descriptions()
    texts = texts[skip:skip + n] if len(texts) >= skip + n else texts[:n]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(texts) + "\n")


def export_genai(hf_dir: str, out_dir: str) -> list[str]:
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", hf_dir, "-o", out_dir, "-p", "fp32",
           "-e", "cpu", "-c", os.path.join(out_dir, "cache")]
    subprocess.run(cmd, check=True)
    shutil.rmtree(os.path.join(out_dir, "cache"), ignore_errors=True)
    return cmd


def export_optimum(hf_dir: str, out_dir: str, past: bool) -> list[str]:
    cli = os.path.join(os.path.dirname(sys.executable), "optimum-cli")
    cmd = [cli, "export", "onnx", "--model", hf_dir, "--task",
           "text-generation-with-past" if past else "text-generation", out_dir]
    subprocess.run(cmd, check=True)
    return cmd


def export_torch(hf_dir: str, path: str, past: bool, opset: int = 17) -> None:
    """torch.onnx.export (TorchScript) of the HF model: inputs input_ids, attention_mask, position_ids
    (+ past_key_values.N.key/value, a DynamicCache), outputs logits (+ present.N.key/value), Optimum's names."""
    import torch
    from transformers import DynamicCache, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    cfg = model.config
    n_layers, kv, hd = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads

    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, position_ids, *flat):
            cache = None
            if past:
                cache = DynamicCache()
                for i in range(n_layers):
                    cache.update(flat[2 * i], flat[2 * i + 1], i)
            # the 4D additive mask (causal and padding), built here: transformers' own uses torch.vmap, which the
            # TorchScript exporter cannot trace (RuntimeError: unordered_map::at)
            q = input_ids.shape[1]
            kv_pos = torch.arange(attention_mask.shape[1])
            q_pos = torch.arange(q) + (attention_mask.shape[1] - q)
            allowed = (kv_pos[None, :] <= q_pos[:, None])[None, None] & (attention_mask[:, None, None, :] != 0)
            mask4 = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
            out = self.m(input_ids=input_ids, attention_mask=mask4, position_ids=position_ids,
                         past_key_values=cache, use_cache=past, return_dict=True)
            if not past:
                return out.logits
            pkv = out.past_key_values
            layers = [(pkv.layers[i].keys, pkv.layers[i].values) if hasattr(pkv, "layers") else pkv[i]
                      for i in range(n_layers)]
            return (out.logits,) + tuple(t for kvp in layers for t in kvp)

    b, s, p = 2, 5, 3 if past else 0
    ids = torch.randint(4, cfg.vocab_size, (b, s))
    mask = torch.ones(b, p + s, dtype=torch.int64)
    pos = torch.arange(p, p + s).expand(b, s).contiguous()
    flat = tuple(torch.randn(b, kv, p, hd) for _ in range(2 * n_layers)) if past else ()
    names_in = ["input_ids", "attention_mask", "position_ids"]
    names_out = ["logits"]
    axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "past_sequence_length + sequence_length"},
            "position_ids": {0: "batch_size", 1: "sequence_length"},
            "logits": {0: "batch_size", 1: "sequence_length"}}
    if past:
        for i in range(n_layers):
            for kind in ("key", "value"):
                names_in.append(f"past_key_values.{i}.{kind}")
                names_out.append(f"present.{i}.{kind}")
                axes[names_in[-1]] = {0: "batch_size", 2: "past_sequence_length"}
                axes[names_out[-1]] = {0: "batch_size", 2: "past_sequence_length + sequence_length"}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(Wrap(model), (ids, mask, pos) + flat, path, input_names=names_in, output_names=names_out,
                          dynamic_axes=axes, opset_version=opset, dynamo=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=list(SIZES), default="tiny")
    p.add_argument("--out", default=None, help="folder (default: out/llm/<size>)")
    p.add_argument("--exporters", nargs="*", choices=EXPORTERS, default=list(EXPORTERS))
    p.add_argument("--no-past-too", action="store_true", help="also export optimum/torch without the KV cache")
    a = p.parse_args(argv)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = a.out or os.path.join(root, "out", "llm", a.size)
    hf = os.path.join(out, "hf")
    t0 = time.perf_counter()
    build_hf(a.size, hf)
    write_calib_text(os.path.join(out, "calib.txt"))
    done = {"hf": round(time.perf_counter() - t0, 1)}
    for ex in a.exporters:
        for past in (True, False) if a.no_past_too else (True,):
            if ex == "genai" and not past:
                continue
            t0 = time.perf_counter()
            tag = ex if past else f"{ex}-nopast"
            try:
                if ex == "genai":
                    export_genai(hf, os.path.join(out, tag))
                elif ex == "optimum":
                    export_optimum(hf, os.path.join(out, tag), past)
                else:
                    export_torch(hf, os.path.join(out, tag, "model.onnx"), past)
                done[tag] = round(time.perf_counter() - t0, 1)
            except Exception as e:  # (report and go on with the other exporters)
                print(f"{tag}: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
                done[tag] = f"failed: {type(e).__name__}"
    print(json.dumps(done))
    return 0


if __name__ == "__main__":
    sys.exit(main())
