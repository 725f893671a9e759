"""Training-step speed of our three families against their Hugging Face peers, in one process.

One step = forward + cross-entropy + backward + AdamW(fused) step, under bf16
autocast (``--precision``; "auto" falls back to fp32 where bf16 matmuls are
slower, as on AVX2-only CPUs), dropout 0, at equal shapes (6 layers, d 384, 6 heads, d_ff 1536,
vocabulary 8192, batch 16 x 256 tokens by default):

    decoder          Decoder                        vs GPT2LMHeadModel (attn_implementation="sdpa")
    encoder          Encoder (MLM head)             vs BertForMaskedLM
    encoder_decoder  EncoderDecoder (6 + 6 layers)  vs MarianMTModel

Steps of the two models alternate (ours, theirs, ours, ...) after a warm-up,
so background load hits both alike; the median step time is reported. The
bf16 and fp32 matmul peaks are measured in the same run; MFU = model FLOPs per step
(matmuls counted from the shapes, training = 3 x forward, attention
included) / step time / peak.

    python benchmarks/speed/bench_models.py --steps 10 --out bench.json
"""

from __future__ import annotations

import argparse
import json

import torch

from trainformer.bench.models import FAMILIES, Shape, bench_family
from trainformer.bench.peak import matmul_peak
from trainformer.rundir import machine_line


def markdown(results: list[dict], peaks: dict[str, float], precision: str) -> str:
    measured = ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items())
    lines = [f"precision: {precision}; matmul peak measured in this run: {measured}", "",
             "| family | ours step (s) | HF step (s) | speed-up | ours MFU | HF MFU | ours params | HF params |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        o, h = r["ours"], r["hf"]
        lines.append(f"| {r['family']} | {o['median_s']:.3f} | {h['median_s']:.3f} | {r['speedup']:.2f}x | "
                     f"{o['mfu']:.1%} | {h['mfu']:.1%} | {o['params'] / 1e6:.1f}M | {h['params'] / 1e6:.1f}M |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps per model (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--family", choices=(*FAMILIES, "all"), default="all")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 autocast unless this device's bf16 matmul is slower than fp32 "
                        "(CPUs without AVX512-BF16/AMX)")
    p.add_argument("--out", help="write the results to this JSON file")
    args = p.parse_args()
    device = torch.device(args.device)
    s = Shape(batch=args.batch, seq=args.seq)
    n = 8192 if device.type == "cuda" else 1024
    peaks = {"bf16": matmul_peak(device, n, torch.bfloat16), "fp32": matmul_peak(device, n, torch.float32)}
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if peaks["bf16"] >= peaks["fp32"] else "fp32"
    families = FAMILIES if args.family == "all" else (args.family,)
    results = [bench_family(f, s, args.steps, args.warmup, device, precision, peaks[precision]) for f in families]
    # Background load can depress the first peak measurement (MFU > 100%): take the best of two.
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    again = matmul_peak(device, n, dtype)
    if again > peaks[precision]:
        for r in results:
            for k in ("ours", "hf"):
                r[k]["mfu"] *= peaks[precision] / again
        peaks[precision] = again
    print(markdown(results, peaks, precision))
    if args.out:
        env = {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
               "cpu": machine_line(), "shape": vars(s)}
        with open(args.out, "w") as fh:
            json.dump({"env": env, "precision": precision, "peak_flops": peaks, "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
