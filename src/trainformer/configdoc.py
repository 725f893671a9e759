"""The config reference (docs/config.md), generated from the dataclasses in `trainformer.config`.

Each key's text is the comment written beside its field in ``config.py`` (the
comment lines right above the field, then the one at the end of its line);
a field without a comment takes its text from `FIELD_DOCS` below. Types and
defaults come from the dataclasses themselves. Rewrite the page with

    python -m trainformer.configdoc > docs/config.md

``tests/test_docs.py`` fails when a field has no text (`undocumented`) or
when docs/config.md differs from `render()`.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import sys
import tokenize
from typing import Any

from trainformer import config as C

# Fields whose line in config.py carries no comment: dotted key -> text.
FIELD_DOCS: dict[str, str] = {
    "task": "what the run trains: selects the data handling, loss and metrics",
    "name": "the run's name (the default run dir is runs/<recipe>-<time>)",
    "description": "one line shown by `trainformer recipes`",
    "model.family": "encoder_decoder (translation), encoder (MLM, NER, relations) or decoder (LM, chat)",
    "model.d_model": "width of the residual stream",
    "model.n_heads": "attention heads; must divide d_model",
    "model.d_ff": "feed-forward inner width",
    "model.dropout": "dropout on the embeddings, each sub-layer's output and the task head (none on attention probabilities)",
    "model.position": "position encoding: fixed sinusoids, a learned table, or rotary (relative)",
    "model.rope_theta": "rotary base frequency (position: rope)",
    "model.norm": "LayerNorm or RMSNorm",
    "model.norm_eps": "epsilon of every norm",
    "model.activation": "feed-forward activation; swiglu doubles the first layer's rows (gate; value)",
    "model.bias": "biases on linear layers (false: none, as in LLaMA-style models)",
    "model.head": "what sits on the last layer: LM / MLM logits, a tag per token, or a relation label",
    "model.init_std": "standard deviation of the normal weight init (residual projections scaled down)",
    "data.tokenizer": "the tokenizer section (below)",
    "data.tokenizer.kind": "bpe (SentencePiece-style Metaspace), byte_bpe (GPT-2 style, every byte in the vocabulary) or wordpiece (BERT-style)",
    "data.tokenizer.vocab_size": "entries of a trained tokenizer, special tokens included",
    "data.tokenizer.min_frequency": "a merge or piece must occur this often in the training text",
    "data.tokenizer.lowercase": "lowercase text before tokenising",
    "data.src_lang": "source column / language key (translation)",
    "data.tgt_lang": "target column / language key (translation)",
    "data.bad_lines": "malformed lines: skip them (counted in data.json) or stop at the first one",
    "data.test_size": "like valid_size, for data sets without an official test split",
    "data.split_seed": "seed of the keyed hash that assigns groups to splits",
    "data.mlm_probability": "mlm: share of tokens chosen for prediction (80% masked, 10% random, 10% kept)",
    "optim.lr": "peak learning rate (AdamW)",
    "optim.betas": "AdamW betas",
    "optim.eps": "AdamW epsilon",
    "optim.weight_decay": "decoupled weight decay, on weight matrices only (not biases, norms, embeddings or CRF scores)",
    "optim.fused": "use PyTorch's fused AdamW kernel where the device has one (else foreach)",
    "optim.schedule": "learning-rate schedule after warm-up",
    "optim.warmup_steps": "linear warm-up steps",
    "train.max_steps": "optimizer steps before the run stops",
    "train.grad_accum": "micro-batches per optimizer step (the loss is normalised over all their tokens)",
    "train.precision": "autocast dtype; auto: bf16 on a CPU with native bf16 (else fp32), on CUDA bf16 where supported (else fp16)",
    "train.compile": "torch.compile the model",
    "train.activation_checkpointing": "recompute each layer's activations in the backward pass",
    "train.label_smoothing": "label smoothing of the cross-entropy",
    "train.seed": "seed of weights, dropout and batch order",
    "train.deterministic": "torch.use_deterministic_algorithms (warns where an op has no deterministic kernel)",
    "train.log_every": "steps between metrics.jsonl records and progress updates",
    "train.ckpt_every_minutes": "also checkpoint every N minutes of wall clock; 0 = off",
    "train.keep_last": "step checkpoints kept (at least average_last are kept)",
    "train.progress": "show the progress bar on a terminal",
    "parallel.strategy": "DDP, or FSDP2 (fully_shard per layer) under torchrun",
    "parallel.backend": "process-group backend; auto: NCCL on CUDA, gloo on CPU",
    "eval.beam": "beam size of translation evaluation (1 = greedy)",
    "eval.length_penalty": "GNMT length-penalty alpha of beam search (0: raw log-probability)",
    "eval.batch_tokens": "token budget of one evaluation batch",
    "eval.max_len_b": "the b of max_len_a: generation stops at a * source_length + b tokens",
}

# (dotted prefix, dataclass), in the order the page lists them.
SECTIONS: list[tuple[str, type]] = [
    ("", C.Config),
    ("model", C.ModelConfig),
    ("data", C.DataConfig),
    ("data.tokenizer", C.TokenizerConfig),
    ("optim", C.OptimConfig),
    ("train", C.TrainConfig),
    ("parallel", C.ParallelConfig),
    ("eval", C.EvalConfig),
]

HEADER = """\
# Config reference

