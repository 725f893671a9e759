"""The suite's output: one JSON file, a Markdown summary and PNG plots of the scaling curves."""

from __future__ import annotations

import json
import time
from pathlib import Path

from trainformer.rundir import atomic_write_text, git_commit, hardware, package_versions


def environment(device: str, precision: str, threads: int) -> dict:
    """Date, machine, library versions and run settings, written beside the figures."""
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": device, "precision": precision,
            "threads": threads, "git_commit": git_commit(), "hardware": hardware(),
            "versions": package_versions()}


def _fmt(x: float | None, spec: str = ".3f", scale: float = 1.0, suffix: str = "") -> str:
    """A number for a table cell; 'n/a' for None (a figure we could not measure)."""
    return "n/a" if x is None else f"{x * scale:{spec}}{suffix}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows), ""]


def _peak_md(p: dict) -> list[str]:
    rows = [[g["precision"], g["shape"], _fmt(g["flops"], ".1f", 1e-9)] for g in p["gemms"]]
    lines = ["## Matmul peak (MFU denominator)", "", *_table(["precision", "GEMM", "GFLOP/s"], rows)]
    if p.get("spec"):
        spec = ", ".join(f"{k} {_fmt(v, '.0f', 1e-12)} TFLOP/s" for k, v in p["spec"].items())
        lines += [f"GPU spec peak (dense): {spec}", ""]
    return lines + [f"- {n}" for n in p.get("notes", [])] + [""]


def _mfu_cell(side: dict) -> str:
    """'41.0%', or '41.0% (51.5%)' where a spec peak was used and the measured one differs."""
    cell = _fmt(side["mfu"], ".1%")
    return cell + (f" ({_fmt(side['mfu_measured'], '.1%')})" if "mfu_measured" in side else "")


def _train_md(results: list[dict]) -> list[str]:
    rows = []
    for r in results:
        o, h = r["ours"], r["hf"]
        rows.append([r["family"], f"{_fmt(o['median_s'])} ({_fmt(o['min_s'])}-{_fmt(o['max_s'])})",
                     f"{_fmt(h['median_s'])} ({_fmt(h['min_s'])}-{_fmt(h['max_s'])})",
                     _fmt(o["tokens_per_s"], ".0f"), _fmt(r["speedup"], ".2f", suffix="x"),
                     _mfu_cell(o), _mfu_cell(h),
                     _fmt(o.get("peak_mem_mb"), ".0f"), _fmt(h.get("peak_mem_mb"), ".0f")])
    header = ["family", "ours step s (min-max)", "HF step s (min-max)", "ours tok/s", "ours/HF speed",
              "ours MFU", "HF MFU", "ours mem MB", "HF mem MB"]
    lines = ["## Training step, ours vs Hugging Face", "", *_table(header, rows)]
    if any("mfu_measured" in r["ours"] for r in results):
        lines += ["MFU against the GPU's spec-sheet peak; in brackets against the best GEMM measured "
                  "in this run.", ""]
    if any(r.get("compiled") for r in results):  # compiling happens in the first steps
        warm = [(r["family"], max(r["ours"].get("warmup_s") or [0]), max(r["hf"].get("warmup_s") or [0]))
                for r in results]
        lines += ["Slowest warm-up step (includes torch.compile): " + "; ".join(
            f"{f} ours {a:.0f} s, HF {b:.0f} s" for f, a, b in warm), ""]
    return lines


def _realdata_md(r: dict) -> list[str]:
    if "skipped" in r:
        return ["## Real-data translation throughput", "", f"skipped: {r['skipped']}", ""]
    rows = [[k, _fmt(r[k]["useful_tokens_per_s"], ".0f"), _fmt(r[k]["median_s"]),
             _fmt(r[k].get("mean_sentences"), ".0f"), _fmt(r[k].get("tgt_padding_fraction"), ".1%")]
            for k in ("ours", "hf_typical")]
    header = ["batches", "useful tgt tok/s", "median step s", "sentences/batch", "tgt padding"]
    return ["## Real-data translation throughput (useful target tokens/s)", "", *_table(header, rows),
            f"ours / HF-typical: {r['speedup']:.2f}x", ""]


def _decode_md(d: dict) -> list[str]:
    rows = []
    for name in ("greedy", "beam4"):
        if name in d.get("translation", {}):
            r = d["translation"][name]
            rows.append([f"translate {name}", _fmt(r["ours"]["sentences_per_s"], ".1f"),
                         _fmt(r["hf"]["sentences_per_s"], ".1f"), _fmt(r["ours"]["tokens_per_s"], ".0f"),
                         _fmt(r["hf"]["tokens_per_s"], ".0f"), _fmt(r["speedup"], ".2f", suffix="x")])
    if "chat" in d:
        c = d["chat"]
        rows.append(["chat sampling, batch 1", "-", "-", _fmt(c["ours"]["tokens_per_s"], ".0f"),
                     _fmt(c["hf"]["tokens_per_s"], ".0f"), _fmt(c["speedup"], ".2f", suffix="x")])
    note = d.get("translation", {}).get("equal_length", "")
    return ["## Decoding", "", *_table(["mode", "ours sent/s", "HF sent/s", "ours tok/s", "HF tok/s",
                                        "ours/HF speed"], rows), f"output length: {note}", ""]


