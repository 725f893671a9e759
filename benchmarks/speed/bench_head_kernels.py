"""The matmul kernels of a CPU decoding step, per row count: which one each layer should use.

Decoding runs the same few matmuls at every step, on as many rows as there are
alive hypotheses (batch x beam). This script times, for each row count, the
choices `trainformer` makes there:

- int8 (``trainformer quantize --method dynamic``): torch.ao's dynamic int8 Linear
  packed for the default engine (fbgemm) or for oneDNN, on the tied output head
  (d_model -> vocabulary) and on the decoder's Linear shapes. `models.quantized.head_engine`
  picks oneDNN for the head from ``ONEDNN_HEAD_MIN_OUTPUTS`` rows x words on AVX-512 CPUs.
- the fp32 / bf16 head (`nn.cpu_head.FastHead`, outside training): ``F.linear(h, W)``,
  the cached contiguous transpose ``h @ W.T`` (fp32, up to ``TRANSPOSED_HEAD_ROWS`` rows) and
  oneDNN's linear with the weight prepacked once (AVX-512 CPUs; bf16 under autocast).
- fp32 attention of a step: self-attention (one query per row against the cached keys)
  and cross-attention (a source's beams, `--beam` queries per row, against its memory,
  with and without a key padding mask), each ending in the (rows, queries, heads x Dh)
  layout the output projection takes: SDPA, two batched GEMMs (`nn.attention.matmul_attention`,
  taken from ``ONE_QUERY_MIN_BLOCKS`` rows x heads with one query, ``FEW_QUERY_MIN_BLOCKS``
  with up to ``FEW_QUERY_MAX``, and ``FEW_QUERY_MIN_SCORES`` queries x keys, where the C
  kernel is not built), and the C kernel (`nn.native`, decoding's pick where it is built).

Random weights of the model's shapes, one thread (as decoding benchmarks run),
variants interleaved after a warm-up; medians in microseconds.

    python benchmarks/speed/bench_head_kernels.py [--d-model 192] [--vocab 8000 4000] [--d-ff 768]
        [--heads 4] [--keys 4 16 32 64] [--beam 4] [--parts int8 head attention]
        [--rounds 40] [--out benchmarks/results/head-kernels]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from trainformer.bench.report import write_table_report
from trainformer.bench.timing import interleaved, timed
from trainformer.errors import run_script
from trainformer.models.quantized import ONEDNN_HEAD_MIN_OUTPUTS, head_engine
from trainformer.nn import native
from trainformer.nn.attention import (
    FEW_QUERY_MAX,
    FEW_QUERY_MIN_BLOCKS,
    FEW_QUERY_MIN_SCORES,
    ONE_QUERY_MIN_BLOCKS,
    few_query_pays,
    matmul_attention,
)
from trainformer.nn.cpu_head import (
    TRANSPOSED_HEAD_ROWS,
    head_kernel,
    onednn_linear,
    onednn_pack,
    onednn_prepacked_linear,
)
from trainformer.paths import REPO_ROOT
from trainformer.rundir import machine_line, package_versions

ROWS = (1, 8, 16, 32, 64, 128, 256, 512)


def int8_linear(d_in: int, d_out: int, engine: str) -> nn.Module:
    """torch.ao's dynamic int8 Linear of a random (d_out, d_in) weight, packed for `engine`."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return quantize_dynamic(nn.Sequential(nn.Linear(d_in, d_out)), {nn.Linear: per_channel_dynamic_qconfig},
                                    dtype=torch.qint8)
    finally:
        torch.backends.quantized.engine = before


