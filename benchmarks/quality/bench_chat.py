"""Chatbot quality for a fixed training time: our trainer against a plain Hugging Face GPT-2 loop.

Both models have the chat recipe's shape (decoder, learned positions, tied
embeddings, pre-norm), start from scratch, and train for the same wall-clock
minutes on the same DailyDialog SFT examples with the same byte-level BPE
(``chat-dailydialog`` without ``init_from``):

    ours    `Trainer` + `ChatTask`: token-budget batches of similar lengths,
            fused AdamW, the recipe's schedule and precision.
    peer    `GPT2LMHeadModel` (SDPA attention) with the usual HF recipe:
            AdamW, linear warm-up then linear decay (over the steps the time
            budget allows, estimated from the first steps), fixed-size
            batches of randomly ordered examples padded to their longest,
            an attention mask, gradient clipping at 1.0, the same precision.

Then, with the same code for both: perplexity of the assistant turns of the
deduplicated DailyDialog test split, distinct-1/2 of replies sampled (fixed
seed) to the ten `CHAT_PROMPTS`, and the replies themselves. Results go to
OUT/bench_chat.json and OUT/bench_chat.md.

    python benchmarks/quality/bench_chat.py --minutes 20 --out benchmarks/results/chat
    python benchmarks/quality/bench_chat.py --minutes 3 --max-test-examples 300   # a short smoke version
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainformer.bench.peer import BudgetedLinearSchedule
from trainformer.config import Config, load_recipe
from trainformer.data.chat_template import Message
from trainformer.data.tokenizer import PAD_ID
from trainformer.models import count_parameters
from trainformer.rundir import RunDir, machine_line
from trainformer.tasks.chat import (
    CHAT_PROMPTS,
    EVAL_SAMPLING,
    ChatTask,
    assistant_perplexity,
    reply_diversity,
)
from trainformer.tasks.lm import causal_loss, collate_causal
from trainformer.training.loss import cross_entropy_sum
from trainformer.training.precision import build_precision
from trainformer.training.trainer import Trainer


class BenchChatTask(ChatTask):
    """The chat task without the trainer's own test pass: the bench scores both models itself."""

    def has_split(self, split: str) -> bool:
        return split != "test" and super().has_split(split)


# ----------------------------------------------------------------------------
# Ours
# ----------------------------------------------------------------------------


def train_ours(cfg: Config, out: Path) -> tuple[BenchChatTask, torch.nn.Module, dict[str, Any]]:
    task = BenchChatTask(cfg)
    trainer = Trainer(cfg, task, RunDir(out / "ours"))
    summary = trainer.fit()
    return task, trainer.module, summary


# ----------------------------------------------------------------------------
# The Hugging Face peer
# ----------------------------------------------------------------------------


def gpt2_peer(cfg: Config) -> torch.nn.Module:
    import transformers as T

    m = cfg.model
    hf = T.GPT2Config(
        vocab_size=m.vocab_size, n_positions=m.max_len, n_embd=m.d_model, n_layer=m.n_layers, n_head=m.n_heads,
        n_inner=m.d_ff, activation_function="gelu", resid_pdrop=m.dropout, embd_pdrop=m.dropout,
        attn_pdrop=m.dropout, layer_norm_epsilon=m.norm_eps, initializer_range=m.init_std,
        bos_token_id=PAD_ID, eos_token_id=PAD_ID, pad_token_id=PAD_ID, tie_word_embeddings=m.tie_embeddings,
    )
    return T.GPT2LMHeadModel._from_config(hf, attn_implementation="sdpa")


def hf_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW with no weight decay on biases and norms, as HF's Trainer sets it up."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    o = cfg.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps)


def fixed_size_batches(n: int, batch_size: int, rng: np.random.Generator):
    """Endless random batches of `batch_size` example indices, reshuffled each epoch."""
    while True:
        perm = rng.permutation(n)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i : i + batch_size]


