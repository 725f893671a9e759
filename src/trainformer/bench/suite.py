"""Runs the sections of the performance suite with quick or full sizes and collects one result dict."""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from trainformer.bench import decode, realdata, scaling
from trainformer.bench.memory import memory_method
from trainformer.bench.models import FAMILIES, Shape, bench_family
from trainformer.bench.peak import measure_peaks, mfu_peak
from trainformer.bench.report import environment
from trainformer.errors import UserError
from trainformer.textio import warn
from trainformer.training.device import keep_freed_memory
from trainformer.training.precision import resolve_precision

SECTIONS = ("peak", "train", "realdata", "decode", "scaling", "ddp")
TINY = Shape(layers=2, d=64, heads=2, d_ff=256, vocab=1024, batch=4, seq=64)
# GPT-2 small (124M) at its full context: the shape whose MFU on a GPU is widely quoted.
GPT2_SMALL = Shape(layers=12, d=768, heads=12, d_ff=3072, vocab=50257, batch=8, seq=1024)
TRAIN_MODELS = (*FAMILIES, "gpt2-small")  # names for --train-models


@dataclass
class Options:
    """What `trainformer bench` runs: sections, sizes (quick or full), device, precision, compile."""

    quick: bool = False
    only: tuple[str, ...] = SECTIONS
    device: str = "cpu"
    precision: str = "auto"
    compile: bool = False
    train_models: tuple[str, ...] | None = None  # None: the three families (+ gpt2-small on CUDA)
    train_batch: int | None = None  # sequences per training step for every model (None: each shape's)
    allocator: str = "default"  # "keep-freed": `keep_freed_memory` for the whole process (CPU)
    peer_attention: str = "sdpa"  # the HF peers' attn_implementation in the training step (sdpa: HF's default)
    notes: list[str] = field(default_factory=list)


def parse_only(text: str | None) -> tuple[str, ...]:
    """'peak,train' -> ('peak', 'train'); None -> every section. Unknown names are a UserError."""
    if not text:
        return SECTIONS
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in SECTIONS]
    if bad or not names:
        raise UserError(f"--only: unknown section(s) {', '.join(bad) or '(none)'}; expected some of {','.join(SECTIONS)}")
    return names


def parse_train_models(text: str | None) -> tuple[str, ...] | None:
    """'gpt2-small,decoder' -> ('gpt2-small', 'decoder'), in that order; None -> the default set."""
    if not text:
        return None
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in TRAIN_MODELS]
    if bad or not names:
        raise UserError(f"--train-models: unknown model(s) {', '.join(bad) or '(none)'}; "
                        f"expected some of {','.join(TRAIN_MODELS)}")
    return names


def train_models(o: Options, dev: torch.device) -> list[tuple[str, str, Shape]]:
    """(label, family, shape) of each training-step comparison, in the order they run."""
    s = TINY if o.quick else Shape()
    gpt2 = ("decoder (GPT-2 small, seq 1024)", "decoder", GPT2_SMALL)
    table = {f: (f, f, s) for f in FAMILIES} | {"gpt2-small": gpt2}
    names = o.train_models or (*FAMILIES, *(["gpt2-small"] if dev.type == "cuda" and not o.quick else []))
    rows = [table[n] for n in names]
    if o.train_batch:
        rows = [(label, f, replace(shape, batch=o.train_batch)) for label, f, shape in rows]
    return rows


def _train(o: Options, dev: torch.device, prec: str, peaks: dict,
           emit: Callable[[list[dict]], None] = lambda _rows: None) -> list[dict]:
    """One row per model of `train_models`; `emit(rows)` after each, so a cut-short run keeps them."""
    steps, warmup = (3, 1) if o.quick else (10, 2)
    memory = dev.type == "cuda" or not o.quick  # CPU memory needs fresh processes: skipped in --quick
    peak = mfu_peak(peaks, prec)
    measured = peaks["measured"][prec] if peak != peaks["measured"][prec] else None
    rows: list[dict] = []
    for label, family, shape in train_models(o, dev):
        print(f"bench: train {label} ...", flush=True)
        r = bench_family(family, shape, steps, warmup, dev, prec, peak, o.compile, memory, measured,
                         o.peer_attention)
        rows.append({**r, "family": label, "shape": shape.__dict__})
        emit(rows)
    return rows


def _realdata(o: Options, dev: torch.device, prec: str, peaks: dict) -> dict:
    if o.quick:
        return realdata.bench_realdata(dev, prec, steps=3, warmup=1, max_tokens=1500)
    return realdata.bench_realdata(dev, prec, steps=20, warmup=2)


def _decode(o: Options, dev: torch.device, prec: str, peaks: dict) -> dict:
    s = TINY if o.quick else Shape()
    n, repeats = (50, 1) if o.quick else (1000, 2 if dev.type == "cuda" else 3)  # GPU timings vary little
    return {"translation": decode.bench_translation(s, dev, prec, n, repeats=repeats),
            "chat": decode.bench_chat(s, dev, prec, new_tokens=32 if o.quick else 128, repeats=repeats)}


