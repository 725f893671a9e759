"""Pruning and quantization of built models: identity at 0%, real shrinking, correct cuts,
KV cache with per-layer head counts, and int8 / bf16 outputs close to fp32 on a trained model."""

import pytest
import torch

from trainformer.compression import magnitude_prune, structured_prune
from trainformer.compression.distill import distillation_loss
from trainformer.compression.magnitude import prunable_weights
from trainformer.compression.structured import activation_scores, neuron_scores
from trainformer.config import ModelConfig
from trainformer.errors import ConfigError
from trainformer.generation import beam_translate, generate, greedy_translate
from trainformer.models import build_model, count_parameters
from trainformer.models.quantized import (
    ONEDNN_HEAD_MIN_OUTPUTS,
    Int8Embedding,
    Int8WeightOnlyLinear,
    head_engine,
    quantize_model,
)
from trainformer.models.shapes import (
    apply_layer_sizes,
    attention_modules,
    ffn_modules,
    ffn_width,
    model_shapes,
)
from trainformer.nn.embedding import TokenEmbedding
from trainformer.training.loss import cross_entropy_sum

V, L, BOS, EOS = 40, 5, 1, 2

# (family, extra ModelConfig keys): every family, the common variants, every encoder head.
VARIANTS = [
    ("decoder", {}),
    ("decoder", dict(n_kv_heads=2, position="rope", activation="swiglu")),
    ("encoder_decoder", {}),
    ("encoder_decoder", dict(norm_first=False, n_kv_heads=2)),
    ("encoder", dict(head="mlm")),
    ("encoder", dict(head="tagging")),
    ("encoder", dict(head="relation")),
    ("decoder", dict(norm_first=False, norm="rmsnorm")),
]
IDS = [f"{family}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'plain'}" for family, kw in VARIANTS]


def tiny_cfg(family: str = "decoder", **kw) -> ModelConfig:
    base = dict(family=family, vocab_size=V, d_model=32, n_heads=4, n_layers=2, d_ff=64, max_len=64,
                dropout=0.0, init_std=0.2, num_labels=L, head="lm" if family != "encoder" else "mlm")
    return ModelConfig(**{**base, **kw})


