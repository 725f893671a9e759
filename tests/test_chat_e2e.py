"""Chat end to end: tiny LM pretraining -> DailyDialog fine-tuning (dedup, no resize) -> chat/evaluate CLIs."""

import io
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from trainformer.cli import main
from trainformer.config import from_dict
from trainformer.data.chat_template import CHAT_SPECIAL_TOKENS
from trainformer.data.tokenizer import train_tokenizer
from trainformer.errors import ConfigError
from trainformer.modeldir import load_model_dir, save_model_dir
from trainformer.models import build_model
from trainformer.rundir import RunDir
from trainformer.tasks import build_task
from trainformer.training.checkpoint import load_pretrained
from trainformer.training.trainer import Trainer

# trains models or starts servers: the end-to-end tier (`pytest -m "not slow"` skips it)
pytestmark = pytest.mark.slow

NAMES = ["tom", "anna", "li", "sara"]
PLACES = ["the park", "the bank", "the cinema", "school"]


def dialogue(rng: random.Random, greeting: str) -> str:
    name, place = rng.choice(NAMES), rng.choice(PLACES)
    turns = [f"{greeting} , what is your name ?", f"my name is {name} .", "where are you going ?",
             f"i ’ m going to {place} .", "have a nice day !", "thanks , you too !"]
    return " __eou__ ".join(turns[: rng.choice([2, 4, 6])]) + " __eou__"


def vary(line: str, change) -> str:
    """The same dialogue with `change` applied to each utterance (the __eou__ markers kept)."""
    utts = line.removesuffix(" __eou__").split(" __eou__ ")
    return " __eou__ ".join(change(u) for u in utts) + " __eou__"


def write_dailydialog(root):
    """Train 120 dialogues (+1 exact repeat); valid/test repeat 2/3 train dialogues (case, spaces changed)."""
    rng = random.Random(0)
    train = [dialogue(rng, f"hello {i}") for i in range(120)]
    train.append(train[5])
    valid = [dialogue(rng, f"hi {i}") for i in range(8)] + [vary(train[0], str.upper), vary(train[1], "  {} ".format)]
    test = [dialogue(rng, f"hey {i}") for i in range(8)] + [train[2], vary(train[3], str.title), train[4]]
    base = root / "dialogue" / "dailydialog"
    for name, lines in (("train", train), ("validation", valid), ("test", test)):
        (base / name).mkdir(parents=True)
        (base / name / f"dialogues_{name}.txt").write_text("\n".join(lines) + "\n")
    return base


def tiny_config(task: str, steps: int, **extra):
    return from_dict({
        "task": task, "name": f"tiny-{task}", "description": "test",
        "model": {"family": "decoder", "d_model": 48, "n_heads": 2, "n_layers": 2, "d_ff": 96, "max_len": 64,
                  "dropout": 0.0, "position": "learned", "scale_embedding": False},
        "data": {"dataset": "dailydialog", "tokenizer": {"kind": "byte_bpe", "vocab_size": 300, "min_frequency": 1},
                 "seq_len": 32, "max_len": 64, "max_tokens": 512, "valid_size": 5, "test_size": 5},
        "optim": {"lr": 0.005, "warmup_steps": 10, "schedule": "constant", "betas": [0.9, 0.95]},
        "train": {"max_steps": steps, "precision": "fp32", "device": "cpu", "log_every": 20, "eval_every": 0,
                  "ckpt_every": 0, "label_smoothing": 0.0, "progress": False},
        "eval": {"samples": 2, "max_examples": 0},
        **extra,
    })


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    mp = pytest.MonkeyPatch()
    data = root / "data"
    write_dailydialog(data)
    mp.setenv("TRAINFORMER_DATA", str(data))
    lm_cfg = tiny_config("lm", 40)
    Trainer(lm_cfg, build_task(lm_cfg), RunDir(root / "lm")).fit()
    chat_cfg = tiny_config("chat", 60, init_from=str(root / "lm" / "model"))
    task = build_task(chat_cfg)
    summary = Trainer(chat_cfg, task, RunDir(root / "chat")).fit()
    env = {**os.environ, "TRAINFORMER_DATA": str(data), "OMP_NUM_THREADS": "1"}
    yield root, task, summary, env
    mp.undo()


