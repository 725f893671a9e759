"""The same behaviour on a CUDA device: blocks, families, generation, the trainer, resume, compile.

Skipped where no GPU is visible (CI). Run them on a GPU machine with
``pytest -m gpu``; `benchmarks/speed/gpu.sh` runs them before the benchmark.
TF32 is switched off wherever outputs are compared with fp32 references.
"""

import os

import pytest
import torch
from safetensors.torch import load_file

from helpers_toy import ToyTask, toy_config
from trainformer.bench.models import FAMILIES, Shape, _batch, make_step, ours
from trainformer.config import ModelConfig
from trainformer.generation import beam_translate, greedy_translate
from trainformer.generation.sampling import generate
from trainformer.modeldir import load_model_dir
from trainformer.models import build_model
from trainformer.nn import MultiHeadAttention, init_weights, key_padding_mask, reference_attention
from trainformer.rundir import RunDir
from trainformer.training.trainer import Trainer

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")
# cuBLAS is deterministic only with a fixed workspace, set before its first use (resume test).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@pytest.fixture(autouse=True)
def _exact_fp32():
    """No TF32 in comparisons; restore whatever was set before."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def tiny(family: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    base = dict(vocab_size=24, d_model=32, n_heads=4, n_layers=2, d_ff=64, max_len=48, dropout=0.0,
                init_std=0.3, tie_embeddings=False)
    return build_model(ModelConfig(family=family, **{**base, **kw})).eval()


def sources(device) -> tuple[torch.Tensor, torch.Tensor]:
    src = torch.randint(3, 24, (3, 7), generator=torch.Generator().manual_seed(0))  # (B, S)
    lengths = torch.tensor([7, 4, 6])
    mask = torch.arange(7)[None, :] < lengths[:, None]  # (B, S)
    return src.masked_fill(~mask, 0).to(device), mask.to(device)


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_on_cuda_matches_the_reference_in_bf16(causal):
    torch.manual_seed(0)
    m = MultiHeadAttention(64, 4)
    init_weights(m, 0.2)
    m = m.to(CUDA).eval()
    x = torch.randn(2, 9, 64, device=CUDA)  # (B, T, D)
    real = torch.arange(9, device=CUDA)[None, :] < torch.tensor([[9], [5]], device=CUDA)  # (B, T)
    mask = key_padding_mask(real)  # (B, 1, 1, T)
    if causal:
        mask = mask & torch.ones(9, 9, dtype=torch.bool, device=CUDA).tril()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        fast = m(x, attn_mask=mask).float()
    with torch.no_grad():
        q, k, v = (t.view(2, 9, 4, 16).transpose(1, 2) for t in m.qkv(x).split(64, -1))  # (B, H, T, Dh)
        ref = m.out(reference_attention(q, k, v, mask).transpose(1, 2).reshape(2, 9, 64))
    keep = real[..., None]
    assert torch.allclose(fast * keep, ref * keep, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_trains_in_bf16_on_cuda_and_matches_cpu_in_fp32(family):
    s = Shape(layers=2, d=64, heads=4, d_ff=128, vocab=256, batch=2, seq=16)
    torch.manual_seed(0)
    cpu_model = ours(family, s).eval()
    gpu_model = ours(family, s).to(CUDA)
    gpu_model.load_state_dict(cpu_model.state_dict())
    x, y = _batch(s, torch.device("cpu"))
    args = (x, x) if family == "encoder_decoder" else (x,)
    with torch.no_grad():
        want = cpu_model(*args)
        got = gpu_model.eval()(*(a.to(CUDA) for a in args)).cpu()
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    gpu_model.train()
    before = [p.detach().clone() for p in gpu_model.parameters()]
    step = make_step(family, True, gpu_model, x.to(CUDA), y.to(CUDA), CUDA, "bf16")
    assert all(step() > 0 for _ in range(2))
    moved = [not torch.equal(a, p) for a, p in zip(before, gpu_model.parameters())]
    assert all(p.dtype == torch.float32 for p in gpu_model.parameters()) and sum(moved) == len(moved)


def test_kv_cache_equals_recomputation_on_cuda_greedy_beam_and_sampling():
    m = tiny("encoder_decoder", position="rope").to(CUDA)
    src, mask = sources(CUDA)
    greedy = greedy_translate(m, src, mask, 1, 2, max_len=12)
    assert greedy == greedy_translate(m, src, mask, 1, 2, max_len=12, use_cache=False)
    assert greedy == greedy_translate(m.cpu(), src.cpu(), mask.cpu(), 1, 2, max_len=12)
    m.to(CUDA)
    kw = dict(beam=4, max_len=10, nbest=2, length_penalty=0.6)
    cached = beam_translate(m, src, mask, 1, 2, **kw)
    full = beam_translate(m, src, mask, 1, 2, use_cache=False, **kw)
    assert [[h for h, _ in r] for r in cached] == [[h for h, _ in r] for r in full]
    d = tiny("decoder", position="rope").to(CUDA)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    a = generate(d, prompts, 10, temperature=0.9, top_k=12, generator=torch.Generator(CUDA).manual_seed(3))
    b = generate(d, prompts, 10, temperature=0.9, top_k=12, generator=torch.Generator(CUDA).manual_seed(3),
                 use_cache=False)
    assert a == b


CUDA_RUN = ["train.device=cuda", "train.max_steps=8", "train.ckpt_every=2", "train.eval_every=4",
            "model.dropout=0.1", "train.deterministic=true"]


def test_trainer_on_cuda_bf16_resume_equals_uninterrupted_and_loads_on_cpu(tmp_path):
    straight_cfg = toy_config([*CUDA_RUN, "train.precision=bf16"])
    summary = Trainer(straight_cfg, ToyTask(straight_cfg), RunDir(tmp_path / "straight")).fit()
    assert summary["precision"] == "bf16" and summary["steps"] == 8
    first = toy_config([*CUDA_RUN, "train.precision=bf16", "train.max_steps=4"])
    Trainer(first, ToyTask(first), RunDir(tmp_path / "resumed")).fit()
    Trainer(straight_cfg, ToyTask(straight_cfg), RunDir(tmp_path / "resumed")).fit(resume=True)
    a = load_file(tmp_path / "straight/model/model.safetensors")
    b = load_file(tmp_path / "resumed/model/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in a.values())


def test_compiled_training_on_cuda(tmp_path):
    cfg = toy_config(["train.device=cuda", "train.precision=bf16", "train.compile=true",
                      "train.max_steps=4", "train.eval_every=0"])
    summary = Trainer(cfg, ToyTask(cfg), RunDir(tmp_path / "run")).fit()
    assert summary["steps"] == 4
    keys = load_file(tmp_path / "run/model/model.safetensors").keys()
    assert not any("_orig_mod" in k for k in keys)


def test_a_model_dir_loads_onto_cuda(tmp_path):
    from trainformer.modeldir import save_model_dir

    cfg = toy_config()
    model = tiny("decoder")
    cfg.model = ModelConfig(family="decoder", vocab_size=24, d_model=32, n_heads=4, n_layers=2, d_ff=64,
                            max_len=48, dropout=0.0, init_std=0.3, tie_embeddings=False)
    save_model_dir(model, cfg, tmp_path / "model")
    loaded = load_model_dir(tmp_path / "model", device="cuda")
    param = next(loaded.model.parameters())
    assert param.device.type == "cuda"
    ids = torch.tensor([[5, 6, 7]])
    assert torch.allclose(loaded.model(ids.to(CUDA)).cpu(), model(ids), atol=1e-5)