def tiny_model(family: str = "decoder", seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_model(tiny_cfg(family, **kw)).eval()


def ids(b=3, t=9, seed=1):
    return torch.randint(3, V, (b, t), generator=torch.Generator().manual_seed(seed))


def run(model, family: str):
    """A forward pass of any family on a fixed padded batch; returns its output tensor."""
    x = ids()
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[0, -3:] = False  # one padded row
    with torch.no_grad():
        if family == "encoder_decoder":
            return model(x, ids(seed=2)[:, :6], mask)
        if family == "decoder":
            return model(x)
        if model.cfg.head == "relation":
            return model(x, mask, e1_pos=torch.tensor([0, 1, 2]), e2_pos=torch.tensor([4, 5, 3]))
        return model(x, mask)


def generate_all(model, family: str):
    """Generation that uses the KV cache (and, for comparison, the uncached path)."""
    x = ids(b=2, t=7)
    if family == "encoder_decoder":
        cached = greedy_translate(model, x, None, BOS, EOS, max_len=8)
        uncached = greedy_translate(model, x, None, BOS, EOS, max_len=8, use_cache=False)
        beams = beam_translate(model, x, None, BOS, EOS, beam=3, max_len=8, nbest=2)
        assert all(len(b) == 2 for b in beams)
        return cached, uncached
    if family == "decoder":
        cached = generate(model, [[5, 6, 7], [8, 9]], 8, temperature=0)
        uncached = generate(model, [[5, 6, 7], [8, 9]], 8, temperature=0, use_cache=False)
        return cached, uncached
    return None, None


# ----------------------------------------------------------------------------
# Pruning
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("family,kw", VARIANTS, ids=IDS)
@pytest.mark.parametrize("method", ["magnitude", "structured"])
def test_zero_sparsity_is_the_identity(family, kw, method):
    model = tiny_model(family, **kw)
    before = run(model, family)
    shapes = model_shapes(model)
    if method == "magnitude":
        report = magnitude_prune(model, 0.0)
        assert report["actual_sparsity"] == 0.0
    else:
        structured_prune(model, 0.0)
    assert model_shapes(model) == shapes
    assert torch.equal(run(model, family), before)


@pytest.mark.parametrize("family,kw", VARIANTS, ids=IDS)
def test_structured_pruning_shrinks_and_still_runs(family, kw):
    model = tiny_model(family, **kw)
    out_before = run(model, family)
    params = count_parameters(model)
    report = structured_prune(model, 0.5)
    # half of all head groups and neurons are gone, every module keeps at least one
    assert report["heads"]["after"] < report["heads"]["before"]
    assert report["neurons"]["after"] == report["neurons"]["before"] // 2
    assert all(a.n_heads >= 1 and a.n_heads % a.n_kv_heads == 0 for _, a in attention_modules(model))
    assert count_parameters(model) < 0.85 * params
    for _, attn in attention_modules(model):  # Linear shapes agree with the head counts
        q_dim, kv_dim = attn.n_heads * attn.head_dim, attn.n_kv_heads * attn.head_dim
        assert attn.out.in_features == q_dim
        if attn.cross:
            assert (attn.q.out_features, attn.kv.out_features) == (q_dim, 2 * kv_dim)
        else:
            assert attn.qkv.out_features == q_dim + 2 * kv_dim
    out = run(model, family)
    assert out.shape == out_before.shape and torch.isfinite(out).all()
    cached, uncached = generate_all(model, family)
    assert cached == uncached  # the KV cache agrees with full recomputation after pruning


def _kill_units(model, group: int = 1, neurons: slice = slice(0, 16)):
    """Make one head group of every attention module and some neurons of every FFN contribute nothing."""
    with torch.no_grad():
        for _, attn in attention_modules(model):
            cols = attn.n_heads // attn.n_kv_heads * attn.head_dim  # columns of one group in `out`
            attn.out.weight[:, group * cols:(group + 1) * cols] = 0
        for _, ffn in ffn_modules(model):
            ffn.down.weight[:, neurons] = 0


@pytest.mark.parametrize("family,kw", VARIANTS, ids=IDS)
def test_structured_pruning_removes_exactly_the_dead_units(family, kw):
    """Units whose output weights are zero score lowest; cutting them must not change the outputs,
    which also proves the q/k/v rows, GQA groups, SwiGLU halves and out columns are cut consistently."""
    model = tiny_model(family, **kw)
    _kill_units(model)
    before = run(model, family)
    groups = {n: a.n_kv_heads for n, a in attention_modules(model)}
    structured_prune(model, 0.25)  # removes round(0.25 x all groups): only dead ones (score 0)
    assert all(ffn_width(f) == 48 for _, f in ffn_modules(model))
    removed = sum(groups[n] - a.n_kv_heads for n, a in attention_modules(model))
    assert removed == round(0.25 * sum(groups.values()))
    torch.testing.assert_close(run(model, family), before, atol=1e-5, rtol=1e-5)


def test_head_counts_may_differ_per_layer_and_the_cache_still_agrees():
    for family in ("encoder_decoder", "decoder"):
        model = tiny_model(family, n_kv_heads=2)
        shapes = model_shapes(model)
        first_self = next(k for k in shapes if k.endswith("self_attn.heads"))
        prefix = first_self.rsplit(".", 1)[0]
        shapes.update({f"{prefix}.heads": 2, f"{prefix}.kv_heads": 1})
        ffn_key = next(k for k in shapes if k.endswith(".d_ff"))
        shapes[ffn_key] = 17
        apply_layer_sizes(model, shapes)
        assert model_shapes(model) == shapes
        heads = {a.n_heads for _, a in attention_modules(model)}
        assert heads == {2, 4}
        cached, uncached = generate_all(model, family)
        assert cached == uncached


def test_activation_scores_rank_by_what_units_write_on_the_data():
    """A neuron with the largest weights that never fires on the data is the first to go with
    calibration (the weight score would keep it); a head group's score scales with W_out."""
    model = tiny_model("decoder", init_std=0.05)
    ffn = model.layers[0].ffn
    with torch.no_grad():
        ffn.up.weight[5] = 1.0
        ffn.up.bias[5] = -1000.0  # GELU(< -900) = 0: silent on every token
        ffn.down.weight[:, 5] = 5.0  # ... with the largest weight norms of the layer
        attn = model.layers[1].self_attn
        cols = attn.out.weight.shape[1] // attn.n_kv_heads
        attn.out.weight[:, :cols] *= 10.0  # group 0 writes 10x more
    x = ids(b=4, t=12)
    before = activation_scores(model, lambda: model(x))
    assert before["layers.0.ffn"][5] == 0.0
    with torch.no_grad():
        attn.out.weight[:, :cols] /= 10.0
    after = activation_scores(model, lambda: model(x))
    torch.testing.assert_close(before["layers.1.self_attn"][0], 10 * after["layers.1.self_attn"][0])
    torch.testing.assert_close(before["layers.1.self_attn"][1:], after["layers.1.self_attn"][1:])
    assert neuron_scores(ffn)[5] == neuron_scores(ffn).max()  # the data-free score keeps it
    width = ffn.up.weight.shape[0]
    structured_prune(model, 1 / (2 * width), heads=False, calibrate=lambda: model(x))  # one neuron
    assert model.layers[0].ffn.up.weight.shape[0] == width - 1
    assert not torch.any(model.layers[0].ffn.up.bias == -1000.0)  # and it was that one


def test_layer_sizes_reject_bad_entries():
    model = tiny_model("decoder")
    with pytest.raises(ConfigError, match=r"model.layer_sizes\['layers.9.self_attn.heads'\]"):
        apply_layer_sizes(model, {"layers.9.self_attn.heads": 2, "layers.9.self_attn.kv_heads": 2})
    with pytest.raises(ConfigError, match="larger than"):
        apply_layer_sizes(model, {"layers.0.ffn.d_ff": 65})
    with pytest.raises(ConfigError, match="heads must be"):
        gqa = tiny_model("decoder", n_kv_heads=2)
        apply_layer_sizes(gqa, {"layers.0.self_attn.heads": 3, "layers.0.self_attn.kv_heads": 1})
    with pytest.raises(ConfigError, match="expected PATH"):
        apply_layer_sizes(model, {"layers.0.ffn.width": 3})


def test_build_model_builds_the_layer_sizes_of_its_config():
    """A pruned model's config.json alone rebuilds its shapes: build_model shrinks the named layers."""
    for family in ("encoder_decoder", "decoder", "encoder"):
        shapes = model_shapes(tiny_model(family, n_kv_heads=2))
        attn = next(k for k in shapes if k.endswith("self_attn.heads")).rsplit(".", 1)[0]
        ffn = next(k for k in shapes if k.endswith(".d_ff"))
        sizes = {f"{attn}.heads": 2, f"{attn}.kv_heads": 1, ffn: 9}
        model = tiny_model(family, n_kv_heads=2, layer_sizes=sizes)
        assert model_shapes(model) == {**shapes, **sizes}
        assert model.get_submodule(ffn.rsplit(".", 1)[0]).up.out_features == 9


@pytest.mark.parametrize("family,kw", VARIANTS[:3], ids=IDS[:3])
def test_magnitude_pruning_zeroes_the_smallest_weights_globally(family, kw):
    model = tiny_model(family, **kw)
    originals = {n: w.detach().clone() for n, w in prunable_weights(model)}
    embed = model.tok_embed.weight.detach().clone()
    shapes = model_shapes(model)
    report = magnitude_prune(model, 0.6)
    n = report["prunable_weights"]
    assert n == sum(w.numel() for w in originals.values())
    assert abs(report["actual_sparsity"] - 0.6) <= 1.0 / n
    zeroed = torch.cat([originals[k][w == 0].abs() for k, w in prunable_weights(model)])
    kept = torch.cat([originals[k][w != 0].abs() for k, w in prunable_weights(model)])
    assert zeroed.max() <= kept.min()  # one global threshold, not per tensor
    assert torch.equal(model.tok_embed.weight, embed) and model_shapes(model) == shapes
    for k, w in prunable_weights(model):  # kept weights are untouched
        assert torch.equal(w[w != 0], originals[k][w != 0])
    assert torch.isfinite(run(model, family)).all()


# ----------------------------------------------------------------------------
# Quantization
# ----------------------------------------------------------------------------


def chain(first: torch.Tensor, n: int = 8) -> torch.Tensor:
    """(B,) first tokens -> (B, n) sequences with c[i+1] = (3 c[i] + 1) mod (V - 3) + 3."""
    out = [first]
    for _ in range(n - 1):
        out.append((3 * out[-1] + 1) % (V - 3) + 3)
    return torch.stack(out, dim=1)


@pytest.fixture(scope="module")
def trained_encdec():
    """An encoder-decoder trained 80 steps to emit a chain seeded by the first source token.

    Trained, its greedy choices are confident, so quantization error that matters shows as
    flipped tokens (a random model's near-uniform logits would flip on any noise).
    """
    torch.manual_seed(0)
    model = build_model(tiny_cfg("encoder_decoder", d_model=64, d_ff=128, n_layers=1, init_std=0.02))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(80):
        src = torch.randint(3, V, (32, 6), generator=gen)
        tgt = torch.cat([chain(src[:, 0]), torch.full((32, 1), EOS)], dim=1)  # (B, 9)
        tgt_in = torch.cat([torch.full((32, 1), BOS), tgt[:, :-1]], dim=1)
        loss = torch.nn.functional.cross_entropy(model(src, tgt_in).reshape(-1, V), tgt.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    src = torch.randint(3, V, (48, 6), generator=torch.Generator().manual_seed(99))
    return model, src


def _copy(model):
    clone = build_model(model.cfg)
    clone.load_state_dict(model.state_dict())
    return clone.eval()


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    return same / max(1, sum(max(len(ra), len(rb)) for ra, rb in zip(a, b)))


@pytest.mark.parametrize("method", ["dynamic", "weight_only", "bf16"])
def test_quantized_outputs_stay_close_to_fp32(trained_encdec, method):
    model, src = trained_encdec
    ref_tokens = greedy_translate(model, src, None, BOS, EOS, max_len=10)
    tgt_in = torch.cat([torch.full((src.shape[0], 1), BOS), chain(src[:, 0])], dim=1)
    with torch.no_grad():
        ref_logits = model(src, tgt_in)
    assert _agreement(ref_tokens, chain(src[:, 0]).tolist()) > 0.6  # it did learn the task
    q = quantize_model(_copy(model), method)
    tokens = greedy_translate(q, src, None, BOS, EOS, max_len=10)
    with torch.no_grad():
        logits = q(src, tgt_in).float()
    assert _agreement(tokens, ref_tokens) >= 0.9
    rel = (logits - ref_logits).norm() / ref_logits.norm()
    assert rel < 0.05, rel
    if method != "bf16":  # something was actually quantized: no nn.Linear left, an int8 embedding
        assert not any(type(m) is torch.nn.Linear for m in q.modules())
        assert isinstance(q.tok_embed, Int8Embedding)


@pytest.mark.parametrize("family,kw", VARIANTS[2:], ids=IDS[2:])
@pytest.mark.parametrize("method", ["dynamic", "weight_only"])
def test_every_family_runs_quantized(family, kw, method):
    model = tiny_model(family, init_std=0.05, **kw)
    ref = run(model, family)
    q = quantize_model(_copy(model), method)
    out = run(q, family)
    assert out.shape == ref.shape
    assert (out - ref).norm() / ref.norm() < 0.05
    cached, uncached = generate_all(q, family)
    assert cached == uncached


def test_int8_weight_only_linear_matches_its_dequantised_weights():
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 8)
    with torch.no_grad():
        linear.weight[3] = 0  # an all-zero row (magnitude-pruned) must not divide by zero
    q = Int8WeightOnlyLinear.from_linear(linear)
    assert q.weight_int8.dtype == torch.int8 and q.weight_int8.abs().max() == 127
    deq = q.weight_int8.float() * q.weight_scale[:, None]
    assert (deq - linear.weight).abs().max() <= q.weight_scale.max() / 2 + 1e-7
    x = torch.randn(5, 16)
    torch.testing.assert_close(q(x), torch.nn.functional.linear(x, deq, linear.bias), atol=1e-5, rtol=1e-5)
    assert torch.equal(q(x)[:, 3], linear.bias[3].expand(5))


@pytest.mark.parametrize("dynamic", [True, False])
def test_int8_embedding_looks_up_and_projects_with_its_dequantised_rows(dynamic):
    torch.manual_seed(0)
    embedding = TokenEmbedding(50, 16, scale=True)
    with torch.no_grad():
        embedding.weight[7] = 0  # an all-zero row must not divide by zero
    q = Int8Embedding.from_embedding(embedding, dynamic)
    deq = q.weight_int8.float() * q.weight_scale[:, None]
    assert torch.equal(q.weight, deq) and q.weight_int8.abs().max() == 127
    assert (deq - embedding.weight).abs().max() <= q.weight_scale.max() / 2 + 1e-7
    ids = torch.tensor([[1, 7, 49], [3, 3, 0]])
    torch.testing.assert_close(q(ids), deq[ids] * 4.0)  # sqrt(16), as TokenEmbedding scales
    h = torch.randn(2, 3, 16)
    ref = torch.nn.functional.linear(h, deq)
    tol = 0.02 * ref.abs().max().item() if dynamic else 1e-5  # dynamic also rounds h to int8
    torch.testing.assert_close(q.attend(h), ref, atol=tol, rtol=0)
    with torch.no_grad():  # new int8 numbers (a load): the packed head follows them
        q.weight_int8.copy_(-q.weight_int8)
    torch.testing.assert_close(q.attend(h), -ref, atol=tol, rtol=0)


def test_int8_head_kernel_is_picked_by_output_size_and_gives_the_same_logits(monkeypatch):
    default = torch.backends.quantized.engine
    assert head_engine(1, 8000) == default  # one row: the default engine's GEMV
    monkeypatch.setattr("trainformer.models.quantized._onednn_is_faster", lambda: True)
    assert head_engine(ONEDNN_HEAD_MIN_OUTPUTS // 8000 + 1, 8000) == "onednn"
    torch.manual_seed(0)
    q = Int8Embedding.from_embedding(TokenEmbedding(8000, 32), dynamic=True)
    h = torch.randn(40, 32)
    torch.testing.assert_close(q._dynamic_head("onednn")(h), q._dynamic_head(default)(h), atol=1e-4, rtol=1e-4)
    assert torch.backends.quantized.engine == default  # packing for oneDNN leaves the selection alone


@pytest.mark.parametrize("method", ["dynamic", "weight_only", "bf16"])
def test_quantized_models_run_under_bf16_autocast(method):
    """The inference verbs autocast to bf16 on CPUs with native bf16; int8 kernels take fp32."""
    for family in ("encoder_decoder", "decoder"):
        model = quantize_model(_copy(tiny_model(family, init_std=0.05)), method)
        ref = run(model, family).float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = run(model, family).float()
            generate_all(model, family)
        assert (out - ref).norm() / ref.norm() < 0.05


# ----------------------------------------------------------------------------
# Knowledge distillation
# ----------------------------------------------------------------------------


def test_distillation_loss_mixes_labels_and_teacher():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[1, 3:] = -100  # padding carries no loss
    ce, n = cross_entropy_sum(student, labels)
    loss, m = distillation_loss(student, teacher, labels, alpha=0.0)
    assert torch.allclose(loss, ce) and m == n == 8
    same, _ = distillation_loss(student, student, labels, alpha=1.0)
    assert abs(float(same)) < 1e-5  # KL of a distribution from itself
    # the teacher term is KL summed over the labelled positions only
    keep = labels != -100
    kl = (teacher.softmax(-1) * (teacher.log_softmax(-1) - student.log_softmax(-1))).sum(-1)[keep].sum()
    mixed, _ = distillation_loss(student, teacher, labels, alpha=0.25)
    assert torch.allclose(mixed, 0.75 * ce + 0.25 * kl, atol=1e-5)


def test_distillation_pulls_the_student_onto_the_teacher():
    torch.manual_seed(0)
    teacher = torch.randn(4, 7)
    student = torch.zeros(4, 7, requires_grad=True)
    labels = torch.zeros(4, dtype=torch.long)  # hard labels that disagree with the teacher
    opt = torch.optim.SGD([student], lr=2.0)
    for _ in range(300):
        opt.zero_grad()
        distillation_loss(student, teacher, labels, alpha=1.0)[0].backward()
        opt.step()
    assert torch.allclose(student.softmax(-1), teacher.softmax(-1), atol=1e-3)
