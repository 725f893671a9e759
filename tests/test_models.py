"""The three families: shapes, causality, padding, packed documents, variants, KV cache, names."""

import pytest
import torch

from trainformer.config import ModelConfig
from trainformer.errors import ConfigError, UserError
from trainformer.models import Decoder, Encoder, EncoderDecoder, build_model, count_parameters
from trainformer.presets import PRESETS, get_preset

V, L = 40, 5  # vocabulary, labels


def tiny(family="decoder", **kw) -> ModelConfig:
    base = dict(
        family=family, vocab_size=V, d_model=32, n_heads=4, n_layers=2, d_ff=64, max_len=64,
        dropout=0.0, init_std=0.2, num_labels=L, head="lm" if family != "encoder" else "mlm",
    )
    return ModelConfig(**{**base, **kw})


def model(family="decoder", **kw):
    torch.manual_seed(0)
    return build_model(tiny(family, **kw)).eval()


def ids(b=2, t=9, seed=1):
    return torch.randint(3, V, (b, t), generator=torch.Generator().manual_seed(seed))


def close(a, b):
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


VARIANTS = [
    dict(),
    dict(position="learned"),
    dict(position="rope"),
    dict(norm_first=False),
    dict(norm="rmsnorm"),
    dict(activation="swiglu"),
    dict(activation="relu"),
    dict(n_kv_heads=2),
    dict(tie_embeddings=False),
    dict(bias=False),
    dict(scale_embedding=False),
]


# ---------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) or "default")
def test_every_family_and_variant_runs_forward_and_backward(variant):
    x, mask = ids(), torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    outs = {
        "decoder": lambda m: m(x, mask),
        "encoder_decoder": lambda m: m(x, x[:, :6], mask),
        "mlm": lambda m: m(x, mask),
        "tagging": lambda m: m(x, mask),
        "relation": lambda m: m(x, mask, torch.tensor([0, 2]), torch.tensor([3, 1])),
    }
    shapes = {"decoder": (2, 9, V), "encoder_decoder": (2, 6, V), "mlm": (2, 9, V), "tagging": (2, 9, L),
              "relation": (2, L)}
    for name, run in outs.items():
        family = name if name in ("decoder", "encoder_decoder") else "encoder"
        head = name if family == "encoder" else "lm"
        m = model(family, head=head, **variant).train()
        out = run(m)
        assert out.shape == shapes[name], name
        out.float().pow(2).mean().backward()
        grads = [p.grad for p in m.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name


@pytest.mark.parametrize("name", [n for n in PRESETS if n.startswith(("tiny", "small"))])
def test_small_presets_build_and_run(name):
    cfg = ModelConfig(**{**get_preset(name), "vocab_size": V, "num_labels": L,
                         "head": "mlm" if get_preset(name)["family"] == "encoder" else "lm"})
    m = build_model(cfg).eval()
    x = ids(2, 8)
    out = m(x, x) if cfg.family == "encoder_decoder" else m(x)
    assert out.shape == (2, 8, V)


def test_variants_change_the_structure():
    assert isinstance(model(norm="rmsnorm").norm, torch.nn.RMSNorm)
    assert model(norm_first=False).norm is None  # post-norm: no final norm
    assert model(activation="swiglu").layers[0].ffn.up.weight.shape == (128, 32)
    assert all(p.dim() > 1 or "norm" in n for n, p in model(bias=False).named_parameters())
    assert model(position="rope").pos_embed is None and model(position="rope").rope is not None
    assert "pos_embed.weight" in model(position="learned").state_dict()
    assert "pos_embed.weight" not in model(position="sinusoidal").state_dict()
    untied = model(tie_embeddings=False)
    assert untied.lm_head is not None and "lm_head.weight" in untied.state_dict()
    assert "lm_head.weight" not in model().state_dict()
    ed = model("encoder_decoder", n_decoder_layers=3)
    assert len(ed.layers) == 2 and len(ed.decoder_layers) == 3
    assert "tgt_tok_embed.weight" not in ed.state_dict()  # one shared embedding


def test_tied_head_is_the_embedding():
    m = model()
    x = ids()
    h = m.hidden(x)
    close(m(x), h @ m.tok_embed.weight.T)
    ed = model("encoder_decoder")
    assert count_parameters(ed) == count_parameters(model("encoder_decoder", tie_embeddings=False)) - 2 * V * 32


def test_build_model_rejects_unknown_sizes():
    with pytest.raises(ConfigError, match="vocab_size"):
        build_model(tiny(vocab_size=0))
    with pytest.raises(ConfigError, match="num_labels"):
        build_model(tiny("encoder", head="tagging", num_labels=0))
    with pytest.raises(ConfigError, match="model.head"):
        build_model(tiny("encoder", head="lm"))
    with pytest.raises(ConfigError, match="model.head"):
        build_model(tiny("decoder", head="mlm"))


def test_too_long_input_is_a_user_error():
    with pytest.raises(UserError, match="max_len"):
        model(max_len=8)(ids(1, 9))


def test_count_parameters():
    m = model(position="learned")
    assert count_parameters(m) == sum(p.numel() for p in m.parameters())
    assert count_parameters(m, exclude_embeddings=True) == count_parameters(m) - V * 32 - 64 * 32


def test_parameter_names_are_stable():
    names = set(model("encoder_decoder", position="learned").state_dict())
    for expected in [
        "tok_embed.weight", "src_pos_embed.weight", "tgt_pos_embed.weight",
        "layers.0.attn_norm.weight", "layers.0.self_attn.qkv.weight", "layers.0.self_attn.out.bias",
        "layers.0.ffn_norm.bias", "layers.0.ffn.up.weight", "layers.0.ffn.down.weight", "norm.weight",
        "decoder_layers.1.cross_norm.weight", "decoder_layers.1.cross_attn.q.weight",
        "decoder_layers.1.cross_attn.kv.weight", "decoder_layers.1.cross_attn.out.weight", "decoder_norm.bias",
    ]:
        assert expected in names, expected
    heads = {h: set(model("encoder", head=h).state_dict()) for h in ("mlm", "tagging", "relation")}
    assert {"head.dense.weight", "head.norm.weight", "head.bias"} <= heads["mlm"]
    assert {"head.proj.weight"} <= heads["tagging"]
    assert {"head.dense.weight", "head.proj.weight"} <= heads["relation"]


# ---------------------------------------------------------------------------- causality


@pytest.mark.parametrize("position", ["sinusoidal", "learned", "rope"])
def test_decoder_sees_no_future(position):
    m, x = model(position=position), ids()
    y = x.clone()
    y[:, 5] = (y[:, 5] + 1) % V
    a, b = m(x), m(y)
    close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])  # the change is visible from position 5 on


