import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Caches go to a temp folder so tests never touch ~/.cache."""
    monkeypatch.setenv("TRAINFORMER_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
