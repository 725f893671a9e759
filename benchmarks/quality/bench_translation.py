"""EN->FR quality per training minute: our recipe against a Hugging Face MarianMTModel peer.

Ours: a finished ``trainformer train translate-en-fr-60min`` run directory
(``--ours RUN_DIR``), or one trained here for ``--minutes``. Its curve is the
valid BLEU the trainer logged during training (beam 4 on ``eval.max_examples``
valid sources spread evenly over the split) against training minutes (``train_s``:
time inside training steps, evaluation and checkpoints excluded); its final
score is the run's test BLEU (multi-reference, the whole test split).

Peer: ``MarianMTModel`` with our recipe's shape (d_model, heads, layers, d_ff,
dropout) and our tokenizer (so the vocabulary is identical), trained the way
a Hugging Face user would: randomly ordered fixed-size batches of
``--peer-batch`` pairs padded to their longest (``DataCollatorForSeq2Seq``),
AdamW with linear warm-up and linear decay ending where the time budget
ends, gradient clipping at 1.0, fp32. The same optimizer implementation
(fused AdamW), the same threads, the same splits. Its curve is measured the
same way (beam 4 via ``generate()``, same valid sources, scored with the same
sacreBLEU code), and it ends with the same full test pass.

Writes OUT/bench_translation.json, OUT/bench_translation.md and
OUT/bleu_vs_minutes.png.

    python benchmarks/quality/bench_translation.py --ours runs/en-fr-60 --peer-minutes 30 --out runs/bench-translation
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

from trainformer.bench.peer import BudgetedLinearSchedule
from trainformer.config import load_recipe
from trainformer.data.batching import collate_pairs, random_batches
from trainformer.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from trainformer.rundir import RunDir, machine_line
from trainformer.tasks import build_task
from trainformer.tasks.translation import TranslationTask, score_translations
from trainformer.training.task import spread_indices

THRESHOLDS = (20.0, 30.0, 40.0)


# ----------------------------------------------------------------------------
# Ours: read from the run directory
# ----------------------------------------------------------------------------


def train_ours(out: Path, minutes: float) -> None:
    cmd = [sys.executable, "-m", "trainformer", "train", "translate-en-fr-60min", "--out", str(out),
           "--set", f"train.max_minutes={minutes}", "--set", "train.progress=false"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def our_curve(run: Path) -> dict:
    """Valid BLEU against training minutes, and the final test scores, from a finished run."""
    rows = RunDir(run).read_metrics()
    evals = [r for r in rows if r.get("event") == "eval" and r.get("split") == "valid" and "averaged" not in r]
    summary = json.loads((run / "summary.json").read_text())
    curve = [{"minutes": r["train_s"] / 60, "step": r["step"], "bleu": r["bleu"]} for r in evals if "train_s" in r]
    return {"curve": curve, "test": summary["test"], "valid": summary["valid"], "steps": summary["steps"],
            "params": summary["params"], "train_minutes": summary["train_time_s"] / 60,
            "wall_minutes": summary["wall_time_s"] / 60, "tokens_per_s": summary["tokens_per_s"],
            "averaged_checkpoints": summary["averaged_checkpoints"]}


# ----------------------------------------------------------------------------
# The peer
# ----------------------------------------------------------------------------


def peer_model(task: TranslationTask):
    """A MarianMTModel with our recipe's shape; decoding starts from our <s> and stops at </s>."""
    from transformers import MarianConfig, MarianMTModel

    m = task.cfg.model
    cfg = MarianConfig(
        vocab_size=task.tokenizer.vocab_size, d_model=m.d_model, encoder_layers=m.n_layers,
        decoder_layers=m.n_decoder_layers or m.n_layers, encoder_attention_heads=m.n_heads,
        decoder_attention_heads=m.n_heads, encoder_ffn_dim=m.d_ff, decoder_ffn_dim=m.d_ff,
        max_position_embeddings=m.max_len, dropout=m.dropout, attention_dropout=0.0, activation_dropout=0.0,
        activation_function="gelu", scale_embedding=True, share_encoder_decoder_embeddings=True,
        tie_word_embeddings=True, pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=BOS_ID,
        decoder_start_token_id=BOS_ID, forced_eos_token_id=EOS_ID,
    )
    return MarianMTModel._from_config(cfg, attn_implementation="sdpa")


