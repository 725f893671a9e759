"""Translation end to end on a few hundred pairs: train -> translate -> evaluate, and bad input."""

import json
import random
import subprocess
import sys

import pytest

from trainformer.tasks.translation import score_translations, split_key

# trains models or starts servers: the end-to-end tier (`pytest -m "not slow"` skips it)
pytestmark = pytest.mark.slow

WORDS = {"red": "rouge", "blue": "bleu", "green": "vert", "cat": "chat", "dog": "chien",
         "house": "maison", "car": "voiture", "big": "grand", "small": "petit", "the": "le"}


def make_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    en_words = list(WORDS)
    pairs = []
    for _ in range(n):
        words = rng.choices(en_words, k=rng.randint(2, 5))
        pairs.append((" ".join(words) + " .", " ".join(WORDS[w] for w in words) + " ."))
    return pairs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for a few seconds on a word-for-word toy language."""
    root = tmp_path_factory.mktemp("tf")
    data = root / "data" / "en-fr"
    data.mkdir(parents=True)
    lines = ["en\tfr"] + [f"{e}\t{f}" for e, f in make_pairs(600)]
    lines.insert(5, "a broken line without a tab")
    (data / "tatoeba.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    recipe = root / "tiny.yaml"
    recipe.write_text(
        "task: translation\ndescription: tiny\n"
        "model: {preset: tiny-encdec, d_model: 64, d_ff: 128, n_heads: 4, n_layers: 2, dropout: 0.0}\n"
        "data: {tokenizer: {vocab_size: 100, min_frequency: 1}, max_tokens: 800, valid_size: 20, test_size: 20}\n"
        "optim: {lr: 0.003, warmup_steps: 20, schedule: constant}\n"
        "train: {max_steps: 900, threads: 1, log_every: 50, eval_every: 0, ckpt_every: 0, precision: fp32, progress: false, label_smoothing: 0.0}\n"
        "eval: {beam: 2, samples: 2, max_examples: 20}\n"
    )
    env = {"TRAINFORMER_DATA": str(root / "data"), "PATH": "", "HOME": str(root)}
    import os

    env = {**os.environ, **env, "PATH": os.environ["PATH"]}
    run = root / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "trainformer", "train", str(recipe), "--out", str(run)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, run, env, proc


def cli(env, *args, stdin=None):
    return subprocess.run([sys.executable, "-m", "trainformer", *args], capture_output=True,
                          text=True, env=env, input=stdin, timeout=300)


def test_run_dir_is_complete(trained):
    _, run, _, proc = trained
    for name in ("config.yaml", "env.json", "metrics.jsonl", "summary.json", "data.json",
                 "model/model.safetensors", "model/config.json", "model/tokenizer.json"):
        assert (run / name).is_file(), name
    data = json.loads((run / "data.json").read_text())
    assert data["bad_lines"]["total"] == 1 and "wrong column count" in data["bad_lines"]["counts"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test"]["bleu"] > 80, summary  # a word-for-word toy language is learnt


def test_translate_keeps_order_and_empty_lines(trained):
    _, run, env, _ = trained
    proc = cli(env, "translate", str(run / "model"), "--beam", "2",
               stdin="red cat .\n\nthe big dog .\n")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.split("\n")
    assert out[1] == "" and len(out) == 4
    assert "rouge" in out[0] and "chat" in out[0]
    assert "chien" in out[2]


def test_translate_nbest_and_greedy(trained):
    _, run, env, _ = trained
    proc = cli(env, "translate", str(run), "--beam", "3", "--nbest", "2", stdin="blue car .\n")
    assert proc.returncode == 0 and len(proc.stdout.rstrip("\n").split("\t")) == 2
    greedy = cli(env, "translate", str(run), "--beam", "1", stdin="blue car .\n")
    assert greedy.returncode == 0 and "voiture" in greedy.stdout


def test_translate_bad_input_is_one_line(trained, tmp_path):
    _, run, env, _ = trained
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"red cat .\n\xff\xfe broken\n")
    proc = cli(env, "translate", str(run), "--input", str(bad))
    assert proc.returncode == 2 and "bad.txt:2" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli(env, "translate", str(tmp_path / "missing"))
    assert proc.returncode == 2 and "not found" in proc.stderr
    proc = cli(env, "translate", str(run), "--beam", "0", stdin="x\n")
    assert proc.returncode == 2 and "--beam" in proc.stderr


def test_translate_truncates_over_long_lines_with_warning(trained):
    _, run, env, _ = trained
    proc = cli(env, "translate", str(run), "--beam", "1", stdin="red " * 600 + "\n")
    assert proc.returncode == 0 and "truncated" in proc.stderr


def test_evaluate_multi_reference(trained, tmp_path):
    _, run, env, _ = trained
    data = tmp_path / "eval.tsv"
    data.write_text("en\tfr\nred cat .\trouge chat .\nred cat .\tle chat rouge .\nbig dog .\tgrand chien .\n")
    hyps = tmp_path / "hyps.txt"
    proc = cli(env, "evaluate", str(run), "--data", str(data), "--json", "--hyps", str(hyps))
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout)
    assert metrics["sources"] == 2 and metrics["references"] == 3
    assert "nrefs:var" in metrics["bleu_signature"]
    assert len(hyps.read_text().splitlines()) == 2


def test_evaluate_on_the_models_own_test_split_matches_its_training_run(trained, tmp_path):
    _, run, env, _ = trained
    hyps = tmp_path / "test.hyp.txt"
    proc = cli(env, "evaluate", str(run), "--split", "test", "--precision", "fp32", "--json", "--hyps", str(hyps))
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout)
    summary = json.loads((run / "summary.json").read_text())
    assert metrics["sources"] == summary["test"]["sentences"] == len(hyps.read_text().splitlines())
    assert metrics["bleu"] == pytest.approx(summary["test"]["bleu"], abs=0.01)  # the same split, rebuilt
    both = cli(env, "evaluate", str(run), "--split", "test", "--data", "x.tsv")
    assert both.returncode == 2 and "not allowed with" in both.stderr


def test_multi_reference_scoring_uses_every_reference():
    single = score_translations(["le chat rouge ."], [["rouge chat ."]])
    multi = score_translations(["le chat rouge ."], [["rouge chat .", "le chat rouge ."]])
    assert multi["bleu"] == 100.0 and single["bleu"] < 100.0


def test_split_key_groups_near_duplicates():
    assert split_key("Hi.") == split_key("hi!") == split_key(" Hi ")
    assert split_key("Hi.") != split_key("Hello.")


def test_sampling_is_reproducible_with_a_seed(trained):
    _, run, env, _ = trained
    args = ("translate", str(run), "--sampling", "--temperature", "1.5")
    a = cli(env, *args, "--seed", "3", stdin="red cat .\nthe big dog .\nblue car .\n")
    b = cli(env, *args, "--seed", "3", stdin="red cat .\nthe big dog .\nblue car .\n")
    assert a.returncode == 0 and a.stdout == b.stdout and len(a.stdout.splitlines()) == 3