def test_encoder_decoder_decoder_sees_no_future():
    m, src, tgt = model("encoder_decoder"), ids(seed=2), ids(2, 8)
    tgt2 = tgt.clone()
    tgt2[:, 4] = (tgt2[:, 4] + 1) % V
    a, b = m(src, tgt), m(src, tgt2)
    close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])


def test_encoder_is_bidirectional():
    m, x = model("encoder"), ids()
    y = x.clone()
    y[:, 7] = (y[:, 7] + 1) % V
    assert not torch.allclose(m(x)[:, 0], m(y)[:, 0])


# ---------------------------------------------------------------------------- padding


def _pad_right(x, extra):
    padded = torch.cat([x, torch.zeros(x.shape[0], extra, dtype=x.dtype)], dim=1)
    mask = torch.ones_like(padded, dtype=torch.bool)
    mask[:, x.shape[1]:] = False
    return padded, mask


@pytest.mark.parametrize("head", ["mlm", "tagging"])
@pytest.mark.parametrize("position", ["sinusoidal", "learned", "rope"])
def test_encoder_padding_does_not_change_real_tokens(head, position):
    m, x = model("encoder", head=head, position=position), ids(2, 6)
    padded, mask = _pad_right(x, 3)
    close(m(padded, mask)[:, :6], m(x))
    assert not torch.allclose(m(padded)[:, :6], m(x))  # without the mask the padding is seen


def test_char_cnn_features_follow_the_word_and_stay_out_of_wrappers_and_padding():
    from trainformer.data.chars import word_bytes
    from trainformer.nn import CharCNN

    torch.manual_seed(0)
    cnn = CharCNN(d_model=32, filters=16).eval()
    rows = torch.from_numpy(word_bytes(["Paris", "paris", "Paris", ""]).astype("int64"))  # (4, W)
    out = cnn(rows[None])[0]  # (4, D)
    close(out[0], out[2])  # the same word, the same features
    assert not torch.allclose(out[0], out[1])  # casing is seen
    assert torch.equal(out[3], torch.zeros(32))  # no bytes (wrapper, padding): zeros


