"""Batched translation with and without dropping finished sentences from the batch.

Greedy and beam search stop stepping a sentence once it has ended
(``drop_finished=True``, the default). HF ``generate()`` and our earlier code
keep stepping every row until the longest sentence of the batch is done. This
times both on real test sentences of a trained model, interleaved in one
process (one warm-up pass, medians of the rest), and checks that the
translations are identical.

    python benchmarks/bench_drop_finished.py runs/en-fr-60/model [--sentences 256] [--repeats 3]
        [--threads 2] [--out benchmarks/results/drop_finished]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from pathlib import Path

import torch

import trainformer.tasks.translate_infer as translate_infer
from bench_compression import load_translator, test_data
from trainformer.bench.report import write_table_report
from trainformer.errors import run_script
from trainformer.generation import beam_translate, greedy_translate
from trainformer.modeldir import resolve_model_dir
from trainformer.rundir import hardware, package_versions
from trainformer.tasks.base import spread_indices


def use_drop_finished(flag: bool) -> None:
    """Point the Translator's decoding functions at variants with ``drop_finished=flag``."""
    translate_infer.greedy_translate = functools.partial(greedy_translate, drop_finished=flag)
    translate_infer.beam_translate = functools.partial(beam_translate, drop_finished=flag)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--sentences", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/drop_finished"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = resolve_model_dir(args.model_dir)
    tr = load_translator(model_dir)
    sources, _ = test_data(model_dir, None)
    sentences = [sources[i] for i in spread_indices(len(sources), args.sentences)]  # short to long
    results: dict = {"model_dir": str(model_dir), "sentences": len(sentences), "threads": args.threads,
                     "repeats": args.repeats, "hardware": hardware(), "versions": package_versions(), "modes": {}}
    for mode, beam in (("greedy", 1), ("beam4", 4)):
        times: dict[bool, list[float]] = {True: [], False: []}
        outputs: dict[bool, list] = {}
        for r in range(args.repeats + 1):  # pass 0 warms up
            for flag in (True, False):
                use_drop_finished(flag)
                start = time.perf_counter()
                outputs[flag] = tr.translate(sentences, beam=beam)
                if r:
                    times[flag].append(time.perf_counter() - start)
        use_drop_finished(True)
        rate = {flag: len(sentences) / statistics.median(t) for flag, t in times.items()}
        results["modes"][mode] = {
            "drop_sent_per_s": round(rate[True], 1), "keep_sent_per_s": round(rate[False], 1),
            "speedup": round(rate[True] / rate[False], 2), "identical": outputs[True] == outputs[False],
        }
    intro = [f"{time.strftime('%Y-%m-%d')}, {results['hardware']['cpu']}, {args.threads} threads, "
             f"{len(sentences)} test sentences spread over lengths, {model_dir}, medians of {args.repeats}."]
    rows = [[mode, str(m["drop_sent_per_s"]), str(m["keep_sent_per_s"]), f"{m['speedup']:.2f}x",
             "yes" if m["identical"] else "NO"] for mode, m in results["modes"].items()]
    print(write_table_report(args.out, "bench_drop_finished", results, "Dropping finished sentences from the batch",
                             intro, ["decoding", "drop finished (sent/s)", "keep stepping them (sent/s)", "speed-up",
                                     "same output"], rows))


if __name__ == "__main__":
    run_script(main, "bench_drop_finished")  # a bad path or model dir: one line, not a traceback
