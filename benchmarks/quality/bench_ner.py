"""CoNLL-2003 NER under a wall-clock budget: our pipeline against a Hugging Face peer.

Ours: ``trainformer train encoder-mlm`` (MLM pretraining on train text only)
for ``--mlm-minutes``, then ``trainformer train ner-conll2003`` from it for
``--ner-minutes``; test F1 comes from the run's summary.json (constrained
Viterbi decoding, seqeval).

Peer: ``BertForTokenClassification`` of the same size (our NER model's
d_model, heads, layers and d_ff, read from its config) and precision (bf16
autocast when our run used bf16), randomly initialised — no pretraining, so
it gets the whole pipeline's minutes (``--peer-minutes``, default mlm + ner) — trained
with the usual Hugging Face recipe: AdamW, linear schedule with warmup,
fixed-size padded batches (``--peer-batch`` sentences x ``--peer-len``
tokens), first-subword labels, the same WordPiece tokenizer (ours, from the
MLM run), argmax decoding, seqeval on the test split.

With ``--scratch`` both sides start from random weights and train for
``--ner-minutes`` each: ours is the ``ner-conll2003`` recipe as it stands (random
weights, its own cased 16k WordPiece, which the peer then uses too). This isolates the
fine-tuning recipe and decoding from the pretraining.

Writes OUT/bench_ner.json and OUT/bench_ner.md.

    python benchmarks/quality/bench_ner.py --mlm-minutes 35 --ner-minutes 22 --out runs/bench-ner
    python benchmarks/quality/bench_ner.py --mlm-minutes 5 --ner-minutes 5 --out /tmp/bench-ner
    # finished runs instead of new ones (their own minutes are read from summary.json):
    python benchmarks/quality/bench_ner.py --ours-mlm runs/encoder-mlm --ours-ner runs/ner-conll2003 --peer-minutes 22
    python benchmarks/quality/bench_ner.py --scratch --ner-minutes 8 --out runs/bench-ner-scratch
    # a finished run of today's recipe (from random weights) instead of a new one:
    python benchmarks/quality/bench_ner.py --scratch --ours-ner runs/ner-conll2003 --out runs/bench-ner-scratch

The peer runs twice by default (``--peer-variants``): as Hugging Face
configures BERT (attention-probability dropout 0.1, which sends CPU attention
to a slower kernel) and with our dropout (none on attention probabilities).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from trainformer.bench.peer import BudgetedLinearSchedule
from trainformer.config import DataConfig, load_recipe
from trainformer.data.batching import IGNORE_INDEX, first_subword_labels
from trainformer.data.registry import read_dataset
from trainformer.data.tokenizer import CLS_ID, PAD_ID, SEP_ID, TextTokenizer
from trainformer.errors import run_script
from trainformer.inference.bio import OUTSIDE, bio_labels, tag_type, to_bio
from trainformer.rundir import machine_line
from trainformer.tasks.tagging import score_entities
from trainformer.training.precision import build_precision


def run_file(run_dir: Path, name: str) -> str:
    """The text of a finished run's file `name` (e.g. summary.json), or a one-line exit
    naming what is missing."""
    path = run_dir / name
    if not path.is_file():
        sys.exit(f"bench_ner: {path}: not found; expected a finished run directory")
    return path.read_text()


def read_summary(run_dir: Path) -> dict:
    """A finished run's summary.json (see `run_file`)."""
    return json.loads(run_file(run_dir, "summary.json"))


def train_ours(out: Path, recipe: str, minutes: float, overrides: list[str]) -> dict:
    """One `trainformer train` run; returns its summary.json."""
    cmd = [sys.executable, "-m", "trainformer", "train", recipe, "--out", str(out),
           "--set", f"train.max_minutes={minutes}", "--set", "train.progress=false", *sum((["--set", o] for o in overrides), [])]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return json.loads((out / "summary.json").read_text())


# ----------------------------------------------------------------------------
# The peer
# ----------------------------------------------------------------------------


