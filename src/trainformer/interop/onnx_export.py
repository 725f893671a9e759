"""ONNX graphs of a model directory, and greedy decoding of them with onnxruntime.

    export_onnx(load_model_dir("run/model"), Path("out"))   # writes the graphs + onnx.json
    OnnxTranslator("out").translate(["the red cat ."])     # greedy, as `Translator(beam=1)`
    OnnxGenerator("out").generate([[3, 17, 9]], 20, eos_id) # greedy, as `generate(temperature=0)`

Graphs per ``model.family`` (all fp32, dynamic batch and lengths, opset `OPSET`):

- ``encoder_decoder``: ``encoder.onnx`` (input_ids, attention_mask -> memory and
  the cross-attention K/V of every decoder layer) and ``decoder.onnx`` (input_ids,
  encoder_attention_mask, past self-attention K/V, cross K/V -> logits, present K/V).
- ``decoder``: ``decoder.onnx`` (input_ids, attention_mask over past + new tokens,
  past K/V -> logits, present K/V).
- ``encoder``: ``encoder.onnx`` (input_ids, attention_mask [, e1_pos, e2_pos] -> head output).

One decoder graph serves every step: the first has past length 0 (K/V inputs
of shape (B, KV, 0, Dh)). The cross-attention K/V come out of the encoder
graph, computed once per source as our `KVCache` does, rather than being
recomputed from the memory inside every decoder step: that projection is a
(S x D) x (D x 2D) product per layer, several times the work of the rest of a
one-token step for a typical sentence.

The graphs are traced from thin wrappers that put the past tensors into a
`KVCache` and call the model's own ``decode`` / ``forward``, so the ONNX graph
runs the same attention, masks and positions as trainformer. Masks are int64
(1 = real token), as in Hugging Face / Optimum graphs. ``onnx.json`` lists the
graphs, their inputs and outputs, the special ids and the cache shapes, so a
runner needs no trainformer code.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
import shutil
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trainformer.data import tokenizer as tok
from trainformer.errors import UserError
from trainformer.interop import require
from trainformer.modeldir import LoadedModel
from trainformer.nn.cache import KVCache, LayerKV

OPSET = 18
MANIFEST = "onnx.json"
COPIED_FILES = ("config.json", "tokenizer.json", "labels.json", "transitions.json")
EXTERNAL_DATA_BYTES = 1 << 30  # protobuf stops at 2 GiB: larger weights go to a .onnx.data file

# Example sizes for tracing: all >= 2 and all different, so torch.export neither
# specialises an axis to 0/1 nor ties two axes together.
EX_BATCH, EX_SRC, EX_NEW, EX_PAST = 2, 5, 3, 4


# ----------------------------------------------------------------------------
# Wrappers: explicit tensors in, the model's own code in between, tensors out
# ----------------------------------------------------------------------------


def filled_cache(n_layers: int, past: Sequence[torch.Tensor], cross: Sequence[torch.Tensor] = ()) -> KVCache:
    """A `KVCache` holding past (k0, v0, k1, v1, ...) (B, KV, P, Dh) and optional cross K/V (B, KV, S, Dh)."""
    cache = KVCache(n_layers)
    for i, kv in enumerate(cache.self_kv):
        kv.k, kv.v = past[2 * i], past[2 * i + 1]
    for i, kv in enumerate(cache.cross_kv if cross else ()):
        kv.k, kv.v = cross[2 * i], cross[2 * i + 1]
    cache.length = past[0].shape[2]
    return cache


def cache_tensors(layers: Sequence[LayerKV]) -> list[torch.Tensor]:
    """k0, v0, k1, v1, ... of a list of `LayerKV`."""
    return [t for kv in layers for t in (kv.k, kv.v)]


class EncDecEncoderGraph(nn.Module):
    """input_ids (B, S), attention_mask (B, S) -> memory (B, S, D), cross K/V per decoder layer (B, KV, S, Dh)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        memory = self.model.encode(input_ids, attention_mask.bool())  # (B, S, D)
        cross = [LayerKV() for _ in self.model.decoder_layers]
        for layer, kv in zip(self.model.decoder_layers, cross):
            # The layer's own first-step code fills `kv`; the query of one row is computed and dropped.
            layer.cross_attn(memory[:, :1], memory, cache=kv)
        return memory, *cache_tensors(cross)


