"""Does document-level label consistency help a CoNLL-2003 tagger? A post-processing test.

CoNLL-2003 keeps each story's sentences in order, and a name often recurs a few
sentences later ("Japan ... Japan"). A tagger reads one sentence at a time, so it
may tag one occurrence and miss or mistype the other. This script tags valid
(eng.testa) and test (eng.testb) once with a trained model (or ensemble) and
rescores its output after two rules over each sentence's +-W neighbours:

- relabel: a predicted name takes the type most often predicted for the same
  words in the window, when that type has strictly more votes than its own;
- propagate: an untagged exact repeat of a name predicted in the window is
  tagged too (majority type), when at least `share` of the name's occurrences
  in the window were predicted as a name.

Settings are compared on valid; test is reported beside them, not used to choose.

    python examples/ner_consistency.py runs/ner-conll2003/model [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

from seqeval.metrics.sequence_labeling import get_entities

from trainformer.config import DataConfig
from trainformer.data.registry import read_dataset
from trainformer.errors import run_script
from trainformer.inference.bio import to_bio
from trainformer.inference.loading import load_tagger
from trainformer.tasks.tagging import score_entities

WINDOWS = (2, 5, 10, 20)
VARIANTS = {"relabel": (True, False, 0.0), "propagate 0.3": (False, True, 0.3),
            "both 0.3": (True, True, 0.3), "both 0.5": (True, True, 0.5)}


def occurrences(words: list[str], name: tuple[str, ...]) -> list[int]:
    """Start positions of `name` (a word tuple) in `words`."""
    n = len(name)
    return [k for k in range(len(words) - n + 1) if tuple(words[k : k + n]) == name]


def write(tags: list[str], kind: str, a: int, b: int) -> None:
    tags[a : b + 1] = [f"B-{kind}"] + [f"I-{kind}"] * (b - a)


def harmonise(sentences: list[list[str]], tags: list[list[str]], window: int, relabel: bool, propagate: bool,
              share: float) -> list[list[str]]:
    """`tags` (BIO, one list per sentence, in document order) after the two rules above."""
    found = [get_entities(t) for t in tags]  # per sentence: (type, first, last)
    out = [list(t) for t in tags]
    for i, words in enumerate(sentences):
        near = range(max(0, i - window), min(len(sentences), i + window + 1))
        votes: dict[tuple[str, ...], Counter] = defaultdict(Counter)
        for j in near:
            for kind, a, b in found[j]:
                votes[tuple(sentences[j][a : b + 1])][kind] += 1
        covered = [False] * len(words)
        for kind, a, b in found[i]:
            covered[a : b + 1] = [True] * (b - a + 1)
            count = votes[tuple(words[a : b + 1])]
            best, n = count.most_common(1)[0]
            if relabel and n > count[kind]:
                write(out[i], best, a, b)
        if not propagate:
            continue
        for name, count in sorted(votes.items(), key=lambda kv: -len(kv[0])):  # longest names first
            seen = sum(len(occurrences(sentences[j], name)) for j in near)
            if sum(count.values()) < share * seen:
                continue
            for k in occurrences(words, name):
                if not any(covered[k : k + len(name)]):
                    write(out[i], count.most_common(1)[0][0], k, k + len(name) - 1)
                    covered[k : k + len(name)] = [True] * len(name)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args = p.parse_args()
    data = read_dataset(DataConfig(dataset="conll2003"))
    tagger = load_tagger(args.model_dir, device="cpu")
    rows: dict[str, dict[str, float]] = {}
    for split in ("valid", "test"):
        sentences = [s.tokens for s in data[split].examples]
        gold = [to_bio(s.tags) for s in data[split].examples]
        pred = tagger.tag(sentences)
        rows.setdefault("as tagged", {})[split] = score_entities(gold, pred)["f1"]
        for w in WINDOWS:
            for name, rule in VARIANTS.items():
                tags = harmonise(sentences, pred, w, *rule)
                rows.setdefault(f"W={w}, {name}", {})[split] = score_entities(gold, tags)["f1"]
    best = max((r for r in rows if r != "as tagged"), key=lambda r: rows[r]["valid"])
    print(f"{args.model_dir}: entity F1 after document-level consistency rules (best on valid: {best})")
    print("| rules | valid F1 | test F1 |\n|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['valid']} | {r['test']} |")
    if args.json:
        out = {"model": str(args.model_dir), "best_on_valid": best, "rows": rows}
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    run_script(main, "ner_consistency")  # a bad model dir: one line, not a traceback