def encode(tok: TextTokenizer, sentences, label_id: dict[str, int], length: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Fixed-length rows ``<cls> subwords <sep> <pad>...`` (B, length) and first-subword labels."""
    ids = np.full((len(sentences), length), PAD_ID, dtype=np.int64)
    labels = np.full((len(sentences), length), IGNORE_INDEX, dtype=np.int64)
    cut = 0
    for row, (sub, words) in enumerate(tok.encode_words_batch([s.tokens for s in sentences])):
        tags = [label_id.get(t, 0) for t in to_bio(sentences[row].tags)]
        lab = first_subword_labels(words, tags) if sub else np.zeros(0, dtype=np.int64)
        if len(sub) > length - 2:
            sub, lab, cut = sub[: length - 2], lab[: length - 2], cut + 1
        ids[row, : len(sub) + 2] = [CLS_ID, *sub, SEP_ID]
        labels[row, 1 : len(sub) + 1] = lab
    return ids, labels, cut


# The peer as Hugging Face configures it, and with our dropout: BERT's attention-probability
# dropout (0.1) sends CPU attention to a much slower kernel, and our encoder has none; elsewhere
# BERT drops 0.1, ours `model.dropout`.
PEER_NAMES = {"default": "HF defaults", "matched": "our dropout"}
PEER_VARIANTS = tuple(PEER_NAMES)
SHAPE_KEYS = ("d_model", "n_heads", "n_layers", "d_ff", "dropout")


def hf_model(vocab: int, n_labels: int, length: int, shape: dict, variant: str = "default"):
    """BertForTokenClassification of our encoder's `shape` (`SHAPE_KEYS` of its model config)."""
    from transformers import BertConfig, BertForTokenClassification

    dropout = {} if variant == "default" else {"attention_probs_dropout_prob": 0.0, "hidden_dropout_prob": shape["dropout"]}
    cfg = BertConfig(vocab_size=vocab, hidden_size=shape["d_model"], num_hidden_layers=shape["n_layers"],
                     num_attention_heads=shape["n_heads"], intermediate_size=shape["d_ff"],
                     max_position_embeddings=max(length, 256), num_labels=n_labels, pad_token_id=PAD_ID, **dropout)
    return BertForTokenClassification(cfg)


def train_peer(tok_path: Path, minutes: float, batch: int, length: int, lr: float, warmup: int, seed: int,
               shape: dict, variant: str = "default", precision: str = "fp32") -> dict:
    """HF BertForTokenClassification of `shape` (`hf_model`) from scratch for `minutes`, then seqeval on test.

    `precision` is our run's (its summary.json): "bf16" runs the peer's forward passes under
    bf16 autocast as ours did, fp32 weights and optimizer both."""
    torch.manual_seed(seed)
    data = read_dataset(DataConfig(dataset="conll2003"))
    tok = TextTokenizer.load(tok_path)
    train = data["train"].examples
    labels = bio_labels([tag_type(t) for s in train for t in to_bio(s.tags) if t != OUTSIDE])
    label_id = {t: i for i, t in enumerate(labels)}
    ids, lab, cut = encode(tok, train, label_id, length)
    model = hf_model(tok.vocab_size, len(labels), length, shape, variant)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, fused=True)
    sched = BudgetedLinearSchedule(opt, warmup, minutes)
    rng = np.random.default_rng(seed)
    start, step, epoch = time.monotonic(), 0, 0
    model.train()
    while time.monotonic() - start < 60 * minutes:
        for b in np.array_split(rng.permutation(len(ids)), math.ceil(len(ids) / batch)):
            x, y = torch.from_numpy(ids[b]), torch.from_numpy(lab[b])
            with autocast(precision):
                loss = model(input_ids=x, attention_mask=x != PAD_ID, labels=y).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step(time.monotonic() - start)
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % 100 == 0:
                print(f"peer step {step} loss {loss.item():.4f}", flush=True)
            if time.monotonic() - start >= 60 * minutes:
                break
        epoch += 1
    train_s = time.monotonic() - start
    with autocast(precision):
        scores = evaluate_peer(model, tok, data["test"].examples, labels, label_id, length)
    params = sum(p.numel() for p in model.parameters())
    return {"test": scores, "steps": step, "epochs_started": epoch, "train_time_s": train_s, "variant": variant,
            "params": params, "train_truncated": cut, "batch": batch, "length": length, "lr": lr,
            "precision": precision}


def autocast(precision: str):
    """The CPU autocast context of our run's `precision` (nothing in fp32), as our trainer uses."""
    return build_precision(precision, torch.device("cpu")).autocast()