class EncDecDecoderGraph(nn.Module):
    """One decoder step of an `EncoderDecoder` on explicit K/V tensors.

    input_ids (B, T) new target tokens, encoder_attention_mask (B, S), past self K/V
    (B, KV, P, Dh) per layer, cross K/V (B, KV, S, Dh) per layer -> logits (B, T, V),
    present self K/V (B, KV, P + T, Dh) per layer.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, encoder_attention_mask, past, cross) -> tuple[torch.Tensor, ...]:
        cache = filled_cache(len(self.model.decoder_layers), past, cross)
        b, t = input_ids.shape
        # Explicit all-true target masks: without them the model picks SDPA's causal or
        # unmasked fast path from the (traced) past length, which would tie the graph to one step.
        cache.key_mask = torch.ones(b, cache.length, dtype=torch.bool, device=input_ids.device)
        new_mask = torch.ones(b, t, dtype=torch.bool, device=input_ids.device)
        src_mask = encoder_attention_mask.bool()
        cache.cross_mask = src_mask
        logits = self.model.decode(input_ids, None, src_mask, cache, tgt_mask=new_mask)  # (B, T, V)
        return logits, *cache_tensors(cache.self_kv)


class DecoderGraph(nn.Module):
    """One step of a `Decoder`: input_ids (B, T), attention_mask (B, P + T), past K/V (B, KV, P, Dh)
    per layer -> logits (B, T, V), present K/V (B, KV, P + T, Dh) per layer."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, past) -> tuple[torch.Tensor, ...]:
        cache = filled_cache(len(self.model.layers), past)
        mask = attention_mask.bool()  # (B, P + T)
        cache.key_mask = mask[:, : cache.length]  # the cache keeps the padding of past tokens
        logits = self.model(input_ids, mask[:, cache.length :], cache)  # (B, T, V)
        return logits, *cache_tensors(cache.self_kv)


