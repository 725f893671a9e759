"""Where a CoNLL-2003 tagger loses its F1: entities seen in training or not, headline sentences or not.

For each trained NER model directory (a run's model/, or an ensemble), tags
the test split (eng.testb) and reports entity-level recall of gold entities
whose exact string occurs as an entity in the training split ("seen") and of
the rest ("unseen"), and precision and recall in sentences written mostly in
capitals (headlines such as "SOCCER - JAPAN GET LUCKY WIN") against the rest.
An entity counts as found when type and span both match (seqeval's rule).

    python examples/ner_errors.py runs/ner-conll2003/model runs/ner-rope-ens3 [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from seqeval.metrics.sequence_labeling import get_entities

from trainformer.config import DataConfig
from trainformer.data.registry import read_dataset
from trainformer.errors import run_script
from trainformer.inference.bio import to_bio
from trainformer.inference.loading import load_tagger
from trainformer.tasks.tagging import score_entities

Entity = tuple[str, int, int]  # type, first word, last word


def entity_strings(sentences) -> set[str]:
    """Every entity string (words joined by spaces) tagged in `sentences`."""
    return {" ".join(s.tokens[a : b + 1]) for s in sentences for _, a, b in get_entities(to_bio(s.tags))}


def is_headline(words: list[str]) -> bool:
    """Most alphabetic words (at least 60%) in capitals, like CoNLL's all-caps headlines."""
    alpha = [w for w in words if any(c.isalpha() for c in w)]
    return bool(alpha) and sum(w.isupper() and len(w) > 1 for w in alpha) >= 0.6 * len(alpha)


def breakdown(test, pred: list[list[str]], seen: set[str]) -> dict[str, float]:
    """Recall by seen / unseen entity string and precision / recall by headline / other sentence."""
    n = Counter()
    for s, p in zip(test, pred):
        gold, found = set(get_entities(to_bio(s.tags))), set(get_entities(p))
        kind = "headline" if is_headline(s.tokens) else "other"
        for e in gold:
            novelty = "seen" if " ".join(s.tokens[e[1] : e[2] + 1]) in seen else "unseen"
            for group in (novelty, kind):
                n[group, "gold"] += 1
                n[group, "hit"] += e in found
        n[kind, "pred"] += len(found)
        n[kind, "correct"] += len(found & gold)
    out = {}
    for group in ("seen", "unseen", "headline", "other"):
        out[f"{group}_entities"] = n[group, "gold"]
        out[f"{group}_recall"] = round(100 * n[group, "hit"] / max(n[group, "gold"], 1), 1)
    for group in ("headline", "other"):
        out[f"{group}_precision"] = round(100 * n[group, "correct"] / max(n[group, "pred"], 1), 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dirs", nargs="+", type=Path)
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args = p.parse_args()
    data = read_dataset(DataConfig(dataset="conll2003"))
    seen = entity_strings(data["train"].examples)
    test = data["test"].examples
    rows = {}
    for model_dir in args.model_dirs:
        pred = load_tagger(model_dir, device="cpu").tag([s.tokens for s in test])
        f1 = score_entities([to_bio(s.tags) for s in test], pred)["f1"]
        rows[str(model_dir)] = {"f1": f1, **breakdown(test, pred, seen)}
    cols = ["f1", "seen_recall", "unseen_recall", "headline_recall", "headline_precision", "other_recall",
            "other_precision"]
    first = next(iter(rows.values()))
    print(f"eng.testb: {first['seen_entities']} entities seen in training, {first['unseen_entities']} unseen; "
          f"{first['headline_entities']} in headline sentences")
    print("| model | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(str(r[c]) for c in cols) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    run_script(main, "ner_errors")  # a bad model dir: one line, not a traceback
