"""The run directory: everything one training run leaves behind.

    RUN_DIR/
      config.yaml      the resolved config
      env.json         git commit, package versions, hardware, seed
      metrics.jsonl    one JSON object per logged step or evaluation
      summary.json     final metrics, wall time, tokens/s
      checkpoints/     step-N/ folders (model.safetensors, state.pt, ...)
      model/           the final model: model.safetensors, config.json, tokenizer.json
      plots/           PNG curves of loss and metrics

Only rank 0 writes (callers check `is_main`).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from trainformer.config import Config, save_config
from trainformer.paths import REPO_ROOT


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary name, flush to disk, then rename over `path`."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The instruction sets that decide CPU speed here: bf16 is emulated without avx512_bf16 (or AMX),
# int8 GEMMs are only fast with VNNI (or AMX).
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")


def cpu_flags() -> list[str]:
    """Which of `SPEED_FLAGS` this CPU has (from /proc/cpuinfo; empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in SPEED_FLAGS if f in have]
    except OSError:
        pass
    return []


def hardware() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "cpu_flags": cpu_flags(),
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def machine_line(hw: dict[str, Any] | None = None) -> str:
    """One line for a benchmark report: CPU, cores and the speed flags (see `SPEED_FLAGS`)."""
    hw = hw or hardware()
    flags = " ".join(hw.get("cpu_flags") or []) or "unknown"
    gpus = f", GPUs: {', '.join(hw['gpus'])}" if hw.get("gpus") else ""
    return f"{hw.get('cpu')}, {hw.get('cpu_count')} cores, CPU flags: {flags}{gpus}"


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("trainformer", "torch", "tokenizers", "safetensors", "sacrebleu", "numpy", "transformers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


@dataclass
class RunDir:
    path: Path
    is_main: bool = True

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    def create(self, cfg: Config) -> RunDir:
        if self.is_main:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.path / "config.yaml")
            env = {
                "git_commit": git_commit(),
                "versions": package_versions(),
                "hardware": hardware(),
                "seed": cfg.train.seed,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            atomic_write_text(self.path / "env.json", json.dumps(env, indent=2) + "\n")
        return self

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON object to metrics.jsonl (flushed at once: nothing lost on a kill)."""
        if not self.is_main:
            return
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=float) + "\n")
            f.flush()

    def read_metrics(self) -> list[dict[str, Any]]:
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
        return rows

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.is_main:
            atomic_write_text(self.path / "summary.json", json.dumps(summary, indent=2, default=float) + "\n")
