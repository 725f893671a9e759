"""IE end to end on tiny synthetic data: MLM -> NER (init_from) and relations, then extract / evaluate.

The tagging data: random filler words, two-word person names (B-PER I-PER) and
cities after "in" (B-LOC). The relation data: "The <e1>a</e1> caused the
<e2>b</e2> ." with the markers in either order, so direction must be read.
"""

import json
import random
import shutil
import subprocess
import sys

import pytest
import torch

from trainformer.cli import main
from trainformer.data.markers import strip_entity_markers
from trainformer.inference.loading import load_tagger
from trainformer.modeldir import load_model_dir
from trainformer.tasks import build_task
from trainformer.tasks.tagging import TRANSITION_WEIGHTS

# trains models or starts servers: the end-to-end tier (`pytest -m "not slow"` skips it)
pytestmark = pytest.mark.slow

FIRST = ["Zoë", "Anna", "Jean-Pierre", "Omar", "Li", "Maria", "Kofi", "Sven"]
LAST = ["Müller", "Smith", "O'Neill", "Dubois", "Chen", "Garcia", "Mensah", "Berg"]
CITIES = ["Paris", "Berlin", "Lagos", "Tokyo", "Lima", "Oslo", "Cairo", "Quito"]
FILLER = ["the", "a", "report", "said", "today", "that", "met", "with", "visited", "friends",
          "new", "old", "team", "and", "later", "went", "home", ",", "!"]
NOUNS = ["storm", "flood", "engine", "car", "wheel", "tree", "leaf", "virus", "fever", "door"]
VERBS = {"caused": "Cause-Effect", "is part of": "Component-Whole", "is next to": "Other"}


def tagged_sentence(rng: random.Random) -> tuple[list[str], list[str]]:
    words, tags = [], []
    for _ in range(rng.randint(3, 8)):
        r = rng.random()
        if r < 0.2:
            words += [rng.choice(FIRST), rng.choice(LAST)]
            tags += ["B-PER", "I-PER"]
        elif r < 0.35:
            words += ["in", rng.choice(CITIES)]
            tags += ["O", "B-LOC"]
        else:
            words.append(rng.choice(FILLER))
            tags.append("O")
    return words + ["."], tags + ["O"]


def conll_text(n: int, seed: int) -> str:
    rng = random.Random(seed)
    blocks = []
    for _ in range(n):
        words, tags = tagged_sentence(rng)
        blocks.append("".join(f"{w}\t{t}\n" for w, t in zip(words, tags)))
    return "\n".join(blocks)


