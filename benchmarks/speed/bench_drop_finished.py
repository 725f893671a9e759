"""Batched translation with and without dropping finished sentences from the batch.

Greedy and beam search stop stepping a sentence once it has ended
(``drop_finished=True``, the default). HF ``generate()`` and our earlier code
keep stepping every row until the longest sentence of the batch is done. This
times both on real test sentences of a trained model, interleaved in one
process (one warm-up pass, medians of the rest), and checks that the
translations are identical.

With ``--chat MODEL_DIR`` it also times a chat model (a `Decoder`) replying
greedily, in one batch, to the first user turn of test dialogues: the
`generate` loop drops a reply once it has produced the end-of-turn token.

    python benchmarks/speed/bench_drop_finished.py runs/en-fr-60/model [--sentences 256] [--repeats 3]
        [--chat runs/chat/model] [--prompts 64] [--threads 2] [--out benchmarks/results/drop_finished]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trainformer.bench.report import write_table_report
from trainformer.bench.testset import translation_test_set
from trainformer.cli.common import require_positive
from trainformer.errors import run_script
from trainformer.inference.loading import load_translator
from trainformer.modeldir import resolve_model_dir
from trainformer.rundir import hardware, machine_line, package_versions
from trainformer.training.task import spread_indices


def timed_pair(run: Callable[[bool], Any], items: int, repeats: int) -> dict[str, Any]:
    """`run(drop_finished)` for both flags, interleaved; pass 0 warms up. Items/s medians, same output?"""
    times: dict[bool, list[float]] = {True: [], False: []}
    outputs: dict[bool, Any] = {}
    for r in range(repeats + 1):
        for flag in (True, False):
            start = time.perf_counter()
            outputs[flag] = run(flag)
            if r:
                times[flag].append(time.perf_counter() - start)
    rate = {flag: items / statistics.median(t) for flag, t in times.items()}
    return {"drop_per_s": round(rate[True], 1), "keep_per_s": round(rate[False], 1),
            "speedup": round(rate[True] / rate[False], 2), "identical": outputs[True] == outputs[False]}


def translate_with(tr, sentences: list[str], beam: int, flag: bool) -> list:
    tr.drop_finished = flag
    try:
        return tr.translate(sentences, beam=beam)
    finally:
        tr.drop_finished = True


def chat_replies(model_dir: Path, n: int) -> tuple[Callable[[bool], Any], int]:
    """A greedy batched-reply run for `timed_pair`, on the first user turn of `n` test dialogues."""
    from trainformer.generation import generate
    from trainformer.inference.chatbot import Chatbot
    from trainformer.inference.loading import load_for_task
    from trainformer.inference.sampling import SamplingSettings, TorchGenerator
    from trainformer.tasks.chat import read_dialogue_splits

    loaded, tokenizer = load_for_task(model_dir, "chat", "cpu")
    settings = SamplingSettings(temperature=0.0)
    bot = Chatbot(TorchGenerator(loaded.model, settings.seed, "fp32"), tokenizer, loaded.cfg.model.max_len, settings)
    dialogues = read_dialogue_splits(loaded.cfg.data)[0]["test"]
    prompts = [bot.prompt(d[0])[0] for d in dialogues[:: max(1, len(dialogues) // n)][:n]]
    limit = bot.settings.max_new_tokens
    return (lambda flag: generate(loaded.model, prompts, limit, bot.template.end_id, temperature=0.0,
                                  drop_finished=flag)), len(prompts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--sentences", type=int, default=256)
    ap.add_argument("--chat", type=Path, default=None, help="also time batched greedy replies of this chat model")
    ap.add_argument("--prompts", type=int, default=64, help="--chat: test dialogues replied to in one batch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/drop_finished"))
    args = ap.parse_args()
    require_positive(ap, args, "sentences", "prompts", "repeats", "threads")
    torch.set_num_threads(args.threads)
    model_dir = resolve_model_dir(args.model_dir)
    tr = load_translator(model_dir, "cpu", "fp32")
    chat = chat_replies(resolve_model_dir(args.chat), args.prompts) if args.chat is not None else None
    sources, _ = translation_test_set(model_dir)
    sentences = [sources[i] for i in spread_indices(len(sources), args.sentences)]  # short to long
    results: dict = {"model_dir": str(model_dir), "sentences": len(sentences), "threads": args.threads,
                     "repeats": args.repeats, "hardware": hardware(), "versions": package_versions(), "modes": {}}
    for mode, beam in (("greedy", 1), ("beam4", 4)):
        results["modes"][mode] = timed_pair(functools.partial(translate_with, tr, sentences, beam),
                                            len(sentences), args.repeats)
    if chat is not None:
        run, n = chat
        results["chat_model_dir"], results["prompts"] = str(args.chat), n
        results["modes"]["chat greedy replies"] = timed_pair(run, n, args.repeats)
    intro = [f"{time.strftime('%Y-%m-%d')}, {machine_line(results['hardware'])}, {args.threads} threads, "
             f"{len(sentences)} test sentences spread over lengths, {model_dir}, medians of {args.repeats}."]
    if args.chat is not None:
        intro.append(f"Chat: {results['prompts']} first user turns of test dialogues in one batch, {args.chat}.")
    rows = [[mode, str(m["drop_per_s"]), str(m["keep_per_s"]), f"{m['speedup']:.2f}x",
             "yes" if m["identical"] else "NO"] for mode, m in results["modes"].items()]
    print(write_table_report(args.out, "bench_drop_finished", results, "Dropping finished sentences from the batch",
                             intro, ["decoding", "drop finished (per s)", "keep stepping them (per s)", "speed-up",
                                     "same output"], rows))


if __name__ == "__main__":
    run_script(main, "bench_drop_finished")  # a bad path or model dir: one line, not a traceback