def _scaling(o: Options, dev: torch.device, prec: str, peaks: dict) -> dict:
    s = TINY if o.quick else Shape()
    seqs = [64, 128] if o.quick else [128, 256, 512, 1024, 2048, 4096]
    batches = [1, 2] if o.quick else [1, 2, 4, 8, 16, 32]
    steps, warmup = (2, 1) if o.quick else (3, 1)
    by_seq = Shape(**{**s.__dict__, "batch": 1})
    # No torch.compile here: each point is a new model and would compile again (minutes on a GPU).
    return {"seq": scaling.seq_scaling(by_seq, seqs, dev, prec, False, steps, warmup),
            "batch": scaling.batch_scaling(s, batches, dev, prec, False, steps, warmup)}


def _ddp(o: Options, dev: torch.device, prec: str, peaks: dict) -> dict:
    s = TINY if o.quick else Shape(batch=8)
    return scaling.ddp_scaling(s, steps=2 if o.quick else 5, warmup=1 if o.quick else 2)


RUNNERS: dict[str, Callable[[Options, torch.device, str, dict], object]] = {
    "realdata": _realdata, "decode": _decode, "scaling": _scaling,
}


def _guarded(name: str, fn: Callable[[], object]) -> object:
    """Run one section; a failure is recorded (and warned) so the other sections still run."""
    print(f"bench: {name} ...", flush=True)
    try:
        return fn()
    except Exception as e:  # a section failing must not lose the others' figures
        traceback.print_exc()
        warn(f"bench section {name!r} failed: {type(e).__name__}: {e}")
        return {"error": f"{type(e).__name__}: {e}"}


def _allocator_notes(allocator: str, dev: torch.device) -> list[str]:
    """Apply ``--allocator keep-freed`` (CPU) and say what the process's allocator is, for both sides."""
    notes = [f"environment sets {k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")]
    if allocator != "keep-freed" or dev.type != "cpu":
        return notes
    if keep_freed_memory():
        return notes + ["allocator: freed memory kept for reuse (glibc mmap off, no trim; what trainformer's "
                        "CPU training runs set), for ours and the peers alike (one process)"]
    return notes + ["allocator: --allocator keep-freed has no effect here (Linux / glibc only)"]


def run_suite(o: Options, on_update: Callable[[dict], None] | None = None) -> dict:
    """Run the selected sections and return {"env", "notes", section: result...} (JSON-ready).

    `on_update(results)` is called after each section, so a run cut short
    (timeout, Ctrl-C) still leaves the figures measured so far.
    """
    update = on_update or (lambda _r: None)
    dev = torch.device(o.device)
    prec = resolve_precision(o.precision, dev)
    if dev.type == "cpu" and prec == "bf16":
        o.notes.append("bf16 on CPU asked for explicitly")
    results: dict = {"env": environment(str(dev), prec, torch.get_num_threads()), "notes": o.notes,
                     "memory_method": memory_method(dev), "options": {"quick": o.quick, "compile": o.compile}}
    if dev.type == "cpu" and o.precision == "auto" and prec == "fp32":
        o.notes.append("CPU has no native bf16 (AVX2 only): precision 'auto' resolved to fp32")
    if o.compile:
        o.notes.append("torch.compile applied to the training-step models (section train) only")
    o.notes.extend(_allocator_notes(o.allocator, dev))
    results["options"]["allocator"] = o.allocator
    results["options"]["peer_attention"] = o.peer_attention
    if o.peer_attention != "sdpa":
        o.notes.append(f"HF peers' attention in the training step: {o.peer_attention} (HF's default: sdpa)")
    peaks: dict = {}
    if "peak" in o.only or "train" in o.only:
        peaks = _guarded("peak", lambda: measure_peaks(dev, o.quick))
        results["peak"] = peaks
        update(results)
    for name in o.only:
        if name == "train" and "error" not in peaks:
            def emit(rows: list[dict]) -> None:
                update({**results, "train": rows})
            results[name] = _guarded(name, lambda e=emit: _train(o, dev, prec, peaks, e))
        elif name in RUNNERS:
            results[name] = _guarded(name, lambda n=name: RUNNERS[n](o, dev, prec, peaks))
        else:
            continue
        update(results)
    if "ddp" in o.only:
        if dev.type == "cpu":
            ddp = _guarded("ddp", lambda: _ddp(o, dev, prec, peaks))
            results.setdefault("scaling", {})
            if isinstance(results["scaling"], dict) and "error" not in results["scaling"]:
                results["scaling"]["ddp"] = ddp
            else:
                results["ddp"] = ddp
        else:
            o.notes.append("ddp section is CPU-only (gloo); skipped on CUDA")
    update(results)
    return results