def relation_rows(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        verb = rng.choice(list(VERBS))
        a, b = rng.sample(NOUNS, 2)
        first, second = ("e1", "e2") if rng.random() < 0.5 else ("e2", "e1")
        text = f"The <{first}>{a}</{first}> {verb} the <{second}>{b}</{second}> ."
        rel = VERBS[verb]
        rows.append((text, rel if rel == "Other" else f"{rel}({first},{second})"))
    return rows


def semeval_text(rows: list[tuple[str, str]]) -> str:
    return "id\tsentence\trelation\n" + "".join(f"{i}\t{s}\t{r}\n" for i, (s, r) in enumerate(rows, 1))


TRAIN = "{precision: fp32, device: cpu, threads: 1, progress: false, log_every: 20, eval_every: 0, ckpt_every: 0, label_smoothing: 0.0, max_steps: %d}"
MODEL = "{family: encoder, d_model: 32, n_heads: 2, n_layers: 1, d_ff: 64, max_len: 64, position: learned, dropout: 0.0, head: %s}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ie")
    rng = random.Random(7)
    rel_rows = relation_rows(400, 1)
    text = [" ".join(tagged_sentence(rng)[0]) for _ in range(300)]
    text += [strip_entity_markers(s)[0] for s, _ in rel_rows]
    (root / "text.txt").write_text("\n".join(text) + "\n", encoding="utf-8")
    (root / "train.conll").write_text(conll_text(500, 0), encoding="utf-8")
    (root / "rel.tsv").write_text(semeval_text(rel_rows), encoding="utf-8")
    recipes = {
        "mlm": f"task: mlm\ndescription: tiny\nmodel: {MODEL % 'mlm'}\n"
               f"data: {{dataset: {root / 'text.txt'}, tokenizer: {{kind: wordpiece, vocab_size: 200, min_frequency: 1}},"
               " seq_len: 32, max_tokens: 512, valid_size: 40}\n"
               f"optim: {{lr: 0.003, warmup_steps: 5}}\ntrain: {TRAIN % 10}\n",
        "ner": f"task: ner\ndescription: tiny\ninit_from: {root / 'mlm'}\nmodel: {MODEL % 'tagging'}\n"
               f"data: {{dataset: {root / 'train.conll'}, max_tokens: 512, valid_size: 40, test_size: 60}}\n"
               f"optim: {{lr: 0.005, warmup_steps: 5, schedule: linear}}\ntrain: {TRAIN % 70}\n",
        "ner-crf": f"task: ner\ndescription: tiny\ninit_from: {root / 'mlm'}\nmodel: {MODEL % 'tagging, crf: true'}\n"
                   f"data: {{dataset: {root / 'train.conll'}, max_tokens: 512, valid_size: 40, test_size: 60}}\n"
                   f"optim: {{lr: 0.005, warmup_steps: 5, schedule: linear}}\ntrain: {TRAIN % 70}\n",
        "ner-chars": f"task: ner\ndescription: tiny\ninit_from: {root / 'mlm'}\n"
                     f"model: {MODEL % 'tagging, crf: true, char_cnn: 16'}\n"
                     f"data: {{dataset: {root / 'train.conll'}, max_tokens: 512, valid_size: 40, test_size: 60,"
                     " word_dropout: 0.1, rare_word_dropout: 0.5}\n"
                     f"optim: {{lr: 0.005, warmup_steps: 5, schedule: linear}}\ntrain: {TRAIN % 70}\n",
        "rel": f"task: relations\ndescription: tiny\ninit_from: {root / 'mlm'}\nmodel: {MODEL % 'relation'}\n"
               f"data: {{dataset: {root / 'rel.tsv'}, max_tokens: 512, valid_size: 40, test_size: 40}}\n"
               f"optim: {{lr: 0.005, warmup_steps: 5, schedule: linear}}\ntrain: {TRAIN % 20}\n",
    }
    for name, recipe in recipes.items():
        (root / f"{name}.yaml").write_text(recipe, encoding="utf-8")
        assert main(["train", str(root / f"{name}.yaml"), "--out", str(root / name)]) == 0
    return root


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([*args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_runs_leave_their_files(runs):
    for name in ("mlm", "ner", "rel"):
        for f in ("data.json", "summary.json", "model/model.safetensors", "model/tokenizer.json"):
            assert (runs / name / f).is_file(), f"{name}/{f}"
    mlm = json.loads((runs / "mlm" / "data.json").read_text())
    assert "no valid or test file" in mlm["text_used"] and mlm["sources"]
    labels = json.loads((runs / "ner" / "model" / "labels.json").read_text())
    assert labels == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    assert len(json.loads((runs / "rel" / "model" / "labels.json").read_text())) == 5
    # fine-tuning used the MLM tokenizer: identical files, markers included
    mlm_tok = (runs / "mlm" / "model" / "tokenizer.json").read_text()
    assert (runs / "ner" / "model" / "tokenizer.json").read_text() == mlm_tok
    assert (runs / "rel" / "model" / "tokenizer.json").read_text() == mlm_tok and "<e1>" in mlm_tok


def test_tiny_encoder_learns_synthetic_ner(runs):
    summary = json.loads((runs / "ner" / "summary.json").read_text())
    assert summary["test"]["f1"] >= 90, summary["test"]
    assert summary["test"]["f1_PER"] >= 90 and summary["test"]["f1_LOC"] >= 90


def test_ner_model_dir_carries_the_prior_chosen_on_valid(runs, tmp_path, capsys):
    summary = json.loads((runs / "ner" / "summary.json").read_text())
    chosen = summary["valid"]["transition_weight"]
    assert chosen in TRANSITION_WEIGHTS and summary["test"]["transition_weight"] == chosen
    assert summary["valid"]["f1"] >= summary["valid"]["f1_without_prior"]  # 0 is one of the candidates
    saved = json.loads((runs / "ner" / "model" / "transitions.json").read_text())
    assert saved["weight"] == chosen and saved["labels"] == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    assert load_tagger(runs / "ner" / "model").prior.weight == chosen
    # a copy without the file (a model dir from before the prior) decodes with the BIO rules only
    old = tmp_path / "old"
    shutil.copytree(runs / "ner" / "model", old)
    (old / "transitions.json").unlink()
    assert load_tagger(old).prior is None
    (old / "transitions.json").write_text("{not json", encoding="utf-8")
    text = tmp_path / "in.txt"
    text.write_text("Anna Smith lives in Paris .\n", encoding="utf-8")
    code, _, err = cli(capsys, "extract", str(old), "--input", str(text), "--device", "cpu")
    assert code == 2 and "transitions.json" in err and err.count("\n") == 1, err
    saved["transitions"] = saved["transitions"][:2]  # rows missing: a wrong shape, not a traceback
    (old / "transitions.json").write_text(json.dumps(saved), encoding="utf-8")
    code, _, err = cli(capsys, "extract", str(old), "--input", str(text), "--device", "cpu")
    assert code == 2 and "5x5 transition scores" in err and err.count("\n") == 1, err


def test_a_test_evaluation_first_chooses_the_prior_weight_on_valid(runs):
    """A resumed run that ends without a valid evaluation must not decode test with the
    default weight: the task chooses it on valid first."""
    loaded = load_model_dir(runs / "ner" / "model")
    task = build_task(loaded.cfg)
    task.setup(None)
    summary = json.loads((runs / "ner" / "summary.json").read_text())
    assert task.evaluate(loaded.model, "test")["transition_weight"] == summary["valid"]["transition_weight"]


def test_crf_tagger_learns_and_decodes_with_its_learned_transitions(runs):
    summary = json.loads((runs / "ner-crf" / "summary.json").read_text())
    assert summary["test"]["f1"] >= 90, summary["test"]
    assert summary["valid"]["transition_weight"] == 1.0 and "f1_without_prior" in summary["valid"]
    model_dir = runs / "ner-crf" / "model"
    assert not (model_dir / "transitions.json").exists()  # the scores are model weights
    tagger = load_tagger(model_dir, device="cpu")
    head = tagger.model.head
    assert torch.equal(tagger.prior.trans, head.crf_trans.detach()) and tagger.prior.weight == 1.0
    b_per, i_per = tagger.labels.index("B-PER"), tagger.labels.index("I-PER")
    assert head.crf_trans[b_per, i_per] > head.crf_trans[b_per, b_per]  # names are two words here


def test_a_crf_tagger_is_not_distilled(runs, tmp_path, capsys):
    code, _, err = cli(capsys, "prune", str(runs / "ner-crf" / "model"), "--out", str(tmp_path / "p"),
                       "--sparsity", "0.25", "--finetune-steps", "2", "--distill", "0.5")
    assert code == 2 and "CRF tagger" in err and err.count("\n") == 1, err
    assert not (tmp_path / "p").exists()


def test_extract_ner_json_offsets(runs, tmp_path, capsys):
    lines = ["Zoë Müller met friends in Paris and in Paris .", "", "later, in Oslo, Kofi Chen said!"]
    src = tmp_path / "in.txt"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    dst = tmp_path / "out.jsonl"
    code, _, err = cli(capsys, "extract", str(runs / "ner"), "--input", str(src), "--output", str(dst))
    assert code == 0, err
    results = [json.loads(x) for x in dst.read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in results] == lines
    assert results[1] == {"text": "", "entities": []}
    for r in results:
        for e in r["entities"]:
            assert set(e) == {"type", "text", "start", "end"}
            assert r["text"][e["start"] : e["end"]] == e["text"]
    got = [(e["type"], e["text"], e["start"]) for e in results[0]["entities"]]
    assert got == [("PER", "Zoë Müller", 0), ("LOC", "Paris", 26), ("LOC", "Paris", 39)]
    assert [(e["type"], e["text"]) for e in results[2]["entities"]] == [("LOC", "Oslo"), ("PER", "Kofi Chen")]


def test_extract_through_the_real_command(runs):
    proc = subprocess.run(
        [sys.executable, "-m", "trainformer", "extract", str(runs / "ner" / "model")],
        input="Anna Smith went home .\n", capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    (result,) = [json.loads(x) for x in proc.stdout.splitlines()]
    assert result["entities"] == [{"type": "PER", "text": "Anna Smith", "start": 0, "end": 10}]


def test_extract_bad_input(runs, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"Anna Smith .\n\xff\xfe broken\n")
    code, out, err = cli(capsys, "extract", str(runs / "ner"), "--input", str(bad))
    assert code == 2 and "bad.txt:2" in err and "UTF-8" in err and out == ""
    long = tmp_path / "long.txt"
    long.write_text("in Paris " * 200 + "\n", encoding="utf-8")
    code, out, err = cli(capsys, "extract", str(runs / "ner"), "--input", str(long))
    assert code == 0 and "truncated" in err
    (result,) = [json.loads(x) for x in out.splitlines()]
    assert all(result["text"][e["start"] : e["end"]] == e["text"] for e in result["entities"])
    code, _, err = cli(capsys, "extract", str(runs / "mlm"), "--input", str(long))
    assert code == 2 and "'mlm' model" in err


def test_extract_relation_json(runs, tmp_path, capsys):
    labels = json.loads((runs / "rel" / "model" / "labels.json").read_text())
    lines = ["The <e1>storm</e1> caused the <e2>flood</e2> .", "", "A <e2>leaf</e2> is part of a <e1>tree</e1>."]
    src = tmp_path / "rel.txt"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, out, err = cli(capsys, "extract", str(runs / "rel"), "--input", str(src))
    assert code == 0, err
    results = [json.loads(x) for x in out.splitlines()]
    assert [r["text"] for r in results] == lines
    assert results[1] == {"text": "", "relation": None, "score": None}
    for r in (results[0], results[2]):
        assert set(r) == {"text", "relation", "score"} and r["relation"] in labels and 0 < r["score"] <= 1
    src.write_text("The <e1>storm</e1> caused the <e2>flood</e2> .\nno markers here\n", encoding="utf-8")
    code, _, err = cli(capsys, "extract", str(runs / "rel"), "--input", str(src))
    assert code == 2 and "rel.txt:2" in err and "<e1>" in err


def test_an_ensemble_of_relation_models_is_one_model_dir(runs, tmp_path, capsys):
    rel, ens = runs / "rel", tmp_path / "ens"
    code, out, err = cli(capsys, "ensemble", str(rel), str(rel / "model"), "--out", str(ens))
    assert code == 0 and "ensemble of 2 models" in out, err
    assert sorted(p.name for p in ens.iterdir()) == ["config.json", "ensemble.json", "labels.json",
                                                      "member-0", "member-1", "tokenizer.json"]
    sem = tmp_path / "eval.tsv"
    sem.write_text(semeval_text(relation_rows(30, 5)), encoding="utf-8")
    scores = {}
    for name, model_dir in (("one", rel), ("ensemble", ens)):  # two copies of one model vote like it
        code, out, err = cli(capsys, "evaluate", str(model_dir), "--data", str(sem), "--json", "--device", "cpu")
        assert code == 0, err
        scores[name] = json.loads(out)
        code, out, err = cli(capsys, "extract", str(model_dir), "--input", str(sem), "--device", "cpu")
        scores[name]["extract"] = out
    assert scores["ensemble"] == scores["one"]


def test_a_ner_ensemble_of_copies_tags_like_its_member(runs, tmp_path, capsys):
    ner, ens = runs / "ner-crf", tmp_path / "ens"
    assert cli(capsys, "ensemble", str(ner), str(ner), str(ner / "model"), "--out", str(ens))[0] == 0
    conll = tmp_path / "eval.conll"
    conll.write_text(conll_text(40, 99), encoding="utf-8")
    scores = {}
    for name, model_dir in (("one", ner), ("ensemble", ens)):
        code, out, err = cli(capsys, "evaluate", str(model_dir), "--data", str(conll), "--json", "--device", "cpu")
        assert code == 0, err
        scores[name] = json.loads(out)
    assert scores["ensemble"] == scores["one"] and scores["one"]["f1"] >= 90


def test_ensemble_mistakes_are_one_line_errors(runs, tmp_path, capsys):
    rel = runs / "rel"
    odd = tmp_path / "odd"
    shutil.copytree(rel / "model", odd)
    (odd / "tokenizer.json").write_text((odd / "tokenizer.json").read_text() + "\n", encoding="utf-8")
    ens = tmp_path / "ens"
    assert cli(capsys, "ensemble", str(rel), str(rel), "--out", str(ens))[0] == 0
    cases = {
        (str(rel),): "expected two or more",
        (str(rel), str(runs / "ner")): "a 'ner' model",
        (str(rel), str(odd)): "tokenizer.json differs",
        (str(rel), str(ens)): "already an ensemble",
        (str(runs / "mlm"), str(runs / "mlm")): "ensembles combine 'relations' or 'ner' models",
    }
    for members, expected in cases.items():
        code, _, err = cli(capsys, "ensemble", *members, "--out", str(tmp_path / "new"))
        assert code == 2 and expected in err and err.count("\n") == 1, err
    code, _, err = cli(capsys, "ensemble", str(rel), str(rel), "--out", str(ens))
    assert code == 2 and "not empty" in err
    code, _, err = cli(capsys, "quantize", str(ens), "--out", str(tmp_path / "q"))  # a one-model verb
    assert code == 2 and "an ensemble" in err and err.count("\n") == 1, err


def test_train_seeds_trains_each_seed_and_scores_their_ensemble(runs, tmp_path, capsys):
    out = tmp_path / "seeds"
    cmd = ("train", str(runs / "rel.yaml"), "--seeds", "3", "5", "--out", str(out))
    code, printed, err = cli(capsys, *cmd)
    assert code == 0, err
    assert "ensemble of 2 seeds: valid" in printed and sorted(p.name for p in out.iterdir()) == [
        "model", "seed-3", "seed-5", "seeds.json", "summary.json"]
    seeds = {s: load_model_dir(out / f"seed-{s}", device="cpu") for s in (3, 5)}
    assert [seeds[s].cfg.train.seed for s in (3, 5)] == [3, 5]
    w3, w5 = (seeds[s].model.state_dict()["head.proj.weight"] for s in (3, 5))
    assert not torch.equal(w3, w5)  # two different models
    assert json.loads((out / "model" / "ensemble.json").read_text())["members"] == ["member-0", "member-1"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [3, 5] and summary["main_metric"] == "macro_f1"
    for s in (3, 5):
        own = json.loads((out / f"seed-{s}" / "summary.json").read_text())
        assert summary["members"][str(s)] == {"valid": own["valid"], "test": own["test"]}
    assert summary["test"]["examples"] == summary["members"]["3"]["test"]["examples"] > 0
    assert 0 <= summary["test"]["macro_f1"] <= 100 and 0 <= summary["valid"]["macro_f1"] <= 100

    # the scoring path reads the model from disk and splits the data as training did: a
    # member scored through it matches the score its own run reported at the end
    from trainformer.fit import score_model_dir

    alone = score_model_dir(seeds[3].cfg, out / "seed-3" / "model")
    assert alone["test"] == summary["members"]["3"]["test"]

    # a rerun keeps finished seeds, resumes an interrupted one, rebuilds the ensemble
    (out / "seed-5" / "summary.json").unlink()
    weights = (out / "seed-3" / "model" / "model.safetensors").stat().st_mtime_ns
    code, printed, err = cli(capsys, *cmd)
    assert code == 0, err
    assert "seed 3: finished earlier, kept" in printed and "seed 5: resuming" in printed
    assert (out / "seed-3" / "model" / "model.safetensors").stat().st_mtime_ns == weights
    assert json.loads((out / "summary.json").read_text())["test"] == summary["test"]


def test_a_character_cnn_tagger_learns_from_a_pretrained_encoder_without_one(runs, capsys):
    summary = json.loads((runs / "ner-chars" / "summary.json").read_text())
    assert summary["test"]["f1"] >= 90, summary["test"]
    weights = load_model_dir(runs / "ner-chars", device="cpu").model.state_dict()
    assert {"char_cnn.embed.weight", "char_cnn.conv.weight", "char_cnn.proj.weight"} <= set(weights)
    tagger = load_tagger(runs / "ner-chars" / "model", device="cpu")
    assert tagger.chars
    row = tagger.extract(["Anna Smith went home in Paris ."])[0]
    assert [(e["type"], e["text"]) for e in row["entities"]] == [("PER", "Anna Smith"), ("LOC", "Paris")]


def test_a_character_cnn_tagger_survives_quantization_and_pruning(runs, tmp_path, capsys):
    sentence = ["Anna Smith went home in Paris ."]
    expected = load_tagger(runs / "ner-chars" / "model", device="cpu").extract(sentence)[0]["entities"]
    code, _, err = cli(capsys, "quantize", str(runs / "ner-chars" / "model"), "--out", str(tmp_path / "q"),
                       "--method", "dynamic")
    assert code == 0, err
    assert load_tagger(tmp_path / "q", device="cpu").extract(sentence)[0]["entities"] == expected
    code, _, err = cli(capsys, "prune", str(runs / "ner-chars" / "model"), "--out", str(tmp_path / "p"),
                       "--sparsity", "0.25", "--finetune-steps", "2")
    assert code == 0, err
    pruned = load_model_dir(tmp_path / "p", device="cpu")
    assert pruned.cfg.model.char_cnn == 16 and "char_cnn.conv.weight" in pruned.model.state_dict()
    assert load_tagger(tmp_path / "p", device="cpu").extract(sentence)[0]["text"] == sentence[0]


@pytest.mark.parametrize("name", ["ner", "ner-crf", "ner-chars"])
def test_a_saved_tagger_scores_on_its_splits_as_its_run_reported(runs, name):
    from trainformer.fit import score_model_dir

    cfg = load_model_dir(runs / name, device="cpu").cfg
    own = json.loads((runs / name / "summary.json").read_text())
    scores = score_model_dir(cfg, runs / name / "model")  # decoded with the prior saved in the model dir
    assert scores["test"]["f1"] == own["test"]["f1"] and scores["test"]["sentences"] == own["test"]["sentences"]


def test_train_seeds_mistakes_are_one_line_errors(runs, tmp_path, capsys):
    rel = str(runs / "rel.yaml")
    out = tmp_path / "seeds"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    cases = [
        (("train", rel, "--seeds", "1", "--out", str(out)), "two or more seeds"),
        (("train", rel, "--seeds", "1", "1", "--out", str(out)), "each seed once"),
        (("train", rel, "--seeds", "1", "2", "--set", "train.seed=4", "--out", str(out)), "drop --set train.seed"),
        (("train", rel, "--seeds", "-1", "2", "--out", str(out)), "train.seed"),
        (("train", str(runs / "mlm" / "config.yaml"), "--seeds", "1", "2", "--out", str(out)), "a 'mlm' recipe"),
        (("train", "--resume", str(runs / "rel"), "--seeds", "1", "2"), "rerun the same --seeds command"),
        (("train", rel, "--seeds", "1", "2", "--out", str(tmp_path / "full")), "holds no --seeds run"),
    ]
    for args, expected in cases:
        code, _, err = cli(capsys, *args)
        assert code == 2 and expected in err and err.count("\n") == 1, err
    assert not out.exists()
    out.mkdir()
    (out / "seeds.json").write_text(json.dumps({"recipe": rel, "overrides": [], "seeds": [1, 2]}))
    code, _, err = cli(capsys, "train", rel, "--seeds", "1", "2", "--set", "optim.lr=0.01", "--out", str(out))
    assert code == 2 and "rerun that to continue it" in err and err.count("\n") == 1, err


def test_evaluate_each_task(runs, tmp_path, capsys):
    conll = tmp_path / "eval.conll"
    conll.write_text(conll_text(40, 99), encoding="utf-8")
    code, out, err = cli(capsys, "evaluate", str(runs / "ner"), "--data", str(conll), "--json")
    assert code == 0, err
    m = json.loads(out)
    assert m["sentences"] == 40 and m["f1"] >= 90 and {"f1_PER", "f1_LOC", "precision", "recall"} <= set(m)
    sem = tmp_path / "eval.tsv"
    sem.write_text(semeval_text(relation_rows(30, 5)), encoding="utf-8")
    code, out, err = cli(capsys, "evaluate", str(runs / "rel"), "--data", str(sem), "--json")
    assert code == 0, err
    m = json.loads(out)
    assert m["examples"] == 30 and 0 <= m["macro_f1"] <= 100 and "f1_Cause-Effect" in m
    text = tmp_path / "eval.txt"
    rng = random.Random(3)
    text.write_text("".join(" ".join(tagged_sentence(rng)[0]) + "\n\n" for _ in range(20)), encoding="utf-8")
    code, out, err = cli(capsys, "evaluate", str(runs / "mlm"), "--data", str(text), "--json")
    assert code == 0, err
    m = json.loads(out)
    assert m["texts"] == 20 and m["masked_tokens"] > 0 and m["ppl"] > 1 and 0 <= m["accuracy"] <= 100
