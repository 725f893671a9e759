"""`trainformer prune MODEL_DIR --out DIR`: magnitude or structured pruning, optional fine-tuning."""

from __future__ import annotations

import json
from pathlib import Path

from trainformer.cli.common import add_model_verb, add_overrides


def add_parser(sub) -> None:
    p = add_model_verb(
        sub, "prune", help="prune a trained model (zeros, or physically smaller layers)",
        description="Prune any model dir. 'magnitude' zeroes the smallest weights of the attention "
        "and feed-forward layers (one global threshold); the model stays dense-shaped, so it is "
        "neither smaller on disk nor faster with dense kernels. 'structured' removes whole "
        "attention head groups and feed-forward neurons that write the least into the residual stream "
        "on 8 training batches of the model's task (--calibrate N; 0 scores by weight norms, without data), "
        "giving a smaller, faster dense model (per-layer sizes in compression.json). "
        "--finetune-steps N then trains the pruned model N steps on its task's data "
        "(--distill ALPHA: with the unpruned model as teacher).",
    )
    p.add_argument("--out", required=True, type=Path, help="the pruned model dir to write (new folder)")
    p.add_argument("--method", choices=["magnitude", "structured"], default="structured")
    p.add_argument("--sparsity", type=float, required=True,
                   help="fraction to remove: of weights (magnitude) or of heads and neurons (structured)")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--heads-only", action="store_true", help="structured: prune attention heads only")
    only.add_argument("--ffn-only", action="store_true", help="structured: prune feed-forward neurons only")
    p.add_argument("--calibrate", type=int, default=None, metavar="N",
                   help="structured: score heads and neurons by their activations on N training batches "
                   "of the model's task (forward passes only; default 8); 0 = by weight norms, no data")
    p.add_argument("--finetune-steps", type=int, default=0, metavar="N",
                   help="fine-tune the pruned model for N steps on its task's data (default: 0, none)")
    p.add_argument("--distill", type=float, default=0.0, metavar="ALPHA",
                   help="fine-tuning: also learn the unpruned model's predictions (knowledge distillation); "
                   "ALPHA in [0, 1] weighs its KL divergence against the labels' cross-entropy (default: 0, off)")
    p.add_argument("--recipe", default=None,
                   help="fine-tuning: recipe for data/optim/train settings (default: the model's config)")
    add_overrides(p)
    p.add_argument("--run-dir", type=Path, default=None,
                   help="fine-tuning: keep the training run here (default: a temporary folder)")
    p.set_defaults(func=run)


def run(args) -> int:
    from trainformer.compression.pipeline import prune_model_dir
    from trainformer.errors import UserError

    if args.method == "magnitude" and (args.heads_only or args.ffn_only):
        raise UserError("--heads-only / --ffn-only: only for --method structured")
    if args.finetune_steps < 0:
        raise UserError(f"--finetune-steps: expected an integer >= 0, got {args.finetune_steps}")
    if args.calibrate is None:
        args.calibrate = 8 if args.method == "structured" else 0
    if args.run_dir and not args.finetune_steps:
        raise UserError("--run-dir: only with --finetune-steps N")
    if (args.recipe or args.overrides) and not (args.finetune_steps or args.calibrate):
        raise UserError("--recipe / --set: only with --finetune-steps N or --calibrate N")
    report = prune_model_dir(
        args.model_dir, args.out, args.method, args.sparsity,
        heads=not args.ffn_only, ffn=not args.heads_only, finetune_steps=args.finetune_steps,
        recipe=args.recipe, overrides=args.overrides, run_dir=args.run_dir, calibrate=args.calibrate,
        distill=args.distill,
    )
    _print_report(report)
    return 0


def _print_report(r: dict) -> None:
    print(f"pruned ({r['method']}, sparsity {r['sparsity']:g}) -> {r['out']}")
    print(f"  parameters: {r['params_before']:,} -> {r['params_after']:,}")
    print(f"  model.safetensors: {r['bytes_before']:,} -> {r['bytes_after']:,} bytes")
    if r["method"] == "magnitude":
        print(f"  zeroed: {r['actual_sparsity']:.1%} of {r['prunable_weights']:,} attention/feed-forward weights")
        print(f"  note: {r['note']}")
    else:
        for kind in ("heads", "neurons"):
            if kind in r:
                print(f"  {kind}: {r[kind]['before']} -> {r[kind]['after']}")
    if r.get("finetune"):
        how = f" (distilled, alpha {r['finetune']['distill']:g})" if r["finetune"].get("distill") else ""
        print(f"  fine-tuned {r['finetune']['steps']} steps{how}: valid {json.dumps(r['finetune']['valid'])}")
