"""A tiny LM trained through the Trainer learns its text; `generate` and `evaluate` use its model dir."""

import io
import json
import os
import random
import subprocess
import sys

import pytest

from trainformer.cli import main
from trainformer.config import from_dict
from trainformer.rundir import RunDir
from trainformer.tasks import build_task
from trainformer.training.trainer import Trainer

# trains models or starts servers: the end-to-end tier (`pytest -m "not slow"` skips it)
pytestmark = pytest.mark.slow

SUBJECTS = ["the cat", "the dog", "a bird", "my friend"]
ACTIONS = ["sat on the mat", "ran to the house", "ate the red apple", "looked at the tree"]


def story(rng: random.Random) -> str:
    return " . ".join(f"{rng.choice(SUBJECTS)} {rng.choice(ACTIONS)}" for _ in range(rng.randint(2, 5))) + " ."


def tiny_lm_config(dataset: str, steps: int = 60):
    return from_dict({
        "task": "lm", "name": "tiny-lm", "description": "test",
        "model": {"family": "decoder", "d_model": 48, "n_heads": 2, "n_layers": 2, "d_ff": 96, "max_len": 64,
                  "dropout": 0.0, "position": "learned", "scale_embedding": False},
        "data": {"dataset": dataset, "tokenizer": {"kind": "byte_bpe", "vocab_size": 300, "min_frequency": 1},
                 "seq_len": 32, "max_tokens": 512, "valid_size": 10, "test_size": 10},
        "optim": {"lr": 0.005, "warmup_steps": 10, "schedule": "constant", "betas": [0.9, 0.95]},
        "train": {"max_steps": steps, "precision": "fp32", "device": "cpu", "log_every": 20, "eval_every": 0,
                  "ckpt_every": 0, "label_smoothing": 0.0, "progress": False},
        "eval": {"samples": 1, "max_examples": 0},
    })


def train_tiny_lm(root, steps: int = 60):
    rng = random.Random(0)
    text = root / "stories.txt"
    text.write_text("\n\n".join(story(rng) for _ in range(300)) + "\n")
    run = root / "lm"
    cfg = tiny_lm_config(str(text), steps)
    summary = Trainer(cfg, build_task(cfg), RunDir(run)).fit()
    return run, summary


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    run, summary = train_tiny_lm(root)
    return root, run, summary


def test_run_dir_and_learning(trained):
    _, run, summary = trained
    for name in ("data.json", "summary.json", "model/model.safetensors", "model/config.json", "model/tokenizer.json"):
        assert (run / name).is_file(), name
    assert summary["main_metric"] == "ppl" and summary["test"]["tokens"] > 0
    # ~300 ids; the stories are 4 x 4 phrases, so a model that learnt them is far from uniform
    assert summary["valid"]["ppl"] < 6, summary["valid"]
    assert json.loads((run / "model" / "config.json").read_text())["task"] == "lm"


def test_generate_is_reproducible_and_echoes_prompt(trained, capsys):
    _, run, _ = trained
    args = ["generate", str(run / "model"), "--prompt", "the cat", "--max-new-tokens", "12", "--seed", "3"]
    outs = []
    for _ in range(2):
        assert main(args) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].startswith("the cat") and len(outs[0]) > len("the cat\n")
    assert any(a in outs[0] for a in ("sat", "ran", "ate", "looked")), outs[0]


def test_generate_reads_prompts_from_stdin(trained, capsys, monkeypatch):
    _, run, _ = trained
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"the dog\na bird\n")))
    assert main(["generate", str(run), "--max-new-tokens", "5", "--temperature", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("the dog") and lines[1].startswith("a bird")


def test_generate_cli_subprocess(trained):
    _, run, _ = trained
    proc = subprocess.run([sys.executable, "-m", "trainformer", "generate", str(run), "--prompt", "my friend",
                           "--max-new-tokens", "6", "--top-k", "5"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("my friend")


def test_generate_errors_are_one_line(trained, tmp_path, capsys):
    _, run, _ = trained
    assert main(["generate", str(run), "--prompt", "x", "--top-p", "0"]) == 2
    assert "--top-p" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "not found" in capsys.readouterr().err


def test_generate_truncates_long_prompt_with_warning(trained, capsys):
    _, run, _ = trained
    assert main(["generate", str(run), "--prompt", "the cat sat on the mat . " * 30, "--max-new-tokens", "4"]) == 0
    assert "only its last" in capsys.readouterr().err


def test_evaluate_text_file(trained, capsys):
    root, run, _ = trained
    rng = random.Random(1)
    good, noise = root / "good.txt", root / "noise.txt"
    good.write_text("\n\n".join(story(rng) for _ in range(20)) + "\n")
    noise.write_text("zq xv kj wp yy qz\n\nvv jj kk zz xx\n")
    scores = []
    for path in (good, noise):
        assert main(["evaluate", str(run), "--data", str(path), "--json"]) == 0
        scores.append(json.loads(capsys.readouterr().out))
    assert scores[0]["ppl"] < 6 < scores[1]["ppl"]
    assert scores[0]["documents"] == 20 and scores[0]["tokens"] > 100
