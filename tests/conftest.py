import pytest
import torch

# Tests use tiny models: on one thread they run faster than on two (thread hand-offs
# cost more than the matmuls), and two test processes do not fight over cores.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test starts on the one thread set above: a run inside a test that sets its own
    (`train.threads`) does not carry it into the tests after it."""
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Caches go to a temp folder so tests never touch ~/.cache."""
    monkeypatch.setenv("TRAINFORMER_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