def test_dedup_counts_in_data_json(runs):
    root, _, _, _ = runs
    report = json.loads((root / "chat" / "data.json").read_text())
    assert report["overlap_with_train_removed"] == {"valid": 2, "test": 3}
    assert report["train_duplicates_removed"] == 1
    assert report["dialogues"] == {"train": 120, "valid": 8, "test": 8}
    assert report["vocab_resized_from"] is None  # lm-pretrain reserved the markers


def test_fine_tuning_reuses_tokenizer_and_shape_and_learns(runs):
    root, task, summary, _ = runs
    lm = load_model_dir(root / "lm" / "model")
    chat = load_model_dir(root / "chat" / "model")
    assert (root / "chat/model/tokenizer.json").read_text() == (root / "lm/model/tokenizer.json").read_text()
    assert chat.cfg.model.vocab_size == lm.cfg.model.vocab_size and chat.cfg.model.d_model == 48
    with torch.no_grad():
        before = task.evaluate(lm.model, "valid")
    after = summary["valid"]
    assert after["ppl"] < 0.7 * before["ppl"], (before, after)  # assistant turns got much likelier
    assert {"distinct_1", "distinct_2"} <= set(after) and summary["test"]["tokens"] > 0


def test_repl_subprocess_commands_and_exit(runs):
    root, _, _, env = runs
    stdin = "hello , what is your name ?\n\n/reset\nwhere are you going ?\n/exit\nnever answered\n"
    proc = subprocess.run([sys.executable, "-m", "trainformer", "chat", str(root / "chat"), "--max-new-tokens", "12",
                           "--seed", "1"], input=stdin, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 2  # two messages, two replies; empty line ignored


def test_chat_stdin_eof_prompt_and_seed(runs, capsys, monkeypatch):
    root, _, _, _ = runs
    model = str(root / "chat" / "model")
    outs = []
    for _ in range(2):  # Ctrl-D / end of input without /exit: status 0
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"hello , what is your name ?\n")))
        assert main(["chat", model, "--seed", "7", "--max-new-tokens", "12", "--no-history"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and len(outs[0].splitlines()) == 1
    assert main(["chat", model, "--prompt", "hello, what is your name?", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("my name is")  # greedy: the learnt answer


def test_chat_rejects_lm_model(runs, capsys):
    root, _, _, _ = runs
    assert main(["chat", str(root / "lm"), "--prompt", "hi"]) == 2
    assert "expected 'chat'" in capsys.readouterr().err


def test_evaluate_dailydialog_file(runs, capsys):
    root, _, summary, _ = runs
    test_file = root / "data/dialogue/dailydialog/test/dialogues_test.txt"
    assert main(["evaluate", str(root / "chat"), "--data", str(test_file), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["dialogues"] == 11 and metrics["ppl"] < 10 and metrics["tokens"] > summary["test"]["tokens"]


def test_init_from_without_markers_grows_embedding(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINFORMER_DATA", str(tmp_path / "data"))
    write_dailydialog(tmp_path / "data")
    tok = train_tokenizer(["hello , what is your name ?", "my name is tom ."] * 10,
                          tiny_config("lm", 1).data.tokenizer)
    lm_cfg = tiny_config("lm", 1)
    lm_cfg.model.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    pre = build_model(lm_cfg.model)
    save_model_dir(pre, lm_cfg, tmp_path / "old")
    tok.save(tmp_path / "old" / "tokenizer.json")
    task = build_task(tiny_config("chat", 1, init_from=str(tmp_path / "old")))
    task.setup(None)
    assert task.pretrained_vocab == tok.vocab_size
    assert task.tokenizer.vocab_size == tok.vocab_size + len(CHAT_SPECIAL_TOKENS)
    model = task.build_model()
    missing, _ = load_pretrained(model, tmp_path / "old")  # what the trainer does next
    assert missing == ["tok_embed.weight"]  # only the grown table, whose old rows build_model copied
    old, new = pre.tok_embed.weight, model.tok_embed.weight
    assert torch.equal(new[: len(old)], old) and new.shape[0] == len(old) + 4
    assert torch.equal(model.layers[0].ffn.up.weight, pre.layers[0].ffn.up.weight)


def test_init_from_must_be_a_decoder_lm(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINFORMER_DATA", str(tmp_path / "data"))
    write_dailydialog(tmp_path / "data")
    cfg = from_dict({"task": "translation", "model": {"vocab_size": 100}})
    save_model_dir(build_model(cfg.model), cfg, tmp_path / "mt")
    with pytest.raises(ConfigError, match="init_from"):
        build_task(tiny_config("chat", 1, init_from=str(tmp_path / "mt"))).setup(None)