def train_peer(task: ChatTask, cfg: Config, minutes: float) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The HF recipe for `minutes` of wall clock on the task's training examples."""
    from trainformer.training.device import resolve_device

    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    model = gpt2_peer(cfg).to(device).train()
    ids, loss_mask = task.examples["train"]
    batch_size = max(1, int(cfg.data.max_tokens // float(ids.lengths().mean())))  # same tokens per step on average
    precision = build_precision(cfg.train.precision, device)
    opt = hf_optimizer(model, cfg)
    sched = BudgetedLinearSchedule(opt, cfg.optim.warmup_steps, minutes, probe=5)
    batches = fixed_size_batches(len(ids), batch_size, np.random.default_rng(cfg.train.seed))
    start, steps, tokens, padded = time.monotonic(), 0, 0, 0
    while time.monotonic() - start < minutes * 60:
        idx = next(batches)
        batch = {k: v.to(device) for k, v in collate_causal(ids.take(idx), loss_mask.take(idx)).items()}
        with precision.autocast():
            logits = model(input_ids=batch["ids"], attention_mask=batch["mask"].long()).logits
            loss_sum, n = cross_entropy_sum(logits, batch["labels"])
        (loss_sum / n.clamp_min(1)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step(time.monotonic() - start)
        opt.zero_grad(set_to_none=True)
        steps += 1
        tokens += int(batch["mask"].sum())
        padded += batch["mask"].numel()
    elapsed = time.monotonic() - start
    return model.eval(), {"steps": steps, "tokens": tokens, "train_s": elapsed, "tokens_per_s": tokens / elapsed,
                          "batch_size": batch_size, "padding": 1 - tokens / max(padded, 1)}


class HFLogits(torch.nn.Module):
    """Our scoring code calls ``model(ids, doc_ids=None)``; give it GPT-2's logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, doc_ids=None):
        return self.model(input_ids=ids).logits


@torch.inference_mode()
def hf_replies(model, task: ChatTask, cfg: Config) -> list[str]:
    """Replies of the peer to `CHAT_PROMPTS`, sampled with the settings our evaluation uses."""
    template = task.template
    prompts = [template.render([Message("user", p)], add_generation_prompt=True).ids for p in CHAT_PROMPTS]
    device = next(model.parameters()).device
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as HF generation expects
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    s = EVAL_SAMPLING
    torch.manual_seed(cfg.train.seed)
    out = model.generate(
        input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True, temperature=s.temperature,
        top_p=s.top_p, top_k=0, repetition_penalty=s.repetition_penalty,
        max_new_tokens=min(s.max_new_tokens, cfg.model.max_len - width),  # as our generate caps it
        eos_token_id=template.end_id, pad_token_id=PAD_ID,
    )
    return [template.tokenizer.decode(row[width:].tolist()).strip() for row in out]


# ----------------------------------------------------------------------------
# Scoring and reporting
# ----------------------------------------------------------------------------


def score(model: torch.nn.Module, task: ChatTask, cfg: Config, limit: int) -> dict[str, Any]:
    ids, loss = task.examples["test"]
    device = next(model.parameters()).device
    precision = build_precision(cfg.train.precision, device)
    with torch.inference_mode(), precision.autocast():
        return assistant_perplexity(lambda b: causal_loss(model, b), ids, loss, cfg.eval.batch_tokens, device, limit)


def markdown(result: dict[str, Any]) -> str:
    rows = [
        "| | ours (Trainer + ChatTask) | HF GPT2LMHeadModel loop |",
        "|---|---|---|",
    ]
    o, p = result["ours"], result["peer"]
    for key, fmt in (("test_ppl", "{:.2f}"), ("distinct_1", "{:.3f}"), ("distinct_2", "{:.3f}"),
                     ("steps", "{}"), ("train_tokens", "{}"), ("tokens_per_s", "{:.0f}"), ("params", "{}")):
        rows.append(f"| {key} | {fmt.format(o[key])} | {fmt.format(p[key])} |")
    lines = [f"# Chatbot benchmark ({result['minutes']} min of training each)", "", *rows, "",
             f"Test: {result['test_examples']} examples of the deduplicated DailyDialog test split "
             f"({result['test_dedup_removed']} test dialogues that occur in train removed).", "",
             f"Machine: {result.get('machine', 'not recorded')}; {result['threads']} threads.", "",
             "## Replies (same prompts, same sampling seed)", ""]
    for prompt, a, b in zip(CHAT_PROMPTS, o["replies"], p["replies"]):
        lines += [f"- **{prompt}**", f"  - ours: {a}", f"  - peer: {b}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=20.0, help="training minutes for each model")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/chat"))
    ap.add_argument("--max-test-examples", type=int, default=0, help="score only the first N test examples (0 = all)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override the chat-dailydialog recipe (both models)")
    args = ap.parse_args()
    overrides = ["init_from=null", f"train.max_minutes={args.minutes}", "train.eval_every=0",
                 "train.ckpt_every_minutes=0", "train.progress=false", *args.overrides]
    cfg = load_recipe("chat-dailydialog", overrides)
    args.out.mkdir(parents=True, exist_ok=True)
    if (args.out / "ours" / "config.yaml").exists():
        raise SystemExit(f"{args.out}/ours already holds a run; choose another --out")
    task, ours, summary = train_ours(cfg, args.out)
    peer, peer_stats = train_peer(task, cfg, args.minutes)
    limit = args.max_test_examples
    result: dict[str, Any] = {
        "minutes": args.minutes, "device": str(next(ours.parameters()).device),
        "precision": build_precision(cfg.train.precision, next(ours.parameters()).device).name,
        "test_examples": min(limit, len(task.examples["test"][0])) if limit else len(task.examples["test"][0]),
        "test_dedup_removed": task.report["overlap_with_train_removed"]["test"],
        "platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": machine_line(),
    }
    ours_replies = task.replies(ours)
    peer_replies = hf_replies(peer, task, cfg)
    result["ours"] = {**_metrics(score(ours, task, cfg, limit), ours_replies), "steps": summary["steps"],
                      "train_tokens": summary["tokens"], "tokens_per_s": summary["tokens_per_s"],
                      "params": count_parameters(ours)}
    result["peer"] = {**_metrics(score(HFLogits(peer), task, cfg, limit), peer_replies), "steps": peer_stats["steps"],
                      "train_tokens": peer_stats["tokens"], "tokens_per_s": peer_stats["tokens_per_s"],
                      "params": sum(p.numel() for p in peer.parameters()), "batch_size": peer_stats["batch_size"],
                      "padding": peer_stats["padding"]}
    (args.out / "bench_chat.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "bench_chat.md").write_text(markdown(result))
    print(markdown(result))


def _metrics(scores: dict[str, float], replies: list[str]) -> dict[str, Any]:
    return {"test_ppl": scores["ppl"], "test_loss": scores["loss"], "test_tokens": scores["tokens"],
            **reply_diversity(replies), "replies": replies,
            "ppl_is_finite": math.isfinite(scores["ppl"])}


if __name__ == "__main__":
    main()
