"""One DDP training run of our decoder on CPU (gloo), launched by torchrun from `scaling.ddp_scaling`.

Rank 0 writes {"world_size", "threads", "median_s", "min_s", "max_s", "tokens_per_s"} to --out;
tokens/s counts the tokens of all ranks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from trainformer.bench.models import Shape, _batch, make_step, ours
from trainformer.bench.timing import summarize


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--shape", required=True, help="JSON of a models.Shape")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    s = Shape(**json.loads(args.shape))
    torch.manual_seed(0)  # same initial weights on every rank, as DDP expects
    model = DistributedDataParallel(ours("decoder", s).train())
    x, y = _batch(s, torch.device("cpu"))
    step = make_step("decoder", True, model, x, y, torch.device("cpu"), "fp32")
    times = [step() for _ in range(args.warmup + args.steps)][args.warmup :]
    # the slowest rank sets the pace: take each step's max over ranks
    t = torch.tensor(times)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if rank == 0:
        stats = summarize(t.tolist())
        result = {"world_size": world, "threads": torch.get_num_threads(), **stats,
                  "tokens_per_s": world * s.batch * s.seq / stats["median_s"]}
        args.out.write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