def test_a_char_cnn_encoder_needs_its_characters_and_uses_them():
    m, x = model("encoder", head="tagging", position="rope", char_cnn=8), ids(2, 6)
    with pytest.raises(ValueError, match="char_cnn"):
        m(x)
    chars = torch.randint(1, 257, (2, 6, 20), generator=torch.Generator().manual_seed(2))
    other = chars.clone()
    other[0, 2] = (other[0, 2] % 200) + 1  # another word at one position
    a, b = m(x, chars=chars), m(x, chars=other)
    assert not torch.allclose(a[0], b[0]) and torch.equal(a[1], b[1])
    padded, mask = _pad_right(x, 3)
    pad_chars = torch.cat([chars, torch.zeros(2, 3, 20, dtype=torch.long)], dim=1)
    close(m(padded, mask, chars=pad_chars)[:, :6], a)
    with pytest.raises(ConfigError, match="char_cnn"):
        from trainformer.config import from_dict

        from_dict({"task": "relations", "model": {"family": "encoder", "head": "relation", "char_cnn": 8}})


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_relation_head_uses_the_marked_positions_and_ignores_padding(position):
    m, x = model("encoder", head="relation", position=position), ids(2, 6)
    e1, e2 = torch.tensor([0, 1]), torch.tensor([3, 4])
    padded, mask = _pad_right(x, 3)
    close(m(padded, mask, e1, e2), m(x, None, e1, e2))
    assert not torch.allclose(m(x, None, e1, e2), m(x, None, e2, e1))
    h = m.hidden(x)
    manual = m.head.proj(torch.nn.functional.gelu(m.head.dense(torch.cat([h[[0, 1], e1], h[[0, 1], e2]], -1))))
    close(m(x, None, e1, e2), manual)


@pytest.mark.parametrize("position", ["sinusoidal", "learned", "rope"])
def test_encoder_decoder_source_padding_does_not_change_outputs(position):
    m, src, tgt = model("encoder_decoder", position=position), ids(2, 6), ids(2, 5, seed=3)
    padded, mask = _pad_right(src, 4)
    close(m(padded, tgt, mask), m(src, tgt))


@pytest.mark.parametrize("position", ["sinusoidal", "learned", "rope"])
def test_decoder_padding_right_and_left(position):
    m, x = model(position=position), ids(2, 6)
    padded, mask = _pad_right(x, 3)
    close(m(padded, mask)[:, :6], m(x))
    close(m(padded)[:, :6], m(x))  # right padding needs no mask at all (causality)
    left = torch.cat([torch.zeros(2, 3, dtype=torch.long), x], dim=1)
    close(m(left, mask.flip(1))[:, 3:], m(x))


def test_target_mask_for_left_padded_targets():
    m, src, tgt = model("encoder_decoder"), ids(2, 6), ids(2, 5, seed=3)
    left = torch.cat([torch.zeros(2, 2, dtype=torch.long), tgt], dim=1)
    tgt_mask = torch.ones_like(left, dtype=torch.bool)
    tgt_mask[:, :2] = False
    close(m(src, left, None, tgt_mask)[:, 2:], m(src, tgt))


# ---------------------------------------------------------------------------- packed documents


@pytest.mark.parametrize("position", ["learned", "rope", "sinusoidal"])
def test_doc_ids_make_packed_documents_independent(position):
    m = model(position=position)
    a, b = ids(1, 4, seed=5), ids(1, 6, seed=6)
    packed = torch.cat([a, b], dim=1)
    docs = torch.tensor([[0] * 4 + [1] * 6])
    out = m(packed, doc_ids=docs)
    close(out[:, :4], m(a))
    close(out[:, 4:], m(b))  # as if b were alone: no attention to a, positions restart
    assert not torch.allclose(m(packed)[:, 4:], m(b))


# ---------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("position", ["sinusoidal", "learned", "rope"])
def test_decoder_cache_equals_full_recomputation(position):
    m, x = model(position=position, n_kv_heads=2), ids(2, 10)
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[0, :3] = False  # row 0 left-padded
    full = m(x, mask)
    cache = m.new_cache()
    chunks = [m(x[:, :4], mask[:, :4], cache=cache), m(x[:, 4:7], mask[:, 4:7], cache=cache)]
    chunks += [m(x[:, t : t + 1], cache=cache) for t in range(7, 10)]  # one token, mask remembered
    close(torch.cat(chunks, dim=1)[mask], full[mask])
    assert cache.length == 10


@pytest.mark.parametrize("position", ["sinusoidal", "rope"])
def test_encoder_decoder_cache_equals_full_recomputation(position):
    m, src, tgt = model("encoder_decoder", position=position), ids(2, 7), ids(2, 6, seed=4)
    src_mask = torch.ones_like(src, dtype=torch.bool)
    src_mask[1, 4:] = False
    memory = m.encode(src, src_mask)
    full = m.decode(tgt, memory, src_mask)
    cache = m.new_cache()
    steps = [m.decode(tgt[:, :2], memory, src_mask, cache=cache)]
    steps += [m.decode(tgt[:, t : t + 1], None, cache=cache) for t in range(2, 6)]  # cross K/V reused
    close(torch.cat(steps, dim=1), full)
    assert cache.cross_mask is src_mask


