"""`trainformer bench`: the performance suite (peak, training step vs HF, real data, decoding, scaling)."""

from __future__ import annotations

from pathlib import Path

import torch

from trainformer.errors import UserError


def add_parser(sub) -> None:
    from trainformer.bench.models import PEER_ATTENTION

    p = sub.add_parser("bench", help="measure speed against Hugging Face peers; writes JSON, Markdown, plots")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in about a minute or two")
    p.add_argument("--out", type=Path, default=Path("bench_out"), help="output folder (default bench_out/)")
    p.add_argument("--only", help="comma-separated sections: peak,train,realdata,decode,scaling,ddp (default all)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 where the hardware has it natively, else fp32")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave the default)")
    p.add_argument("--compile", action="store_true", help="torch.compile the timed training models")
    p.add_argument("--train-models", help="comma-separated training-step models, run in this order: "
                   "decoder,encoder,encoder_decoder,gpt2-small (default: the three families, "
                   "plus gpt2-small on CUDA)")
    p.add_argument("--train-batch", type=int, default=0,
                   help="sequences per training step for every --train-models model (0: each shape's own)")
    p.add_argument("--allocator", choices=("default", "keep-freed"), default="default",
                   help="CPU memory allocator of the whole process, ours and the peers alike: glibc's "
                   "default, or freed memory kept for reuse as trainformer's CPU training runs set it")
    p.add_argument("--peer-attention", choices=PEER_ATTENTION, default="sdpa",
                   help="the HF peers' attn_implementation in the training step: sdpa (HF's default) or "
                   "eager (its matmul-softmax-matmul, as ours runs bf16 attention on the CPU)")
    p.set_defaults(func=run)


def run(args) -> int:
    from trainformer.bench.report import markdown, write_report
    from trainformer.bench.suite import Options, parse_only, parse_train_models, run_suite

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; use --device cpu")
    if args.threads < 0:
        raise UserError(f"--threads: expected a count >= 0, got {args.threads}")
    if args.train_batch < 0:
        raise UserError(f"--train-batch: expected a count >= 1, got {args.train_batch}")
    if args.threads:
        torch.set_num_threads(args.threads)
    opts = Options(quick=args.quick, only=parse_only(args.only), device=args.device,
                   precision=args.precision, compile=args.compile,
                   train_models=parse_train_models(args.train_models), train_batch=args.train_batch or None,
                   allocator=args.allocator, peer_attention=args.peer_attention)
    results = run_suite(opts, on_update=lambda r: write_report(r, args.out))
    paths = write_report(results, args.out)
    print(markdown(results))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    failed = [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
    return 1 if failed else 0