class EncoderGraph(nn.Module):
    """An `Encoder` with its head: input_ids (B, S), attention_mask (B, S) [, e1_pos, e2_pos (B,)] -> head output."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, e1_pos=None, e2_pos=None) -> torch.Tensor:
        return self.model(input_ids, attention_mask.bool(), e1_pos, e2_pos)


# ----------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------


def export_onnx(loaded: LoadedModel, out: Path) -> list[Path]:
    """Write the ONNX graphs of `loaded`, its tokenizer / labels / config and ``onnx.json`` into `out`.

    Args:
        loaded: a model dir from `load_model_dir` (its model is moved to fp32 on the CPU).
        out: an existing, empty directory.
    Returns:
        the files written, sorted.
    """
    require("onnx"), require("onnxscript")
    check_exportable(loaded)
    out.mkdir(parents=True, exist_ok=True)
    model = loaded.model.to("cpu", torch.float32).eval()
    family = loaded.cfg.model.family
    exporters = {"encoder_decoder": _export_encdec, "decoder": _export_decoder, "encoder": _export_encoder}
    # Traced with autograd on: the tied output head's CPU decoding shortcut
    # (`TokenEmbedding.attend`) keeps a transposed copy keyed by data_ptr, which
    # torch.export cannot trace; with gradients enabled the model takes its plain path.
    with torch.enable_grad(), _quiet_exporter():
        graphs = exporters[family](model, out)
    for name in COPIED_FILES:
        if (loaded.path / name).is_file():
            shutil.copyfile(loaded.path / name, out / name)
    manifest = build_manifest(loaded, model, graphs, out)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return sorted(p for p in out.iterdir() if p.is_file())


def check_exportable(loaded: LoadedModel) -> None:
    """A one-line `UserError` for models whose graphs we cannot write."""
    if loaded.compression.get("quantized"):
        raise UserError(f"{loaded.path}: a quantized model cannot be exported to ONNX; "
                        "export the fp32 (or pruned) model dir it was quantized from")
    m = loaded.cfg.model
    if m.family == "encoder" and m.char_cnn:
        raise UserError(f"model.char_cnn={m.char_cnn}: the character CNN's word-byte input has no ONNX export; "
                        "exportable are encoders with model.char_cnn: 0 (mlm, tagging and relation heads)")


def _export_encdec(model: nn.Module, out: Path) -> dict[str, Path]:
    n = len(model.decoder_layers)
    src, src_mask = _example_ids(EX_BATCH, EX_SRC), torch.ones(EX_BATCH, EX_SRC, dtype=torch.long)
    src_mask[0, -2:] = 0  # one right-padded row
    with torch.no_grad():
        _, *cross = EncDecEncoderGraph(model)(src, src_mask)  # example cross K/V for the decoder
    enc_axes = {"input_ids": ["batch", "src"], "attention_mask": ["batch", "src"],
                "memory": ["batch", "src"], **_kv_axes("cross", n, "src")}
    encoder = _export(EncDecEncoderGraph(model), (src, src_mask), out / "encoder.onnx",
                      ["input_ids", "attention_mask"], ["memory", *_kv_names("cross", n)], enc_axes)
    past = _example_past(model.decoder_layers, EX_PAST)
    dec_axes = {"input_ids": ["batch", "new"], "encoder_attention_mask": ["batch", "src"],
                **_kv_axes("past", n, "past"), **_kv_axes("cross", n, "src"),
                "logits": ["batch", "new"], **_kv_axes("present", n, "past + new")}
    args = (_example_ids(EX_BATCH, EX_NEW), src_mask, tuple(past), tuple(cross))
    inputs = ["input_ids", "encoder_attention_mask", *_kv_names("past", n), *_kv_names("cross", n)]
    decoder = _export(EncDecDecoderGraph(model), args, out / "decoder.onnx", inputs,
                      ["logits", *_kv_names("present", n)], dec_axes)
    return {"encoder": encoder, "decoder": decoder}


def _export_decoder(model: nn.Module, out: Path) -> dict[str, Path]:
    n = len(model.layers)
    mask = torch.ones(EX_BATCH, EX_PAST + EX_NEW, dtype=torch.long)
    mask[0, :2] = 0  # a left-padded prompt
    args = (_example_ids(EX_BATCH, EX_NEW), mask, tuple(_example_past(model.layers, EX_PAST)))
    axes = {"input_ids": ["batch", "new"], "attention_mask": ["batch", "past + new"],
            **_kv_axes("past", n, "past"), "logits": ["batch", "new"], **_kv_axes("present", n, "past + new")}
    inputs = ["input_ids", "attention_mask", *_kv_names("past", n)]
    return {"decoder": _export(DecoderGraph(model), args, out / "decoder.onnx", inputs,
                               ["logits", *_kv_names("present", n)], axes)}


def _export_encoder(model: nn.Module, out: Path) -> dict[str, Path]:
    ids, mask = _example_ids(EX_BATCH, EX_SRC), torch.ones(EX_BATCH, EX_SRC, dtype=torch.long)
    mask[0, -2:] = 0  # one right-padded row
    axes = {"input_ids": ["batch", "seq"], "attention_mask": ["batch", "seq"], "logits": ["batch", "seq"]}
    args: tuple = (ids, mask)
    if model.cfg.head == "relation":  # the entity-start marker indices (B,)
        args += (torch.tensor([0, 1]), torch.tensor([2, 3]))
        axes = {**axes, "e1_pos": ["batch"], "e2_pos": ["batch"], "logits": ["batch"]}
    inputs = ["input_ids", "attention_mask", "e1_pos", "e2_pos"][: len(args)]
    return {"encoder": _export(EncoderGraph(model), args, out / "encoder.onnx", inputs, ["logits"], axes)}


def _export(module: nn.Module, args: tuple, path: Path, input_names: list[str],
            output_names: list[str], axes: dict[str, list[str]]) -> Path:
    """torch.onnx.export of module(*args) with the axes named in `axes` dynamic; returns `path`.

    `input_names` name the tensors of `args` flattened in order (a tuple argument
    gives several inputs); `axes` maps input and output names to their axis
    names ("" for a static axis such as the heads of a K/V tensor).

    The dynamo exporter (torch.export + onnxscript) handles our code as it is:
    the Python branches on cache length and masks are taken once at trace time
    with the masks the wrappers always pass, and every shape stays symbolic
    (Dim.DYNAMIC: the mask length is past + new, which named Dims cannot say).
    The legacy TorchScript exporter is deprecated and not needed.
    """
    names = iter(input_names)
    dynamic = _nest(args, lambda _: {i: torch.export.Dim.DYNAMIC for i, a in enumerate(axes[next(names)]) if a})
    big = sum(p.numel() * p.element_size() for p in module.parameters()) > EXTERNAL_DATA_BYTES
    torch.onnx.export(
        module.eval(), args, str(path), dynamo=True, dynamic_shapes=dynamic, input_names=input_names,
        output_names=output_names, opset_version=OPSET, external_data=big, verbose=False,
    )
    name_axes(path, axes)
    return path


def name_axes(path: Path, axes: dict[str, list[str]]) -> None:
    """Rename the exporter's symbolic dims (s0, s17, ...) of inputs and outputs to `axes`' names.

    Only the names change (onnxruntime does not check them); they make the
    graph and ``onnx.json`` readable: ``present_key.0: [batch, 2, past + new, 16]``.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    symbols: dict[str, str] = {}
    for value in model.graph.input:
        for dim, name in zip(value.type.tensor_type.shape.dim, axes.get(value.name, [])):
            if dim.dim_param:
                symbols.setdefault(dim.dim_param, name)
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, symbols)) + r")\b") if symbols else None
    for value in [*model.graph.input, *model.graph.output]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param and pattern is not None:
                dim.dim_param = pattern.sub(lambda m: symbols[m.group(1)], dim.dim_param)
    onnx.save(model, str(path))