# ---------------------------------------------------------------------------- families and precision


def test_build_model_dispatches_on_family():
    assert isinstance(model("decoder"), Decoder)
    assert isinstance(model("encoder"), Encoder)
    assert isinstance(model("encoder_decoder"), EncoderDecoder)


def test_bf16_autocast_forward_and_backward():
    m, x = model("encoder_decoder").train(), ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, x)
    assert out.dtype == torch.bfloat16
    out.float().mean().backward()
    assert all(p.grad.dtype == torch.float32 for p in m.parameters())


def test_dropout_is_active_in_train_mode_only():
    m, x = model(dropout=0.5), ids()
    close(m(x), m(x))
    m.train()
    assert not torch.allclose(m(x), m(x))


# ---------------------------------------------------------------------------- Hugging Face name map

HF_SHAPES = {
    "GPT2LMHeadModel": dict(family="decoder", position="learned", scale_embedding=False),
    "BertForMaskedLM": dict(family="encoder", head="mlm", position="learned", norm_first=False, norm_eps=1e-12,
                            scale_embedding=False, embed_norm=True),
    "MarianMTModel": dict(family="encoder_decoder", norm_first=False),
}


def _hf_model(arch, cfg):
    transformers = pytest.importorskip("transformers")
    if arch == "GPT2LMHeadModel":
        hf_cfg = transformers.GPT2Config(
            n_layer=cfg.n_layers, n_embd=cfg.d_model, n_head=cfg.n_heads, n_inner=cfg.d_ff,
            vocab_size=cfg.vocab_size, n_positions=cfg.max_len, activation_function="gelu",
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=cfg.norm_eps,
            bos_token_id=0, eos_token_id=0,
        )
        return transformers.GPT2LMHeadModel(hf_cfg)
    if arch == "BertForMaskedLM":
        hf_cfg = transformers.BertConfig(
            num_hidden_layers=cfg.n_layers, hidden_size=cfg.d_model, num_attention_heads=cfg.n_heads,
            intermediate_size=cfg.d_ff, vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_len,
            pad_token_id=0,
        )
        return transformers.BertForMaskedLM(hf_cfg)
    hf_cfg = transformers.MarianConfig(
        encoder_layers=cfg.n_layers, decoder_layers=cfg.n_layers, d_model=cfg.d_model,
        encoder_attention_heads=cfg.n_heads, decoder_attention_heads=cfg.n_heads, encoder_ffn_dim=cfg.d_ff,
        decoder_ffn_dim=cfg.d_ff, vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_len,
        pad_token_id=0, decoder_start_token_id=0, eos_token_id=1, bos_token_id=1, forced_eos_token_id=1,
    )
    return transformers.MarianMTModel(hf_cfg)


def _to_hf(ours: dict, mapping) -> dict:
    """Our state dict -> HF tensors, by the map (split fused tensors, transpose Conv1D)."""
    out = {}
    for key, hf in mapping.items():
        t = ours[key]
        if hf.transform == "transpose":
            t = t.T
        for hf_key, part in zip(hf.keys, t.chunk(len(hf.keys), dim=0)):
            out[hf_key] = part
    return out


@pytest.mark.parametrize("arch", list(HF_SHAPES))
def test_hf_name_map_covers_both_sides_with_matching_shapes(arch):
    from trainformer.models.hf_names import HF_ONLY, TIED, expand

    cfg = tiny(**HF_SHAPES[arch])
    ours = build_model(cfg).state_dict()
    with torch.device("meta"):
        hf = _hf_model(arch, cfg).state_dict()
    mapping = expand(arch, cfg.n_layers)
    assert set(mapping) == set(ours)  # every one of our keys is mapped, nothing else
    converted = _to_hf(ours, mapping)
    for key, tensor in converted.items():
        assert hf[key].shape == tensor.shape, key
    hf_keys = {k for k in hf if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    assert hf_keys == set(converted) | set(HF_ONLY[arch]) | set(TIED[arch])


def test_gpt2_weights_through_the_map_give_identical_logits():
    from trainformer.models.hf_names import TIED, expand

    cfg = tiny(**HF_SHAPES["GPT2LMHeadModel"])
    ours = model(**HF_SHAPES["GPT2LMHeadModel"])
    hf = _hf_model("GPT2LMHeadModel", cfg).eval()
    state = _to_hf(ours.state_dict(), expand("GPT2LMHeadModel", cfg.n_layers))
    state |= {k: ours.tok_embed.weight for k in TIED["GPT2LMHeadModel"]}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("attn.bias") for k in missing)
    x = ids(2, 9)
    close(ours(x), hf(x).logits)
