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

    python benchmarks/bench_models.py --steps 10 --out bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainformer.config import ModelConfig
from trainformer.models import build_model, count_parameters

FAMILIES = ("decoder", "encoder", "encoder_decoder")


@dataclass
class Shape:
    layers: int = 6
    d: int = 384
    heads: int = 6
    d_ff: int = 1536
    vocab: int = 8192
    batch: int = 16
    seq: int = 256


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, n: int, dtype: torch.dtype, reps: int = 3) -> float:
    """FLOP/s of an (n x n) @ (n x n) matmul in `dtype`, the best of `reps`."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def train_flops(family: str, s: Shape) -> float:
    """Matmul FLOPs of one training step (3 x forward), attention scores included (PaLM appendix B)."""
    tokens = s.batch * s.seq
    d, f = s.d, s.d_ff
    self_layer = 2 * (4 * d * d + 2 * d * f) + 4 * s.seq * d  # per token: projections + QK^T and AV
    cross_layer = 2 * (2 * d * d) + 4 * s.seq * d  # q and out on target tokens + attention over the memory
    cross_memory = 2 * (2 * d * d)  # k and v of the memory, per source token
    head = 2 * d * s.vocab
    if family == "encoder_decoder":
        forward = tokens * s.layers * (self_layer + cross_memory) + tokens * (s.layers * (self_layer + cross_layer) + head)
    else:
        forward = tokens * (s.layers * self_layer + head)
        if family == "encoder":
            forward += tokens * 2 * d * d  # the MLM head's dense layer
    return 3.0 * forward


def ours(family: str, s: Shape) -> torch.nn.Module:
    common = dict(vocab_size=s.vocab, d_model=s.d, n_heads=s.heads, n_layers=s.layers, d_ff=s.d_ff,
                  max_len=s.seq, dropout=0.0, activation="gelu")
    if family == "decoder":  # GPT-2 layout
        cfg = ModelConfig(family="decoder", position="learned", scale_embedding=False, **common)
    elif family == "encoder":  # BERT layout
        cfg = ModelConfig(family="encoder", head="mlm", position="learned", norm_first=False,
                          scale_embedding=False, norm_eps=1e-12, **common)
    else:  # Marian / Vaswani layout
        cfg = ModelConfig(family="encoder_decoder", position="sinusoidal", norm_first=False, **common)
    return build_model(cfg)


def theirs(family: str, s: Shape) -> torch.nn.Module:
    import transformers as T

    if family == "decoder":
        cfg = T.GPT2Config(n_layer=s.layers, n_embd=s.d, n_head=s.heads, n_inner=s.d_ff, vocab_size=s.vocab,
                           n_positions=s.seq, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                           activation_function="gelu", bos_token_id=0, eos_token_id=0)
        return T.GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa")
    if family == "encoder":
        cfg = T.BertConfig(num_hidden_layers=s.layers, hidden_size=s.d, num_attention_heads=s.heads,
                           intermediate_size=s.d_ff, vocab_size=s.vocab, max_position_embeddings=s.seq,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)
        return T.BertForMaskedLM._from_config(cfg, attn_implementation="sdpa")
    cfg = T.MarianConfig(encoder_layers=s.layers, decoder_layers=s.layers, d_model=s.d,
                         encoder_attention_heads=s.heads, decoder_attention_heads=s.heads,
                         encoder_ffn_dim=s.d_ff, decoder_ffn_dim=s.d_ff, vocab_size=s.vocab,
                         max_position_embeddings=s.seq, dropout=0.0, attention_dropout=0.0,
                         activation_dropout=0.0, activation_function="gelu", scale_embedding=True,
                         pad_token_id=0, decoder_start_token_id=0, eos_token_id=1, bos_token_id=1,
                         forced_eos_token_id=1)
    return T.MarianMTModel._from_config(cfg, attn_implementation="sdpa")


def forward_fn(family: str, is_ours: bool, model, x: torch.Tensor):
    """Logits (B, T, V) of one batch; x doubles as source and target for the encoder-decoder."""
    if is_ours:
        return model(x, x) if family == "encoder_decoder" else model(x)
    if family == "encoder_decoder":
        return model(input_ids=x, decoder_input_ids=x, use_cache=False).logits
    if family == "decoder":
        return model(input_ids=x, use_cache=False).logits
    return model(input_ids=x).logits


def make_step(family: str, is_ours: bool, model, x, y, device, precision: str = "bf16"):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def step() -> float:
        sync(device)
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=precision == "bf16"):
            logits = forward_fn(family, is_ours, model, x)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - t

    return step


def bench_family(
    family: str, s: Shape, steps: int, warmup: int, device: torch.device, precision: str, peak: float
) -> dict:
    torch.manual_seed(0)
    x = torch.randint(2, s.vocab, (s.batch, s.seq), device=device)
    y = torch.randint(2, s.vocab, (s.batch, s.seq), device=device)
    models = {"ours": ours(family, s).to(device).train(), "hf": theirs(family, s).to(device).train()}
    runs = {k: make_step(family, k == "ours", m, x, y, device, precision) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(warmup + steps):
        for k, run in runs.items():
            dt = run()
            if i >= warmup:
                times[k].append(dt)
    flops = train_flops(family, s)
    out = {"family": family, "flops_per_step": flops, "tokens_per_step": s.batch * s.seq * (2 if family == "encoder_decoder" else 1)}
    for k, m in models.items():
        med = statistics.median(times[k])
        out[k] = {"params": count_parameters(m), "median_s": med, "steps_s": times[k],
                  "tokens_per_s": out["tokens_per_step"] / med, "mfu": flops / med / peak}
    out["speedup"] = out["hf"]["median_s"] / out["ours"]["median_s"]
    return out


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
               "cpu": platform.processor(), "shape": vars(s)}
        with open(args.out, "w") as fh:
            json.dump({"env": env, "precision": precision, "peak_flops": peaks, "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