@torch.inference_mode()
def evaluate_peer(model, tok, sentences, labels, label_id, length) -> dict:
    model.eval()
    ids, lab, _ = encode(tok, sentences, label_id, length)
    pred_tags = []
    for i in range(0, len(ids), 128):
        x = torch.from_numpy(ids[i : i + 128])
        logits = model(input_ids=x, attention_mask=x != PAD_ID).logits  # (B, S, L)
        best = logits.argmax(-1).numpy()
        for row, y in zip(best, lab[i : i + 128]):
            pred_tags.append([labels[k] for k in row[y != IGNORE_INDEX]])
    gold = [to_bio(s.tags) for s in sentences]
    pred = [p + [OUTSIDE] * (len(g) - len(p)) for p, g in zip(pred_tags, gold)]  # truncated words: O
    return score_entities(gold, pred)


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------


def markdown(result: dict) -> str:
    ours, peers = result["ours"], result["peers"]
    types = sorted(k for k in ours["test"] if k.startswith("f1_"))
    head = "| system | minutes | steps | params | test F1 | P | R | " + " | ".join(types) + " |"
    rows = [head, "|" + "---|" * (7 + len(types))]
    scratch = result["args"].get("scratch")
    ours_name = "trainformer NER (scratch)" if scratch else "trainformer MLM -> NER"
    ours_minutes = result["args"]["ner_minutes"] + (0 if scratch else result["args"]["mlm_minutes"])
    systems = [(ours_name, ours, ours_minutes)] + [
        (f"HF BertForTokenClassification (scratch, {PEER_NAMES[p['variant']]})", p, result["args"]["peer_minutes"])
        for p in peers]
    for name, r, minutes in systems:
        t = r["test"]
        rows.append(f"| {name} | {minutes:g} | {r['steps']} | {r['params'] / 1e6:.2f}M | {t['f1']} | {t['precision']} | "
                    f"{t['recall']} | " + " | ".join(str(t.get(k, '-')) for k in types) + " |")
    notes = [
        "", f"CoNLL-2003 test (eng.testb), entity-level seqeval F1 (%). Host: {result['host']}.",
        (f"Ours: random init, NER {result['args']['ner_minutes']} min" if scratch else
         f"Ours: MLM {result['args']['mlm_minutes']} min ({ours['mlm_steps']} steps, valid ppl {ours['mlm_ppl']}), "
         f"then NER {result['args']['ner_minutes']} min")
        + (f" (valid F1 {ours['valid'].get('f1')}, {ours['valid'].get('f1_without_prior', '-')} without the learned "
           "transitions); a linear-chain CRF over BIO tags, constrained Viterbi decoding."
           if ours["model"].get("crf") else
           f" (valid F1 {ours['valid'].get('f1')}, {ours['valid'].get('f1_without_prior', '-')} without the tag-bigram "
           f"prior); constrained Viterbi decoding with the prior (weight {ours['test'].get('transition_weight', '-')}, "
           "chosen on valid)."),
        f"Our encoder: {ours['model'].get('position')} positions"
        + (f", a character CNN of {ours['model']['char_cnn']} filters over each word" if ours["model"].get("char_cnn") else "")
        + "; the peer: BERT's learned positions, subwords only.",
        "Peer: same size, random init, AdamW + linear schedule, fixed-size padded batches, argmax decoding; "
        "as configured by Hugging Face (dropout 0.1, on attention probabilities too) and with our dropout "
        f"(none on attention probabilities, {ours['model'].get('dropout')} elsewhere). Both sides in "
        f"{ours['precision']} (bf16: autocast, fp32 weights).",
    ]
    return "\n".join(rows + notes) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mlm-minutes", type=float, default=35.0)
    p.add_argument("--ner-minutes", type=float, default=22.0)
    p.add_argument("--peer-minutes", type=float, default=None, help="default: mlm + ner minutes")
    p.add_argument("--peer-batch", type=int, default=32)
    p.add_argument("--peer-len", type=int, default=128)
    p.add_argument("--peer-lr", type=float, default=5e-4)
    p.add_argument("--peer-warmup", type=int, default=200)
    p.add_argument("--set-mlm", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--set-ner", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--skip-peer", action="store_true")
    p.add_argument("--peer-variants", default="default,matched",
                   help=f"comma-separated, of {', '.join(PEER_VARIANTS)}: the peer as HF configures it, with our dropout")
    p.add_argument("--scratch", action="store_true",
                   help="no pretraining: our NER and the peer both from random weights for --ner-minutes")
    p.add_argument("--out", type=Path, default=Path("runs/bench-ner"))
    p.add_argument("--ours-mlm", type=Path, help="a finished encoder-mlm run dir (with --ours-ner: train nothing of ours)")
    p.add_argument("--ours-ner", type=Path, help="a finished ner-conll2003 run dir started from --ours-mlm "
                   "(with --scratch: one from random weights; the peer trains for its train.max_minutes)")
    args = p.parse_args()
    variants = [v for v in args.peer_variants.split(",") if v]
    if unknown := set(variants) - set(PEER_VARIANTS):
        p.error(f"--peer-variants: unknown {', '.join(sorted(unknown))}; expected some of {', '.join(PEER_VARIANTS)}")
    if args.scratch and args.ours_mlm:
        p.error("--scratch trains both sides from random weights; it takes no --ours-mlm")
    if bool(args.ours_mlm) != bool(args.ours_ner) and not args.scratch:
        p.error("--ours-mlm and --ours-ner go together")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.scratch and args.ours_ner:
        ner_dir = tokenizer_dir = args.ours_ner
        ner = read_summary(ner_dir)
        args.ner_minutes = float(yaml.safe_load(run_file(ner_dir, "config.yaml"))["train"]["max_minutes"])
        mlm = {"steps": 0, "valid": {}, "train_time_s": 0.0}
        args.mlm_minutes = 0.0
    elif args.scratch:
        ner_dir = args.out / "ours-ner"
        ner = train_ours(ner_dir, "ner-conll2003", args.ner_minutes, args.set_ner)  # the recipe starts from random weights
        mlm = {"steps": 0, "valid": {}, "train_time_s": 0.0}
        args.mlm_minutes = 0.0
        tokenizer_dir = ner_dir  # the peer uses the tokenizer our run trained
    elif args.ours_mlm and args.ours_ner:
        tokenizer_dir, ner_dir = args.ours_mlm, args.ours_ner
        mlm, ner = (read_summary(d) for d in (args.ours_mlm, args.ours_ner))
        args.mlm_minutes = round(mlm["wall_time_s"] / 60, 1)
        args.ner_minutes = round(ner["wall_time_s"] / 60, 1)
    else:
        tokenizer_dir, ner_dir = args.out / "ours-mlm", args.out / "ours-ner"
        mlm = train_ours(tokenizer_dir, "encoder-mlm", args.mlm_minutes, args.set_mlm)
        ner = train_ours(ner_dir, "ner-conll2003", args.ner_minutes, [f"init_from={tokenizer_dir}", *args.set_ner])
    args.peer_minutes = args.peer_minutes or args.mlm_minutes + args.ner_minutes  # --scratch: ner minutes
    ner_model = json.loads(run_file(ner_dir, "model/config.json"))["model"]
    precision = ner.get("precision", "fp32")  # the peer trains in our run's precision
    ours = {"test": ner["test"], "valid": ner["valid"], "steps": ner["steps"], "params": ner["params"],
            "precision": precision,
            "mlm_steps": mlm["steps"], "mlm_ppl": mlm["valid"].get("ppl"), "mlm_accuracy": mlm["valid"].get("accuracy"),
            "ner_train_time_s": ner["train_time_s"], "mlm_train_time_s": mlm["train_time_s"],
            "model": {k: ner_model.get(k) for k in ("position", "crf", "char_cnn", *SHAPE_KEYS)}}
    peers = [] if args.skip_peer else [
        train_peer(tokenizer_dir / "model" / "tokenizer.json", args.peer_minutes, args.peer_batch,
                   args.peer_len, args.peer_lr, args.peer_warmup, seed=0,
                   shape={k: ner_model[k] for k in SHAPE_KEYS}, variant=v, precision=precision)
        for v in variants]
    host = f"{machine_line()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    result = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "host": host,
              "recipes": {"mlm": load_recipe("encoder-mlm").description, "ner": load_recipe("ner-conll2003").description},
              "ours": ours, "peers": peers}
    (args.out / "bench_ner.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    (args.out / "bench_ner.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    run_script(main, "bench_ner")  # a bad run dir or recipe key: one line, not a traceback