<!-- generated by `python -m trainformer.configdoc > docs/config.md`; do not edit by hand -->

A recipe is YAML that mirrors these dataclasses (`trainformer/config.py`).
Loading is strict: an unknown key, a wrong type or an out-of-range value is a
one-line error naming the key (and the closest valid key). Any key can be set
from the command line: `--set optim.lr=3e-4 --set model.preset=transformer-base`.
`model.preset` fills the model keys from a named size; keys the recipe sets
itself win. `trainformer recipes NAME` prints a recipe fully resolved.
"""


def _comments(cls: type) -> dict[str, str]:
    """Field name -> its comment in the class source (lines above, then end of line)."""
    source = inspect.getsource(cls)
    lines = source.splitlines()
    inline: dict[int, str] = {}  # 1-based line -> comment text at its end
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and lines[tok.start[0] - 1][: tok.start[1]].strip():
            inline[tok.start[0]] = tok.string.lstrip("#").strip()
    tree = ast.parse(source)
    out = {}
    for node in tree.body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above = []
        i = node.lineno - 2
        while i >= 0 and lines[i].strip().startswith("#"):
            above.insert(0, lines[i].strip().lstrip("#").strip())
            i -= 1
        parts = above + ([inline[node.end_lineno]] if node.end_lineno in inline else [])
        if parts:
            out[node.target.id] = " ".join(parts)
    return out


def _annotations(cls: type) -> dict[str, str]:
    """Field name -> its annotation as written in the source."""
    source = inspect.getsource(cls)
    tree = ast.parse(source)
    return {
        node.target.id: ast.get_source_segment(source, node.annotation) or ""
        for node in tree.body[0].body
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
    }


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, str):
        return f'"{value}"' if value == "" else value
    return repr(value)


def _is_section(f: dataclasses.Field) -> bool:
    """True for a field that holds a nested config dataclass (``model: ModelConfig``)."""
    factory = f.default_factory
    return factory is not dataclasses.MISSING and dataclasses.is_dataclass(factory())


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return f"`{_yaml(f.default)}`"
    if _is_section(f):
        return "(section)"
    if f.default_factory is not dataclasses.MISSING:
        return f"`{_yaml(f.default_factory())}`"
    return ""


def _type(annotation: str) -> str:
    if annotation.startswith("Literal["):
        choices = ast.literal_eval("(" + annotation.removeprefix("Literal[")[:-1] + ",)")
        return " \\| ".join(f"`{c}`" for c in choices)
    return f"`{annotation.replace('|', chr(92) + '|')}`"


def _cell(text: str) -> str:
    """Comment text as a Markdown table cell: pipes escaped, <tags> shown as text."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def rows() -> list[tuple[str, str, str, str]]:
    """(key, type, default, text) for every field of every section; text '' when undocumented."""
    out = []
    for prefix, cls in SECTIONS:
        comments = _comments(cls)
        annotations = _annotations(cls)
        for f in dataclasses.fields(cls):
            key = f"{prefix}.{f.name}" if prefix else f.name
            if not prefix and _is_section(f):
                continue  # the sections of Config get their own tables
            text = comments.get(f.name) or FIELD_DOCS.get(key, "")
            out.append((key, _type(annotations.get(f.name, "")), _default(f), text))
    return out


def undocumented() -> list[str]:
    """Keys without a comment in config.py and without an entry in FIELD_DOCS."""
    return [key for key, _, _, text in rows() if not text]


def stale_docs() -> list[str]:
    """FIELD_DOCS keys that no longer name a field (or now have a comment of their own)."""
    keys = {key for key, _, _, _ in rows()}
    commented = set()
    for prefix, cls in SECTIONS:
        commented |= {f"{prefix}.{name}" if prefix else name for name in _comments(cls)}
    return sorted(k for k in FIELD_DOCS if k not in keys or k in commented)


def render() -> str:
    """The whole docs/config.md."""
    by_section: dict[str, list[tuple[str, str, str, str]]] = {}
    for key, tp, default, text in rows():
        section = next((p for p, _ in reversed(SECTIONS) if p and key.startswith(p + ".")), "")
        by_section.setdefault(section, []).append((key, tp, default, text))
    out = [HEADER]
    for prefix, cls in SECTIONS:
        title = f"`{prefix}`" if prefix else "Top level"
        out.append(f"\n## {title}\n")
        doc = inspect.getdoc(cls) or ""
        if doc and not doc.startswith(cls.__name__ + "("):
            out.append(doc.splitlines()[0] + "\n")
        out.append("| key | type | default | what |\n|---|---|---|---|")
        for key, tp, default, text in by_section.get(prefix, []):
            out.append(f"| `{key}` | {tp} | {default} | {_cell(text)} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
