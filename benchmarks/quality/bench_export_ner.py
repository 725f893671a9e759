"""Entity F1 of a NER model, ours against its Hugging Face export read by `pipeline("token-classification")`.

    python benchmarks/quality/bench_export_ner.py MODEL_DIR --data TEST.conll [--out benchmarks/results/interop]

The export carries the encoder and the per-token scores, not the CRF's
transition scores nor our Viterbi decoding (see the model card that
``trainformer export --to hf`` writes), so the pipeline's argmax tags are
scored beside ours on the same sentences with the same seqeval. Each
sentence's words are joined by spaces; the pipeline's entity groups
(``aggregation_strategy="first"``: a word's first subword labels it, as in our
tagger) are mapped back to the words their characters cover.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from trainformer.bench.report import write_table_report
from trainformer.data.readers import read_conll
from trainformer.errors import UserError, run_script
from trainformer.inference.bio import to_bio
from trainformer.inference.loading import load_tagger
from trainformer.rundir import hardware, machine_line
from trainformer.tasks.tagging import score_entities


def word_spans(words: list[str]) -> list[tuple[int, int]]:
    """(start, end) character offsets of each word in ``" ".join(words)``."""
    spans, pos = [], 0
    for w in words:
        spans.append((pos, pos + len(w)))
        pos += len(w) + 1
    return spans


def tags_from_groups(groups: list[dict], spans: list[tuple[int, int]]) -> list[str]:
    """BIO tags of the words that the pipeline's entity groups cover."""
    tags = ["O"] * len(spans)
    for group in groups:
        inside = [i for i, (s, e) in enumerate(spans) if s < group["end"] and e > group["start"]]
        for k, i in enumerate(inside):
            tags[i] = f"{'B' if k == 0 else 'I'}-{group['entity_group']}"
    return tags


def pipeline_tags(hf_dir: Path, sentences: list[list[str]]) -> list[list[str]]:
    import transformers

    tagger = transformers.pipeline("token-classification", model=str(hf_dir), aggregation_strategy="first",
                                   device="cpu")
    texts = [" ".join(s) for s in sentences]
    groups = tagger(texts, batch_size=32)
    return [tags_from_groups(g, word_spans(s)) for g, s in zip(groups, sentences)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("--data", type=Path, required=True, help="a CoNLL file (e.g. the test split)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/interop"))
    args = p.parse_args()
    if not args.data.is_file():
        raise UserError(f"--data {args.data}: not found")
    examples = read_conll(args.data).examples
    sentences, gold = [s.tokens for s in examples], [to_bio(s.tags) for s in examples]
    ours = score_entities(gold, load_tagger(args.model_dir, "cpu", "fp32").tag(sentences))
    with tempfile.TemporaryDirectory() as work:
        from trainformer.cli import main as cli

        hf_dir = Path(work) / "hf"
        if cli(["export", str(args.model_dir), "--to", "hf", "--out", str(hf_dir)]) != 0:
            raise UserError(f"{args.model_dir}: the export failed (see above)")
        theirs = score_entities(gold, pipeline_tags(hf_dir, sentences))
    hw = hardware()
    rows = [[name, f"{s['f1']:.2f}", f"{s['precision']:.2f}", f"{s['recall']:.2f}"]
            for name, s in (("trainformer extract (CRF Viterbi)", ours),
                            ("HF pipeline on the export (argmax, first subword)", theirs))]
    intro = [f"{len(sentences)} sentences of `{args.data.name}`; seqeval entity scores.",
             f"Machine: {machine_line(hw)}.",
             f"Command: `python benchmarks/quality/bench_export_ner.py MODEL_DIR --data {args.data.name}`"]
    results = {"ours": ours, "hf_pipeline": theirs, "sentences": len(sentences), "hardware": hw}
    print(write_table_report(args.out, "bench_export_ner", results, "NER: ours vs the HF export's pipeline",
                             intro, ["reader", "F1", "precision", "recall"], rows))


if __name__ == "__main__":
    run_script(main, "bench_export_ner")