@torch.inference_mode()
def peer_translate(model, task: TranslationTask, sources: list[str], beam: int, batch: int = 64) -> list[str]:
    """HF `generate()` with beam search, batches of `batch` length-sorted sources, input order kept."""
    model.eval()
    e = task.cfg.eval
    encoded = [ids[: task.cfg.data.max_len * 4] + [EOS_ID] for ids in task.tokenizer.encode_batch(sources)]
    order = sorted(range(len(sources)), key=lambda i: len(encoded[i]))
    out: list[str] = [""] * len(sources)
    for start in range(0, len(order), batch):
        rows = order[start : start + batch]
        width = max(len(encoded[i]) for i in rows)
        ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, : len(encoded[i])] = torch.tensor(encoded[i])
        gen = model.generate(input_ids=ids, attention_mask=ids != PAD_ID, num_beams=beam,
                             max_new_tokens=int(e.max_len_a * width + e.max_len_b),
                             length_penalty=e.length_penalty, early_stopping=True)
        for r, text in zip(rows, task.tokenizer.decode_batch(gen.tolist())):
            out[r] = text
    model.train()
    return out


def peer_score(model, task: TranslationTask, split: str, limit: int) -> dict:
    data = task.eval_sets[split]
    idx = spread_indices(len(data.sources), limit)  # the sources our trainer's evaluation uses
    hyps = peer_translate(model, task, [data.sources[i] for i in idx], beam=task.cfg.eval.beam)
    return score_translations(hyps, [data.references[i] for i in idx])


