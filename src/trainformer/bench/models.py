"""Training step of our three families against their Hugging Face peers at equal shapes.

One step = forward + cross-entropy + backward + AdamW(fused) step, dropout 0.
The loss is each side's own: ours is the trainer's (`training.loss.cross_entropy_sum`,
block-wise on the CPU), HF's is ``F.cross_entropy`` as its models compute it from labels.

    decoder          Decoder                        vs GPT2LMHeadModel (attn_implementation="sdpa")
    encoder          Encoder (MLM head)             vs BertForMaskedLM
    encoder_decoder  EncoderDecoder (6 + 6 layers)  vs MarianMTModel

Steps of the two models alternate (ours, theirs, ours, ...) after a warm-up,
so background load hits both alike. MFU = model FLOPs per step (matmuls
counted from the shapes, training = 3 x forward, attention included) / step
time / peak. Used by `benchmarks/speed/bench_models.py` and `trainformer bench`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from trainformer.bench.memory import PeakMemory, run_isolated
from trainformer.bench.timing import interleaved, summarize, sync
from trainformer.config import ModelConfig
from trainformer.models import build_model, count_parameters
from trainformer.training.loss import cross_entropy_sum
from trainformer.training.throughput import mfu

FAMILIES = ("decoder", "encoder", "encoder_decoder")


@dataclass
class Shape:
    layers: int = 6
    d: int = 384
    heads: int = 6
    d_ff: int = 1536
    vocab: int = 8192
    batch: int = 16
    seq: int = 256


def train_flops(family: str, s: Shape) -> float:
    """Matmul FLOPs of one training step (3 x forward), attention scores included (PaLM appendix B)."""
    tokens = s.batch * s.seq
    d, f = s.d, s.d_ff
    self_layer = 2 * (4 * d * d + 2 * d * f) + 4 * s.seq * d  # per token: projections + QK^T and AV
    cross_layer = 2 * (2 * d * d) + 4 * s.seq * d  # q and out on target tokens + attention over the memory
    cross_memory = 2 * (2 * d * d)  # k and v of the memory, per source token
    head = 2 * d * s.vocab
    if family == "encoder_decoder":
        forward = tokens * s.layers * (self_layer + cross_memory) + tokens * (
            s.layers * (self_layer + cross_layer) + head
        )
    else:
        forward = tokens * (s.layers * self_layer + head)
        if family == "encoder":
            forward += tokens * 2 * d * d  # the MLM head's dense layer
    return 3.0 * forward


def ours(family: str, s: Shape) -> torch.nn.Module:
    """Our model of `family` in the layout of its HF peer (GPT-2, BERT, Marian)."""
    common = dict(vocab_size=s.vocab, d_model=s.d, n_heads=s.heads, n_layers=s.layers, d_ff=s.d_ff,
                  max_len=s.seq, dropout=0.0, activation="gelu")
    if family == "decoder":  # GPT-2 layout
        cfg = ModelConfig(family="decoder", position="learned", scale_embedding=False, **common)
    elif family == "encoder":  # BERT layout
        cfg = ModelConfig(family="encoder", head="mlm", position="learned", norm_first=False,
                          scale_embedding=False, norm_eps=1e-12, **common)
    else:  # Marian / Vaswani layout
        cfg = ModelConfig(family="encoder_decoder", position="sinusoidal", norm_first=False, **common)
    return build_model(cfg)


PEER_ATTENTION = ("sdpa", "eager")  # HF's `attn_implementation`: its default, and its matmul-softmax-matmul


def theirs(family: str, s: Shape, attention: str = "sdpa") -> torch.nn.Module:
    """The randomly initialised Hugging Face peer of `family` at shape `s` (`attention`: one of
    PEER_ATTENTION, HF's ``attn_implementation``)."""
    import transformers as T

    if family == "decoder":
        cfg = T.GPT2Config(n_layer=s.layers, n_embd=s.d, n_head=s.heads, n_inner=s.d_ff, vocab_size=s.vocab,
                           n_positions=s.seq, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                           activation_function="gelu", bos_token_id=0, eos_token_id=0)
        return T.GPT2LMHeadModel._from_config(cfg, attn_implementation=attention)
    if family == "encoder":
        cfg = T.BertConfig(num_hidden_layers=s.layers, hidden_size=s.d, num_attention_heads=s.heads,
                           intermediate_size=s.d_ff, vocab_size=s.vocab, max_position_embeddings=s.seq,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)
        return T.BertForMaskedLM._from_config(cfg, attn_implementation=attention)
    cfg = T.MarianConfig(encoder_layers=s.layers, decoder_layers=s.layers, d_model=s.d,
                         encoder_attention_heads=s.heads, decoder_attention_heads=s.heads,
                         encoder_ffn_dim=s.d_ff, decoder_ffn_dim=s.d_ff, vocab_size=s.vocab,
                         max_position_embeddings=s.seq, dropout=0.0, attention_dropout=0.0,
                         activation_dropout=0.0, activation_function="gelu", scale_embedding=True,
                         pad_token_id=0, decoder_start_token_id=0, eos_token_id=1, bos_token_id=1,
                         forced_eos_token_id=1)
    return T.MarianMTModel._from_config(cfg, attn_implementation=attention)


def forward_fn(family: str, is_ours: bool, model, x: torch.Tensor):
    """Logits (B, T, V) of one batch; x doubles as source and target for the encoder-decoder."""
    if is_ours:
        return model(x, x) if family == "encoder_decoder" else model(x)
    if family == "encoder_decoder":
        return model(input_ids=x, decoder_input_ids=x, use_cache=False).logits
    if family == "decoder":
        return model(input_ids=x, use_cache=False).logits
    return model(input_ids=x).logits


def make_step(family: str, is_ours: bool, model, x, y, device, precision: str = "bf16"):
    """A closure running one training step and returning its seconds (device-synchronised)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def step() -> float:
        sync(device)
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=precision == "bf16"):
            logits = forward_fn(family, is_ours, model, x)
            if is_ours:
                total, n = cross_entropy_sum(logits, y)
                loss = total / n
            else:
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - t

    return step


def _build(family: str, which: str, s: Shape, device: torch.device, compile: bool,
           peer_attention: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(0)
    model = (ours(family, s) if which == "ours" else theirs(family, s, peer_attention)).to(device).train()
    return torch.compile(model) if compile else model


def _batch(s: Shape, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(2, s.vocab, (s.batch, s.seq), generator=gen)  # (B, T)
    y = torch.randint(2, s.vocab, (s.batch, s.seq), generator=gen)  # (B, T)
    return x.to(device), y.to(device)


def step_memory(family: str, which: str, shape: dict, device: str, precision: str, compile: bool,
                rss=None, peer_attention: str = "sdpa") -> dict:
    """Peak memory (MB) of training steps of one model, above the built model and batch.

    Module-level so `run_isolated` can run it in a fresh process on CPU.
    Two steps, so AdamW's state (created on the first) is included.
    """
    dev, s = torch.device(device), Shape(**shape)
    model = _build(family, which, s, dev, compile, peer_attention)
    x, y = _batch(s, dev)
    step = make_step(family, which == "ours", model, x, y, dev, precision)
    with PeakMemory(dev, rss) as mem:
        step()
        step()
    return {"peak_mem_mb": mem.mb}


def bench_family(
    family: str, s: Shape, steps: int, warmup: int, device: torch.device, precision: str, peak: float,
    compile: bool = False, memory: bool = False, measured_peak: float | None = None, peer_attention: str = "sdpa",
) -> dict:
    """Interleaved training steps of ours vs HF for `family`: medians, min/max, tokens/s, MFU, memory.

    Args:
        s: the shared shape; batches are (s.batch, s.seq) random ids.
        peak: FLOP/s for MFU (measured GEMM peak or GPU spec).
        peer_attention: the HF peer's attention implementation (PEER_ATTENTION).
        measured_peak: where `peak` is a spec-sheet figure, the GEMM peak measured in this
            run; each side then also gets ``mfu_measured`` against it.
        memory: also measure each model's step memory. CUDA: one extra step each, above
            the resident weights and optimizer state. CPU: two steps from a freshly built
            model in a fresh process (`step_memory`), so AdamW's state is included.
    """
    x, y = _batch(s, device)
    models = {k: _build(family, k, s, device, compile, peer_attention) for k in ("ours", "hf")}
    runs = {k: make_step(family, k == "ours", m, x, y, device, precision) for k, m in models.items()}
    warm: dict[str, list[float]] = {}
    times = interleaved(runs, steps, warmup, warm)
    flops = train_flops(family, s)
    tokens = s.batch * s.seq * (2 if family == "encoder_decoder" else 1)
    out = {"family": family, "flops_per_step": flops, "tokens_per_step": tokens, "compiled": compile,
           "peer_attention": peer_attention}
    for k, m in models.items():
        stats = summarize(times[k])
        tps = tokens / stats["median_s"]
        out[k] = {"params": count_parameters(m), **stats, "steps_s": times[k], "warmup_s": warm[k],
                  "tokens_per_s": tps, "mfu": mfu(flops / tokens, tps, peak)}
        if measured_peak:
            out[k]["mfu_measured"] = mfu(flops / tokens, tps, measured_peak)
    out["speedup"] = out["hf"]["median_s"] / out["ours"]["median_s"]
    if memory and device.type == "cuda":
        for k, run in runs.items():  # one more step each, above the resident weights and AdamW state
            with PeakMemory(device, None) as mem:
                run()
            out[k]["peak_mem_mb"] = mem.mb
    elif memory:
        del models, runs
        for k in ("ours", "hf"):
            kwargs = dict(family=family, which=k, shape=asdict(s), device=str(device),
                          precision=precision, compile=compile, peer_attention=peer_attention)
            out[k].update(run_isolated(step_memory, kwargs, device))
    return out