def build_manifest(loaded: LoadedModel, model: nn.Module, graphs: dict[str, Path], out: Path) -> dict[str, Any]:
    """What a runner needs: graphs and their I/O, special ids, cache shapes, decoding limits."""
    cfg = loaded.cfg
    layers = getattr(model, "decoder_layers", None) or model.layers
    attn = [layer.self_attn for layer in layers]
    manifest: dict[str, Any] = {
        "format": 1,
        "family": cfg.model.family,
        "opset": OPSET,
        "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
        "graphs": {name: {"file": p.name, **io_spec(p)} for name, p in graphs.items()},
        "tokenizer": "tokenizer.json" if (out / "tokenizer.json").is_file() else None,
        "special_ids": {"pad": tok.PAD_ID, "unk": tok.UNK_ID, "bos": tok.BOS_ID, "eos": tok.EOS_ID,
                        "mask": tok.MASK_ID, "sep": tok.SEP_ID, "cls": tok.CLS_ID},
        "vocab_size": cfg.model.vocab_size,
        "max_len": cfg.model.max_len,
        "n_layers": len(layers),
        "n_heads": attn[0].n_heads,
        "n_kv_heads": attn[0].n_kv_heads,
        "head_dim": attn[0].head_dim,
        "kv_heads_per_layer": [a.n_kv_heads for a in attn],  # differ after structured pruning
        "kv_layout": "(batch, kv_heads, length, head_dim)",
        "masks": "int64, 1 = real token; encoder_decoder: right padding, decoder: left padding",
    }
    if cfg.model.family == "encoder_decoder":
        manifest["generation"] = {
            "max_len_a": cfg.eval.max_len_a, "max_len_b": cfg.eval.max_len_b,
            "max_source_tokens": min(cfg.model.max_len, max(cfg.data.max_len, 8) * 4),
            "batch_tokens": cfg.eval.batch_tokens,
            "rule": "source = tokens + </s>; target starts with <s>; at most min(a * source_len + b, "
                    "max_len - 1) tokens, EOS included",
        }
    if cfg.model.family == "encoder":
        manifest["head"] = cfg.model.head
        manifest["labels"] = loaded.labels
        head = model.head
        if getattr(head, "crf_start", None) is not None:  # the learned tag-path scores for Viterbi
            manifest["crf"] = {"start": head.crf_start.tolist(), "trans": head.crf_trans.tolist()}
    return manifest