def train_peer(task: TranslationTask, minutes: float, batch: int, lr: float, warmup: int,
               eval_minutes: float, seed: int, test_limit: int = 0) -> dict:
    """MarianMTModel from scratch for `minutes` of training steps; valid BLEU every `eval_minutes`."""
    torch.manual_seed(seed)
    model = peer_model(task)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, fused=True)
    sched = BudgetedLinearSchedule(opt, warmup, minutes, probe=30)
    keep = task.cfg.data.max_len - 1  # the same truncation as our batches
    limit = task.cfg.eval.max_examples
    curve, train_s, step, epoch, next_eval = [], 0.0, 0, 0, eval_minutes
    model.train()
    while train_s < 60 * minutes:
        for rows in random_batches(len(task.train_index), batch, seed=seed + epoch):
            fields = task.store.take(task.train_index[rows])
            b = collate_pairs([s[:keep] for s in fields["src"]], [t[:keep] for t in fields["tgt"]],
                              PAD_ID, BOS_ID, EOS_ID)
            start = time.monotonic()
            loss = model(input_ids=b["src"], attention_mask=b["src_mask"], decoder_input_ids=b["tgt_in"],
                         labels=b["tgt_out"]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            train_s += time.monotonic() - start
            sched.step(train_s)
            step += 1
            if step % 100 == 0:
                print(f"peer step {step} loss {loss.item():.4f} {train_s / 60:.1f} min", flush=True)
            if train_s >= 60 * next_eval or train_s >= 60 * minutes:
                bleu = peer_score(model, task, "valid", limit)["bleu"]
                curve.append({"minutes": train_s / 60, "step": step, "bleu": bleu})
                print(f"peer valid @ {train_s / 60:.1f} min, step {step}: BLEU {bleu}", flush=True)
                next_eval += eval_minutes
            if train_s >= 60 * minutes:
                break
        epoch += 1
    test = peer_score(model, task, "test", test_limit)
    return {"curve": curve, "test": {k: test[k] for k in ("bleu", "chrf", "bleu_signature")}, "steps": step,
            "params": sum(p.numel() for p in model.parameters()), "train_minutes": train_s / 60,
            "epochs_started": epoch, "batch": batch, "lr": lr, "warmup": warmup, "decay_steps": sched.total}


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------


def minutes_to(curve: list[dict], bleu: float) -> float | None:
    """Training minutes of the first evaluation at or above `bleu` (None if never reached)."""
    return next((p["minutes"] for p in curve if p["bleu"] >= bleu), None)


def bleu_at(curve: list[dict], minutes: float) -> float | None:
    """The valid BLEU of the last evaluation at or before `minutes` of training."""
    points = [p["bleu"] for p in curve if p["minutes"] <= minutes + 0.1]  # a step may end just past it
    return points[-1] if points else None


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, key in (("trainformer", "ours"), ("HF MarianMTModel", "peer")):
        c = result[key].get("curve", [])
        if c:
            ax.plot([p["minutes"] for p in c], [p["bleu"] for p in c], marker="o", label=name)
    ax.set_xlabel("training minutes (2 CPU cores)")
    ax.set_ylabel(f"valid BLEU (beam {result['beam']}, {result['valid_sources']} sources)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fmt(x, spec=".1f") -> str:
    return "-" if x is None else format(x, spec)


def markdown(result: dict) -> str:
    ours, peer = result["ours"], result["peer"]
    t = result["peer_minutes"]
    lines = [
        f"| system | train min | steps | params | valid BLEU @ {t:g} min | test BLEU | test chrF | "
        + " | ".join(f"min to {b:g}" for b in THRESHOLDS) + " |",
        "|" + "---|" * (7 + len(THRESHOLDS)),
    ]
    for name, r in (("trainformer translate-en-fr-60min", ours), ("HF MarianMTModel, HF recipe", peer)):
        if not r.get("curve"):
            continue
        lines.append(
            f"| {name} | {r['train_minutes']:.1f} | {r['steps']} | {r['params'] / 1e6:.2f}M | "
            f"{fmt(bleu_at(r['curve'], t))} | {r['test']['bleu']} | {r['test']['chrf']} | "
            + " | ".join(fmt(minutes_to(r["curve"], b)) for b in THRESHOLDS) + " |")
    lines += [
        "",
        f"Tatoeba EN->FR, the project's grouped splits; test = {result['test_sources']} sources scored against all "
        f"their references. Curves: valid BLEU (beam {result['beam']}, {result['valid_sources']} valid sources, "
        f"{result.get('valid_subset', 'spread evenly over the split')}) "
        "against minutes inside training steps. \"min to B\": the first evaluation at or above BLEU B "
        "(valid curve; its granularity is the evaluation interval).",
        f"Host: {result['host']}. sacreBLEU signature: {result['bleu_signature']}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ours", type=Path, help="a finished translate-en-fr-60min run directory")
    p.add_argument("--minutes", type=float, default=60.0, help="train ours for this long when --ours is absent")
    p.add_argument("--peer-minutes", type=float, default=None, help="default: ours' training minutes")
    p.add_argument("--peer-batch", type=int, default=64)
    p.add_argument("--peer-lr", type=float, default=5e-4)
    p.add_argument("--peer-warmup", type=int, default=500)
    p.add_argument("--eval-minutes", type=float, default=5.0, help="the peer's evaluation interval")
    p.add_argument("--test-limit", type=int, default=0, help="score the peer on the first N test sources (smoke runs)")
    p.add_argument("--skip-peer", action="store_true")
    p.add_argument("--out", type=Path, default=Path("runs/bench-translation"))
    p.add_argument("--report", type=Path, default=None,
                   help="re-write the Markdown and plot from an existing bench_translation.json, and exit")
    args = p.parse_args()
    if args.report is not None:
        if not args.report.is_file():
            p.error(f"--report {args.report}: no such file")
        result = json.loads(args.report.read_text())
        write_report(result, args.report.parent)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    run = args.ours
    if run is not None and not (run / "summary.json").is_file():
        p.error(f"--ours {run}: not a finished run directory (no summary.json in it)")
    if run is None:
        run = args.out / "ours"
        train_ours(run, args.minutes)
    ours = our_curve(run)
    cfg = load_recipe(run / "config.yaml")
    cfg.train.progress = False
    task = build_task(cfg)
    task.setup(None)
    minutes = args.peer_minutes or ours["train_minutes"]
    peer = {} if args.skip_peer else train_peer(task, minutes, args.peer_batch, args.peer_lr,
                                                args.peer_warmup, args.eval_minutes, seed=cfg.train.seed,
                                                test_limit=args.test_limit)
    result = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "host": f"{machine_line()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "beam": cfg.eval.beam, "valid_sources": min(cfg.eval.max_examples or math.inf,
                                                    len(task.eval_sets["valid"].sources)),
        "test_sources": len(task.eval_sets["test"].sources), "peer_minutes": minutes,
        "ours": ours, "peer": peer,
        "bleu_signature": score_translations(["a", "b"], [["a", "c"], ["b"]])["bleu_signature"],  # nrefs:var
    }
    (args.out / "bench_translation.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    write_report(result, args.out)


def write_report(result: dict, out: Path) -> None:
    (out / "bench_translation.md").write_text(markdown(result))
    plot(result, out / "bleu_vs_minutes.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
