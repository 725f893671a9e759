"""The performance suite's pure pieces: FLOP/MFU arithmetic, timing helpers, report writer, CLI smoke;
the benchmark scripts' imports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trainformer.bench.decode import source_batches
from trainformer.bench.memory import PeakMemory, RssProbe
from trainformer.bench.models import FAMILIES, Shape, bench_family, ours, train_flops
from trainformer.bench.peak import gemm_flops, mfu_peak
from trainformer.bench.report import markdown, write_report
from trainformer.bench.suite import SECTIONS, Options, parse_only, parse_train_models, train_models
from trainformer.bench.timing import interleaved, summarize
from trainformer.cli import main
from trainformer.errors import UserError
from trainformer.models import count_parameters
from trainformer.training import throughput
from trainformer.training.precision import cpu_has_fast_bf16
from trainformer.training.throughput import mfu


def test_train_flops_decoder_counts_6nd_plus_attention():
    # Training FLOPs = 6 x (non-embedding matmul params + LM head) per token + attention (PaLM app. B).
    s = Shape(layers=2, d=32, heads=2, d_ff=64, vocab=100, batch=3, seq=16)
    model = ours("decoder", s)
    layer_matmul = 4 * s.d * s.d + 2 * s.d * s.d_ff  # q, k, v, out + two FFN matrices
    head = s.d * s.vocab
    per_token = 6 * (s.layers * layer_matmul + head) + 3 * s.layers * 4 * s.seq * s.d
    assert train_flops("decoder", s) == pytest.approx(per_token * s.batch * s.seq)
    # the counted matmul weights are (almost) all of the model's non-embedding parameters
    weights = count_parameters(model, exclude_embeddings=True)
    assert s.layers * layer_matmul <= weights < s.layers * layer_matmul * 1.1


def test_train_flops_encoder_decoder_exceeds_two_stacks():
    s = Shape(layers=1, d=16, heads=2, d_ff=32, vocab=50, batch=2, seq=8)
    enc_dec, dec = train_flops("encoder_decoder", s), train_flops("decoder", s)
    # encoder + decoder + cross-attention > the decoder stack alone plus another one without head
    assert enc_dec > 2 * dec - 3 * 2 * s.d * s.vocab * s.batch * s.seq
    assert train_flops("encoder", s) == pytest.approx(dec + 3 * s.batch * s.seq * 2 * s.d * s.d)


def test_mfu_arithmetic_and_peak_choice():
    # 1e9 FLOPs per token at 50 tokens/s on a 100 GFLOP/s peak = 50% MFU
    assert mfu(1e9, 50.0, 100e9) == pytest.approx(0.5)
    assert mfu(1e9, 50.0, None) is None
    measured = {"measured": {"bf16": 2e12, "fp32": 1e12}}
    assert mfu_peak(measured, "fp32") == 1e12
    # a known GPU's spec sheet wins over the measured GEMM
    assert mfu_peak({**measured, "spec": {"bf16": 989e12, "fp32": None}}, "bf16") == 989e12
    assert mfu_peak({**measured, "spec": {"bf16": 989e12, "fp32": None}}, "fp32") == 1e12


def test_bench_family_figures_are_consistent():
    s = Shape(layers=1, d=32, heads=2, d_ff=64, vocab=128, batch=2, seq=16)
    r = bench_family("decoder", s, steps=2, warmup=1, device=torch.device("cpu"), precision="fp32", peak=1e9)
    for k in ("ours", "hf"):
        side = r[k]
        assert len(side["steps_s"]) == 2 and side["min_s"] <= side["median_s"] <= side["max_s"]
        assert side["tokens_per_s"] == pytest.approx(s.batch * s.seq / side["median_s"])
        assert side["mfu"] == pytest.approx(train_flops("decoder", s) / side["median_s"] / 1e9)
        assert "peak_mem_mb" not in side  # memory=False: not measured, not invented
    assert r["speedup"] == pytest.approx(r["hf"]["median_s"] / r["ours"]["median_s"])
    assert r["ours"]["params"] == count_parameters(ours("decoder", s))


def test_cpu_peak_keeps_the_best_reading_across_runs(monkeypatch, tmp_path):
    """A start-up disturbed by another process must not lower the MFU denominator."""
    monkeypatch.setenv("TRAINFORMER_CACHE", str(tmp_path))  # not the readings other tests stored
    readings = iter([50e9, 20e9, 80e9])
    monkeypatch.setattr(throughput, "measure_matmul_flops", lambda dtype, threads, seconds: next(readings))
    assert throughput.cpu_peak_flops(torch.float32, 2) == 50e9
    assert throughput.cpu_peak_flops(torch.float32, 2) == 50e9  # the disturbed 20e9 is ignored
    assert throughput.cpu_peak_flops(torch.float32, 2) == 80e9
    monkeypatch.setattr(throughput, "measure_matmul_flops", lambda dtype, threads, seconds: 10e9)
    assert throughput.cpu_peak_flops(torch.float32, 1) == 10e9  # keyed by thread count
    assert throughput.cpu_peak_flops(torch.bfloat16, 2) == 10e9  # and by dtype


def test_gemm_flops_positive_for_non_square():
    assert gemm_flops(torch.device("cpu"), 64, 32, 48, torch.float32, reps=2) > 0


def test_interleaved_alternates_and_drops_warmup():
    calls: list[str] = []

    def run(name: str, value: float):
        def f() -> float:
            calls.append(name)
            return value + len(calls)
        return f

    warm: dict = {}
    times = interleaved({"a": run("a", 0.0), "b": run("b", 100.0)}, steps=2, warmup=1, warmup_out=warm)
    assert calls == ["a", "b", "a", "b", "a", "b"]
    assert times == {"a": [3.0, 5.0], "b": [104.0, 106.0]}  # warm-up calls (1, 2) dropped
    assert warm == {"a": [1.0], "b": [102.0]}
    assert summarize([3.0, 1.0, 2.0]) == {"median_s": 2.0, "min_s": 1.0, "max_s": 3.0}
    with pytest.raises(ValueError):
        summarize([])


class _FakeProbe:
    def start(self) -> float:
        return 100.0

    def peak(self) -> float:
        return 164.0


def test_peak_memory_uses_rss_only_in_fresh_process():
    with PeakMemory(torch.device("cpu"), _FakeProbe()) as mem:
        pass
    assert mem.mb == 64.0
    with PeakMemory(torch.device("cpu"), None) as mem:
        pass
    assert mem.mb is None  # not measurable in a shared process: reported as n/a


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_rss_probe_sees_a_large_allocation():
    probe = RssProbe()
    with PeakMemory(torch.device("cpu"), probe) as mem:
        x = torch.ones(64 * 1024 * 1024 // 4)  # 64 MB, touched
        del x
    assert 48 <= mem.mb < 1024  # the high-water mark rose by about the tensor's size


def test_source_batches_are_sorted_padded_and_masked():
    batches = source_batches(10, 4, vocab=50, seed=1)
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    lengths = [int(m.sum(1).max()) for _, m in batches]
    assert lengths == sorted(lengths) and all(6 <= n <= 24 for n in lengths)
    for ids, mask in batches:
        assert ids.shape == mask.shape
        assert (ids[~mask] == 0).all() and (ids[mask] >= 2).all()


def test_parse_only():
    assert parse_only(None) == SECTIONS
    assert parse_only("peak, train") == ("peak", "train")
    with pytest.raises(UserError, match="peek"):
        parse_only("peak,peek")


def test_train_models_choose_and_order_the_rows():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [f for _, f, _ in train_models(Options(), cpu)] == list(FAMILIES)
    assert [label for label, _, _ in train_models(Options(), cuda)][-1].startswith("decoder (GPT-2 small")
    assert len(train_models(Options(quick=True), cuda)) == 3  # no GPT-2 small in a smoke run
    chosen = Options(train_models=parse_train_models("gpt2-small, encoder"))
    assert [(f, s.layers) for _, f, s in train_models(chosen, cpu)] == [("decoder", 12), ("encoder", 6)]
    with pytest.raises(UserError, match="gpt3"):
        parse_train_models("decoder,gpt3")
    wide = Options(train_models=("gpt2-small",), train_batch=32)
    assert [(s.batch, s.seq) for _, _, s in train_models(wide, cpu)] == [(32, 1024)]


def test_train_section_emits_each_row_as_it_is_measured(monkeypatch):
    import trainformer.bench.suite as suite

    calls = []
    monkeypatch.setattr(suite, "bench_family", lambda family, shape, *a: {"family": family, "args": a})
    o = Options(train_models=("encoder", "decoder"))
    peaks = {"measured": {"fp32": 2.0}, "spec": {"fp32": 3.0}}
    rows = suite._train(o, torch.device("cpu"), "fp32", peaks, emit=lambda r: calls.append(len(r)))
    assert calls == [1, 2] and [r["family"] for r in rows] == ["encoder", "decoder"]
    assert rows[0]["args"][-5:] == (3.0, False, True, 2.0, "sdpa")  # spec peak for MFU, measured beside it; peer attention


def _fake_results() -> dict:
    side = {"median_s": 0.5, "min_s": 0.4, "max_s": 0.6, "tokens_per_s": 2048.0, "mfu": 0.25, "params": 10}
    return {
        "env": {"date": "2026-01-01", "device": "cpu", "precision": "fp32", "threads": 2, "git_commit": "abc",
                "hardware": {"cpu": "Test CPU", "cpu_count": 2}, "versions": {"torch": "9.9"}},
        "notes": ["a note"],
        "peak": {"gemms": [{"precision": "fp32", "shape": "square 8", "m": 8, "k": 8, "n": 8, "flops": 5e10}],
                 "measured": {"fp32": 5e10}, "notes": []},
        "train": [{"family": "decoder", "ours": {**side, "peak_mem_mb": 123.0},
                   "hf": {**side, "median_s": 1.0, "mfu": 0.125}, "speedup": 2.0}],
        "realdata": {"skipped": "shared data absent"},
        "decode": {"error": "RuntimeError: boom"},
        "scaling": {"seq": [{"seq": q, "batch": 1, "checkpointing": c, "tokens_per_s": 100.0 / q,
                             "peak_mem_mb": None if c else float(q)} for q in (64, 128) for c in (False, True)],
                    "batch": [{"seq": 64, "batch": b, "checkpointing": False, "tokens_per_s": 10.0 * b,
                               "peak_mem_mb": None} for b in (1, 2)]},
    }


def test_report_writes_json_markdown_and_plots(tmp_path):
    results = _fake_results()
    paths = write_report(results, tmp_path / "out")
    assert json.loads(paths["json"].read_text()) == results
    md = paths["markdown"].read_text()
    assert "2026-01-01" in md and "Test CPU" in md and "torch 9.9" in md and "a note" in md
    assert "| fp32 | square 8 | 50.0 |" in md
    row = next(line for line in md.splitlines() if line.startswith("| decoder"))
    assert "2.00x" in row and "25.0%" in row and "12.5%" in row and "123" in row and "n/a" in row
    assert "spec-sheet" not in md and "warm-up" not in md
    results["train"][0]["ours"] |= {"mfu_measured": 0.5, "warmup_s": [30.0, 0.6]}
    assert "warm-up" not in markdown(results)  # not compiled: a slow first step is no compile time
    results["train"][0]["compiled"] = True
    md = markdown(results)
    assert "25.0% (50.0%)" in md and "spec-sheet" in md and "decoder ours 30 s, HF 0 s" in md
    assert "skipped: shared data absent" in md
    assert "failed: RuntimeError: boom" in md
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert pngs == ["scaling_batch.png", "scaling_seq.png"]
    assert all((tmp_path / "out" / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_markdown_has_no_section_for_what_was_not_run():
    results = _fake_results()
    for k in ("train", "realdata", "decode", "scaling"):
        del results[k]
    md = markdown(results)
    assert "Matmul peak" in md and "Training step" not in md and "Decoding" not in md


def test_cli_quick_peak_writes_sane_json(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--quick", "--only", "peak", "--out", str(out)]) == 0
    data = json.loads((out / "bench.json").read_text())
    assert set(data) >= {"env", "peak", "notes"} and "train" not in data
    peak = data["peak"]
    assert {g["precision"] for g in peak["gemms"]} == {"fp32", "bf16"}
    assert all(g["flops"] > 1e6 for g in peak["gemms"])  # at least a MFLOP/s: a real measurement
    for prec in ("fp32", "bf16"):
        assert peak["measured"][prec] == max(g["flops"] for g in peak["gemms"] if g["precision"] == prec)
    if not cpu_has_fast_bf16():
        assert data["env"]["precision"] == "fp32"
        assert any("bf16" in n for n in data["notes"])
    assert "Matmul peak" in (out / "bench.md").read_text()
    assert "Matmul peak" in capsys.readouterr().out


def test_allocator_option_is_recorded_and_applies_to_the_whole_process(tmp_path, monkeypatch):
    """--allocator keep-freed applies `keep_freed_memory` (ours and the peers share the process)
    and says so in the report; any MALLOC_* setting of the environment is recorded either way."""
    import trainformer.bench.suite as suite

    applied = []
    monkeypatch.setattr(suite, "keep_freed_memory", lambda: applied.append(True) or True)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    out = tmp_path / "bench"
    assert main(["bench", "--quick", "--only", "peak", "--allocator", "keep-freed", "--out", str(out)]) == 0
    data = json.loads((out / "bench.json").read_text())
    assert applied == [True] and data["options"]["allocator"] == "keep-freed"
    assert "environment sets MALLOC_ARENA_MAX=2" in data["notes"]
    assert any(n.startswith("allocator: freed memory kept") for n in data["notes"])
    assert suite._allocator_notes("default", torch.device("cpu")) == ["environment sets MALLOC_ARENA_MAX=2"]
    assert len(applied) == 1  # the default leaves the allocator alone


def test_cli_rejects_unknown_section(tmp_path, capsys):
    assert main(["bench", "--only", "peek", "--out", str(tmp_path)]) == 2
    assert "--only" in capsys.readouterr().err


def test_peer_schedule_decays_to_zero_where_the_budget_ends():
    from trainformer.bench.peer import BudgetedLinearSchedule

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = BudgetedLinearSchedule(opt, warmup=4, minutes=1.0, probe=6)
    lrs = []
    for step in range(1, 40):
        opt.step()
        sched.step(train_s=2.0 * step)  # 2 s per step: a 60 s budget is 30 steps
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]  # HF's warm-up: lr 0 at step 0
    assert sched.total == 30
    assert lrs[28] == pytest.approx(1 / 26) and lrs[29:] == [0.0] * 10


def test_spread_by_length_covers_short_to_long():
    from trainformer.bench.testset import spread_by_length

    items = [("x" * n) for n in (5, 1, 9, 3, 7, 2, 8, 4, 6)]
    picked = spread_by_length(items, 3)
    assert [len(s) for s in picked] == [1, 5, 9]  # the shortest, the middle, the longest
    assert spread_by_length(items, 20) == sorted(items, key=len)


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script", sorted(BENCHMARKS.glob("*/*.py")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_benchmark_scripts_import_only_what_exists(script):
    """Scripts run as files from any group folder: no imports of a sibling script (which
    only its own folder's sys.path entry would find), and every trainformer name they
    import at the top exists (a rename in the package breaks no script unnoticed)."""
    import ast
    import importlib

    siblings = {p.stem for p in BENCHMARKS.rglob("*.py")}
    for node in ast.parse(script.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            modules = [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules = [(node.module, [a.name for a in node.names])]
        else:
            continue
        for module, names in modules:
            assert module.split(".")[0] not in siblings, f"{script.name} imports the script {module}"
            if module.startswith("trainformer"):
                imported = importlib.import_module(module)
                package = hasattr(imported, "__path__")
                missing = [n for n in names if not hasattr(imported, n)
                           and not (package and importlib.util.find_spec(f"{module}.{n}"))]
                assert not missing, f"{script.name}: {module} has no {missing}"


def test_in_fresh_processes_runs_every_block_in_its_own_process_and_raises_its_errors():
    """The A/B frame of bench_allocator: every (round, variant) block in a new process,
    results kept per variant in order; a job's error reaches the caller."""
    import os
    import time
    from functools import partial

    from trainformer.bench.recipe_steps import in_fresh_processes

    variants = {"a": partial(time.sleep, 0), "b": partial(time.sleep, 0)}
    pids = in_fresh_processes(os.getpid, variants, rounds=1)
    assert list(pids) == ["a", "b"] and all(len(v) == 1 for v in pids.values())
    assert len({p for v in pids.values() for p in v} | {os.getpid()}) == 3
    with pytest.raises(ValueError):
        in_fresh_processes(partial(int, "not a number"), {"a": partial(time.sleep, 0)}, rounds=1)