def io_spec(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Names, element types and (named) shapes of a graph's inputs and outputs."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def spec(value) -> dict[str, Any]:
        t = value.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).name
        shape = [d.dim_param or d.dim_value for d in t.shape.dim]
        return {"name": value.name, "dtype": dtype, "shape": shape}

    return {"inputs": [spec(v) for v in graph.input], "outputs": [spec(v) for v in graph.output]}


def _kv_names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}_{kind}.{i}" for i in range(n) for kind in ("key", "value")]


def _kv_axes(prefix: str, n: int, length: str) -> dict[str, list[str]]:
    """K/V tensors are (B, KV, length, Dh): only batch and length are dynamic."""
    return {name: ["batch", "", length] for name in _kv_names(prefix, n)}


def _example_ids(b: int, t: int) -> torch.Tensor:
    return torch.arange(b * t).reshape(b, t) % 7 + len(tok.SPECIAL_TOKENS)  # (B, T) ordinary ids


def _example_past(layers: nn.ModuleList, length: int) -> list[torch.Tensor]:
    out = []
    for layer in layers:
        a = layer.self_attn
        out += [torch.randn(EX_BATCH, a.n_kv_heads, length, a.head_dim) for _ in range(2)]  # (B, KV, P, Dh)
    return out


def _nest(args, f):
    """`args` with every tensor replaced by f(tensor), keeping the tuple nesting."""
    return tuple(_nest(a, f) for a in args) if isinstance(args, (tuple, list)) else f(args)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's notes on optional torchvision ops and torch's own deprecation
    warnings from inside torch.export (noise for a CLI user, nothing they can act on)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")
            yield
    finally:
        logger.setLevel(level)


# ----------------------------------------------------------------------------
# Greedy decoding with onnxruntime
# ----------------------------------------------------------------------------