def _scaling_md(s: dict) -> list[str]:
    lines = ["## Scaling (our decoder)", ""]
    rows = [[str(p["seq"]), str(p["batch"]), "yes" if p["checkpointing"] else "no",
             _fmt(p["tokens_per_s"], ".0f"), _fmt(p["peak_mem_mb"], ".0f")] for p in s.get("seq", [])]
    rows += [[str(p["seq"]), str(p["batch"]), "no", _fmt(p["tokens_per_s"], ".0f"),
              _fmt(p["peak_mem_mb"], ".0f")] for p in s.get("batch", [])]
    lines += _table(["seq", "batch", "act. ckpt", "tok/s", "peak mem MB"], rows)
    if "ddp" in s:
        d = s["ddp"]
        lines += [f"DDP (gloo, CPU, {d['cores']} cores): 1 process {d['1proc']['tokens_per_s']:.0f} tok/s, "
                  f"2 processes {d['2proc']['tokens_per_s']:.0f} tok/s ({d['scaling']:.2f}x)", ""]
    return lines


SECTIONS = {"peak": _peak_md, "train": _train_md, "realdata": _realdata_md, "decode": _decode_md,
            "scaling": _scaling_md}


def markdown(results: dict) -> str:
    """The Markdown report of a suite result (`suite.run_suite`): environment, then one table per section."""
    env = results["env"]
    hw = env["hardware"]
    lines = ["# trainformer bench", "",
             f"- date: {env['date']}", f"- machine: {hw.get('cpu') or hw.get('processor')}, "
             f"{hw.get('cpu_count')} CPUs{', GPUs: ' + ', '.join(hw['gpus']) if hw.get('gpus') else ''}",
             f"- CPU flags: {' '.join(hw.get('cpu_flags') or []) or 'not recorded'} (avx512_bf16: native bf16; "
             "avx512_vnni / amx: fast int8)",
             f"- device: {env['device']}, precision: {env['precision']}, threads: {env['threads']}",
             f"- versions: {', '.join(f'{k} {v}' for k, v in env['versions'].items())}",
             f"- git commit: {env['git_commit']}",
             f"- peak memory: {results.get('memory_method', 'n/a')}", ""]
    lines += [f"- note: {n}" for n in results.get("notes", [])] + [""]
    for name, fn in SECTIONS.items():
        section = results.get(name)
        if isinstance(section, dict) and "error" in section:
            lines += [f"## {name}", "", f"failed: {section['error']}", ""]
        elif section is not None:
            lines += fn(section)
    return "\n".join(lines)


def plot_scaling(scaling: dict, out_dir: Path) -> list[Path]:
    """PNG plots of tokens/s and peak memory against sequence length, and tokens/s against batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if scaling.get("seq"):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ckpt in (False, True):
            pts = [p for p in scaling["seq"] if p["checkpointing"] == ckpt]
            label = "activation checkpointing" if ckpt else "plain"
            axes[0].plot([p["seq"] for p in pts], [p["tokens_per_s"] for p in pts], marker="o", label=label)
            mem = [(p["seq"], p["peak_mem_mb"]) for p in pts if p["peak_mem_mb"] is not None]
            if mem:
                axes[1].plot(*zip(*mem), marker="o", label=label)
        for ax, ylabel in zip(axes, ("tokens/s", "peak memory (MB)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length")
            ax.set_ylabel(ylabel)
            ax.legend()
        written.append(_save(fig, out_dir / "scaling_seq.png"))
    if scaling.get("batch"):
        fig, ax = plt.subplots(figsize=(5, 4))
        pts = scaling["batch"]
        ax.plot([p["batch"] for p in pts], [p["tokens_per_s"] for p in pts], marker="o")
        ax.set_xlabel("batch size")
        ax.set_ylabel("tokens/s")
        written.append(_save(fig, out_dir / "scaling_batch.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(results: dict, out_dir: Path) -> dict[str, Path]:
    """Write bench.json, bench.md and the scaling PNGs into `out_dir`; returns name -> path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "bench.json", "markdown": out_dir / "bench.md"}
    atomic_write_text(paths["json"], json.dumps(results, indent=2, default=str) + "\n")
    atomic_write_text(paths["markdown"], markdown(results) + "\n")
    scaling = results.get("scaling")
    if isinstance(scaling, dict) and "error" not in scaling:
        for i, p in enumerate(plot_scaling(scaling, out_dir)):
            paths[f"plot{i}"] = p
    return paths


def write_table_report(out_dir: Path, stem: str, results: dict, title: str, intro: list[str],
                       header: list[str], rows: list[list[str]]) -> str:
    """OUT/STEM.json (`results`) and OUT/STEM.md (title, intro lines, one table) for a
    single-table benchmark script; returns the Markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / f"{stem}.json", json.dumps(results, indent=1, default=str) + "\n")
    text = "\n".join([f"# {title}", "", *intro, "", *_table(header, rows)])
    atomic_write_text(out_dir / f"{stem}.md", text)
    return text
