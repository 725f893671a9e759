"""The CLI meets user mistakes with one line and exit status 2, never a traceback."""

import subprocess
import sys

import pytest

from trainformer.cli import main


def run_cli(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "trainformer", *args],
        capture_output=True, text=True, input=stdin, timeout=120,
    )


def run_main(capsys, *args) -> subprocess.CompletedProcess:
    """`main(args)` in this process (argparse's exits included), as run_cli would report it:
    the same code as ``python -m trainformer`` without a second interpreter's start-up."""
    try:
        code = main(list(args))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def assert_user_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("trainformer") and "error" in lines[-1], proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr


def test_help_lists_commands():
    proc = run_cli("--help")  # the one fast test through `python -m trainformer` itself
    assert proc.returncode == 0
    for verb in ("train", "recipes"):
        assert verb in proc.stdout


def test_unknown_command_is_exit_2(capsys):
    assert_user_error(run_main(capsys, "trian"))


def test_recipes_lists_builtins(capsys):
    assert main(["recipes"]) == 0
    assert "translate-en-fr" in capsys.readouterr().out


def test_bad_override_key_is_one_line(capsys):
    assert main(["recipes", "translate-en-fr", "--set", "optim.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "optim.lrr" in err and "did you mean 'optim.lr'" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_bad_value_and_missing_recipe_in_subprocess(tmp_path):
    assert_user_error(run_cli("recipes", "translate-en-fr", "--set", "optim.lr=-1"), "optim.lr")
    assert_user_error(run_cli("recipes", str(tmp_path / "nope.yaml")), "nope.yaml")


def test_debug_shows_traceback(capsys):
    proc = run_main(capsys, "--debug", "recipes", "translate-en-fr", "--set", "optim.lr=-1")
    assert proc.returncode == 2 and "Traceback" in proc.stderr


@pytest.mark.parametrize("verb", ["train", "recipes"])
def test_each_verb_has_help(verb, capsys):
    proc = run_main(capsys, verb, "--help")
    assert proc.returncode == 0 and "usage" in proc.stdout