class OnnxModel:
    """The graphs of an export directory in onnxruntime sessions (CPU).

    Args:
        out_dir: a directory written by `export_onnx`.
        threads: onnxruntime's intra-op threads per session.
    """

    def __init__(self, out_dir: str | Path, threads: int = 1):
        ort = require("onnxruntime")

        self.dir = Path(out_dir)
        if not (self.dir / MANIFEST).is_file():
            raise UserError(f"{self.dir}: no {MANIFEST} (not an ONNX export directory)")
        self.manifest = json.loads((self.dir / MANIFEST).read_text(encoding="utf-8"))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.sessions = {
            name: ort.InferenceSession(str(self.dir / g["file"]), opts, providers=["CPUExecutionProvider"])
            for name, g in self.manifest["graphs"].items()
        }

    def run(self, graph: str, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs of `graph` by name."""
        names = [o["name"] for o in self.manifest["graphs"][graph]["outputs"]]
        return dict(zip(names, self.sessions[graph].run(names, feeds)))

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """past_key.i / past_value.i of length 0 (the first step)."""
        m = self.manifest
        return {
            f"past_{kind}.{i}": np.zeros((batch, kv, 0, m["head_dim"]), np.float32)
            for i, kv in enumerate(m["kv_heads_per_layer"]) for kind in ("key", "value")
        }

    @functools.cached_property
    def tokenizer(self) -> tok.TextTokenizer:
        return tok.TextTokenizer.load(self.dir / "tokenizer.json")


def _select(feeds: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    """Keep batch rows `rows` of every tensor (rows that finished leave the batch)."""
    return {k: v[rows] for k, v in feeds.items()}


def _present_as_past(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"past" + k[len("present"):]: v for k, v in outputs.items() if k.startswith("present_")}


class OnnxTranslator(OnnxModel):
    """Greedy translation with exported encoder-decoder graphs, as `Translator.translate(beam=1)`."""

    def translate(self, sentences: list[str], max_len: int | None = None) -> list[str]:
        """Translations in input order; blank sentences give "" without running the graphs."""
        from trainformer.data.batching import length_sorted_batches

        g, tokenizer = self.manifest["generation"], self.tokenizer
        todo = [i for i, s in enumerate(sentences) if s.strip()]
        encoded = [[*ids[: g["max_source_tokens"] - 1], tok.EOS_ID]
                   for ids in tokenizer.encode_batch([sentences[i] for i in todo])]
        results = [""] * len(sentences)
        if not todo:
            return results
        lengths = np.array([len(e) for e in encoded])
        for batch in length_sorted_batches(lengths, max(g["batch_tokens"], 64), np.arange(len(encoded))):
            hyps = self.translate_ids([encoded[b] for b in batch], max_len)
            for b, hyp in zip(batch, hyps):
                results[todo[b]] = tokenizer.decode(hyp)
        return results

    def translate_ids(self, sources: list[list[int]], max_len: int | None = None) -> list[list[int]]:
        """Greedy target ids (without BOS / EOS) of a batch of source ids (each ending in EOS)."""
        from trainformer.generation.greedy import length_limits, strip_eos

        width = max(len(s) for s in sources)
        src = np.full((len(sources), width), tok.PAD_ID, np.int64)  # (B, S), right-padded
        for row, s in enumerate(sources):
            src[row, : len(s)] = s
        mask = (src != tok.PAD_ID).astype(np.int64)
        g = self.manifest["generation"]
        limits = np.array(length_limits(torch.from_numpy(src), torch.from_numpy(mask).bool(),
                                        self.manifest["max_len"], max_len, g["max_len_a"], g["max_len_b"]))
        enc = self.run("encoder", input_ids=src, attention_mask=mask)
        state = {"encoder_attention_mask": mask, **self.empty_past(len(sources)),
                 **{k: v for k, v in enc.items() if k.startswith("cross_")}}
        out = self._greedy_loop(state, limits)
        return [strip_eos(row[:limit], tok.EOS_ID) for row, limit in zip(out, limits.tolist())]

    def _greedy_loop(self, state: dict[str, np.ndarray], limits: np.ndarray) -> list[list[int]]:
        """Step the decoder from BOS; a row leaves the batch at EOS or its length limit."""
        n = len(limits)
        alive = np.arange(n)  # (A,) sentence of each row
        tokens = np.full((n, 1), tok.BOS_ID, np.int64)  # (A, t)
        out: list[list[int]] = [[] for _ in range(n)]
        for step in range(int(limits.max())):
            outputs = self.run("decoder", input_ids=tokens[:, -1:], **state)
            nxt = outputs["logits"][:, -1].argmax(-1)  # (A,)
            tokens = np.concatenate([tokens, nxt[:, None]], axis=1)
            state.update(_present_as_past(outputs))
            done = (nxt == tok.EOS_ID) | (step + 1 >= limits[alive])  # (A,)
            for row in np.flatnonzero(done):
                out[alive[row]] = tokens[row, 1:].tolist()
            keep = np.flatnonzero(~done)
            if keep.size == 0:
                break
            if keep.size < len(alive):
                alive, tokens, state = alive[keep], tokens[keep], _select(state, keep)
        return out


class OnnxGenerator(OnnxModel):
    """Greedy continuation with an exported decoder graph, as `generate(..., temperature=0)`."""

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 eos_id: int | None = None) -> list[list[int]]:
        """Per prompt, the greedy continuation ids (without EOS), batched with left padding."""
        from trainformer.generation.sampling import left_pad

        ids, mask = (t.numpy().astype(np.int64) for t in left_pad(prompts))  # (B, T) each
        steps = min(max_new_tokens, self.manifest["max_len"] - ids.shape[1])
        alive = np.arange(len(prompts))  # (A,) prompt of each row
        state = {"attention_mask": mask, **self.empty_past(len(prompts))}
        out: list[list[int]] = [[] for _ in prompts]
        new = ids
        for _ in range(max(steps, 0)):
            outputs = self.run("decoder", input_ids=new, **state)
            nxt = outputs["logits"][:, -1].argmax(-1)  # (A,)
            state.update(_present_as_past(outputs))
            done = nxt == eos_id if eos_id is not None else np.zeros_like(nxt, dtype=bool)
            for row in np.flatnonzero(~done):
                out[alive[row]].append(int(nxt[row]))
            keep = np.flatnonzero(~done)
            if keep.size == 0:
                break
            state["attention_mask"] = np.concatenate([state["attention_mask"], np.ones((len(nxt), 1), np.int64)], 1)
            new = nxt[:, None].astype(np.int64)
            if keep.size < len(alive):
                alive, new, state = alive[keep], new[keep], _select(state, keep)
        return out