def medians_us(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    cpu = torch.device("cpu")
    runs = {name: (lambda fn=fn: timed(fn, cpu)) for name, fn in fns.items()}
    return {k: round(statistics.median(v) * 1e6, 1) for k, v in interleaved(runs, rounds, warmup=3).items()}


def int8_rows(shapes: dict[str, tuple[int, int]], rounds: int) -> list[dict]:
    engines = (torch.backends.quantized.engine, "onednn")
    rows = []
    for name, (d_in, d_out) in shapes.items():
        layers = {e: int8_linear(d_in, d_out, e) for e in engines}
        for n in ROWS:
            x = torch.randn(n, d_in)
            us = medians_us({e: (lambda m=m, x=x: m(x)) for e, m in layers.items()}, rounds)
            rows.append({"kind": "int8", "layer": name, "rows": n, "us": us,
                         "picked": head_engine(n, d_out) if name.startswith("head") else engines[0]})
            print(rows[-1], flush=True)
    return rows


def head_rows(d_model: int, vocabs: list[int], rounds: int) -> list[dict]:
    """The tied head in fp32 (F.linear, the cached transpose, oneDNN with a prepacked weight) and
    under bf16 autocast (autocast's F.linear, oneDNN with a prepacked bf16 weight)."""
    rows = []
    for vocab in vocabs:
        w = nn.Parameter(torch.randn(vocab, d_model) * 0.05)  # a parameter: autocast caches its bf16 copy
        wt = w.detach().t().contiguous()
        packed = {dt: onednn_pack(w, dt) for dt in (torch.float32, torch.bfloat16)} if onednn_prepacked_linear() else {}
        for dtype in (torch.float32, torch.bfloat16):
            for n in ROWS + (2048,):
                x = torch.randn(n, d_model)
                xd = x.to(dtype)  # what the prepacked kernel takes (autocast casts F.linear's input itself)
                fns = {"F.linear": lambda x=x, w=w: F.linear(x, w)}
                if dtype == torch.float32:
                    fns["transposed"] = lambda x=x, wt=wt: x @ wt
                if packed:
                    fns["oneDNN prepacked"] = lambda x=xd, p=packed[dtype]: onednn_linear(x, p)
                with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
                    us = medians_us(fns, rounds)
                picked = head_kernel(n, dtype)
                rows.append({"kind": "fp32" if dtype == torch.float32 else "bf16", "layer": f"head {d_model}->{vocab}",
                             "rows": n, "us": us, "picked": picked})
                print(rows[-1], flush=True)
    return rows


def to_rows(y: torch.Tensor) -> torch.Tensor:
    """(N, H, T, Dh) -> (N, T, H * Dh), the copy the attention layer makes for its output projection
    (the C kernel writes that layout itself)."""
    n, h, t, dh = y.shape
    return y.permute(0, 2, 1, 3).reshape(n, t, h * dh)


def attention_rows(d_model: int, n_heads: int, keys: list[int], beam: int, rounds: int) -> list[dict]:
    """Self-attention (1 query per row) and cross-attention (`beam` queries per row, unmasked
    and with the last quarter of every other row's keys padded) at each row count."""
    dh = d_model // n_heads
    kinds = [("self-attention", 1, False), ("cross-attention", beam, False), ("cross-attention, padded", beam, True)]
    rows = []
    for name, queries, padded in kinds:
        for n_keys in keys:
            for n in ROWS:
                q = torch.randn(n, n_heads, queries, dh)
                k, v = torch.randn(n, n_heads, n_keys, dh), torch.randn(n, n_heads, n_keys, dh)
                mask = None
                if padded:
                    mask = torch.ones(n, 1, 1, n_keys, dtype=torch.bool)
                    mask[::2, ..., n_keys - max(1, n_keys // 4):] = False
                fns = {"SDPA": lambda q=q, k=k, v=v, m=mask: to_rows(F.scaled_dot_product_attention(q, k, v, attn_mask=m)),
                       "2 bmm": lambda q=q, k=k, v=v, m=mask: to_rows(matmul_attention(q, k, v, m))}
                if native.available():
                    fns["C kernel"] = lambda q=q, k=k, v=v, m=mask: native.decode_attention(q, k, v, m)
                us = medians_us(fns, rounds)
                picked = "2 bmm" if few_query_pays(n * n_heads, queries, n_keys) else "SDPA"
                rows.append({"kind": "fp32", "layer": f"{name} {n_heads}x{dh}, {queries} queries, {n_keys} keys",
                             "rows": n, "us": us, "picked": "C kernel" if native.available() else picked})
                print(rows[-1], flush=True)
    return rows


def table(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        first = next(iter(r["us"].values()))
        out.append([r["kind"], r["layer"], str(r["rows"]), ", ".join(f"{k} {t:.1f}" for k, t in r["us"].items()),
                    f"{first / r['us'][r['picked']]:.2f}x", r["picked"]])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=192)
    ap.add_argument("--d-ff", type=int, default=768)
    ap.add_argument("--vocab", type=int, nargs="+", default=[8000, 4000])
    ap.add_argument("--heads", type=int, default=4, help="attention heads (of --d-model)")
    ap.add_argument("--keys", type=int, nargs="+", default=[4, 16, 32, 64], help="keys (attention rows)")
    ap.add_argument("--beam", type=int, default=4, help="queries per row of the cross-attention rows")
    ap.add_argument("--parts", nargs="+", choices=["int8", "head", "attention"], default=["int8", "head", "attention"])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "head-kernels")
    args = ap.parse_args()
    torch.set_num_threads(1)
    d = args.d_model
    shapes = {f"head {d}->{v}": (d, v) for v in args.vocab}
    shapes |= {f"qkv {d}->{3 * d}": (d, 3 * d), f"ffn up {d}->{args.d_ff}": (d, args.d_ff),
               f"ffn down {args.d_ff}->{d}": (args.d_ff, d)}
    rows = ((int8_rows(shapes, args.rounds) if "int8" in args.parts else [])
            + (head_rows(d, args.vocab, args.rounds) if "head" in args.parts else [])
            + (attention_rows(d, args.heads, args.keys, args.beam, args.rounds) if "attention" in args.parts else []))
    results = {"machine": machine_line(), "versions": package_versions(), "threads": 1,
               "date": time.strftime("%Y-%m-%d"), "rounds": args.rounds,
               "onednn_head_min_outputs": ONEDNN_HEAD_MIN_OUTPUTS, "transposed_head_rows": TRANSPOSED_HEAD_ROWS,
               "few_query_max": FEW_QUERY_MAX, "one_query_min_blocks": ONE_QUERY_MIN_BLOCKS,
               "few_query_min_blocks": FEW_QUERY_MIN_BLOCKS, "few_query_min_scores": FEW_QUERY_MIN_SCORES,
               "rows": rows}
    intro = [f"{results['date']}, {results['machine']}; torch {results['versions']['torch']}, 1 thread; "
             f"median of {args.rounds} interleaved calls, microseconds per call (random weights).",
             f"Command: `python benchmarks/speed/bench_head_kernels.py --d-model {d} --vocab "
             f"{' '.join(map(str, args.vocab))} --heads {args.heads} --keys {' '.join(map(str, args.keys))} "
             f"--beam {args.beam} --parts {' '.join(args.parts)}`",
             "", "ratio = first / picked (above 1: the pick is faster). picked = what trainformer uses "
             f"there (int8 head: oneDNN from {ONEDNN_HEAD_MIN_OUTPUTS:,} rows x words on AVX-512 CPUs; "
             f"fp32 and bf16 head: `nn.cpu_head.head_kernel` (the transpose up to {TRANSPOSED_HEAD_ROWS} rows); attention: the C kernel where it is built, "
             f"else two batched GEMMs from {ONE_QUERY_MIN_BLOCKS} rows x heads with one query, "
             f"{FEW_QUERY_MIN_BLOCKS} with up to {FEW_QUERY_MAX}, and {FEW_QUERY_MIN_SCORES} queries x keys). "
             "Cross-attention rows: a row is one source, its queries the beams (a step of rows x beam "
             "hypotheses); padded: every other source's last quarter of keys masked."]
    text = write_table_report(args.out, "bench_head_kernels", results, "Kernels of a CPU decoding step",
                              intro, ["dtype", "layer", "rows", "kernels (us)", "ratio", "picked"],
                              table(rows))
    print(text)


if __name__ == "__main__":
    run_script(main, "bench_head_kernels")
