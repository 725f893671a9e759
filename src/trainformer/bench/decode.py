"""Decoding speed: translation (greedy, beam 4) and batch-1 chat sampling, ours vs Hugging Face.

Both sides run randomly initialised models of the same shape (`models.ours` /
`models.theirs`) on the same batches of random source ids. A random model's
EOS comes at random, so to compare equal work we FORCE THE SAME OUTPUT
LENGTH on both: ours is given an EOS id outside the vocabulary (never
produced), HF gets ``min_new_tokens = max_new_tokens``. Sentences/s and
generated tokens/s are both reported.
"""

from __future__ import annotations

import torch

from trainformer.bench.models import Shape, ours, theirs
from trainformer.bench.timing import interleaved, summarize, timed
from trainformer.generation import beam_translate, greedy_translate
from trainformer.generation.sampling import generate
from trainformer.training.precision import build_precision

BOS = 0  # Marian starts decoding from pad (decoder_start_token_id); ours takes it as an argument


def source_batches(n: int, batch: int, vocab: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` random sources of 6-24 tokens (Tatoeba-like), length-sorted into right-padded batches.

    Returns: [(ids (B, S), mask (B, S) bool)], pad id 0.
    """
    gen = torch.Generator().manual_seed(seed)
    lengths = sorted(torch.randint(6, 25, (n,), generator=gen).tolist())
    out = []
    for i in range(0, n, batch):
        lens = lengths[i : i + batch]
        ids = torch.randint(2, vocab, (len(lens), max(lens)), generator=gen)  # (B, S)
        mask = torch.arange(max(lens))[None, :] < torch.tensor(lens)[:, None]  # (B, S)
        out.append((ids.masked_fill(~mask, 0), mask))
    return out


def _ours_translate(model, batches, beam: int, new_tokens: int, vocab: int) -> None:
    never = vocab  # an EOS id outside the logits: every hypothesis runs to max_len
    for src, mask in batches:
        if beam == 1:
            greedy_translate(model, src, mask, BOS, never, max_len=new_tokens)
        else:
            beam_translate(model, src, mask, BOS, never, beam=beam, max_len=new_tokens, early_stopping=True)


def _hf_translate(model, batches, beam: int, new_tokens: int) -> None:
    for src, mask in batches:
        beam_args = {"num_beams": beam, "early_stopping": True} if beam > 1 else {}
        model.generate(input_ids=src, attention_mask=mask.long(), do_sample=False, **beam_args,
                       max_new_tokens=new_tokens, min_new_tokens=new_tokens)


def _translate_runs(models, batches, beam, new_tokens, vocab, device, autocast) -> dict:
    """name -> a callable translating every batch once and returning its seconds."""

    def run_ours() -> float:
        with torch.inference_mode(), autocast():
            return timed(lambda: _ours_translate(models["ours"], batches, beam, new_tokens, vocab), device)

    def run_hf() -> float:
        with torch.inference_mode(), autocast():
            return timed(lambda: _hf_translate(models["hf"], batches, beam, new_tokens), device)

    return {"ours": run_ours, "hf": run_hf}


def bench_translation(
    s: Shape, device: torch.device, precision: str, n: int, new_tokens: int = 24, batch: int = 32,
    repeats: int = 3,
) -> dict:
    """Sentences/s and tokens/s of greedy and beam-4 translation of `n` sources, ours vs HF.

    Each side translates all `n` sources per timed repeat (interleaved, one warm-up).
    """
    models = {"ours": ours("encoder_decoder", s), "hf": theirs("encoder_decoder", s)}
    models = {k: m.to(device).eval() for k, m in models.items()}
    batches = [(x.to(device), m.to(device)) for x, m in source_batches(n, batch, s.vocab)]
    autocast = build_precision(precision, device).autocast
    out: dict = {"sentences": n, "new_tokens": new_tokens, "batch": batch,
                 "equal_length": "forced: ours EOS outside vocab, HF min_new_tokens=max_new_tokens"}
    for name, beam in (("greedy", 1), ("beam4", 4)):
        runs = _translate_runs(models, batches, beam, new_tokens, s.vocab, device, autocast)
        times = interleaved(runs, repeats, warmup=1)
        res = {}
        for k, t in times.items():
            stats = summarize(t)
            res[k] = {**stats, "sentences_per_s": n / stats["median_s"],
                      "tokens_per_s": n * new_tokens / stats["median_s"]}
        res["speedup"] = res["hf"]["median_s"] / res["ours"]["median_s"]
        out[name] = res
    return out


def bench_chat(
    s: Shape, device: torch.device, precision: str, prompt: int = 32, new_tokens: int = 128, repeats: int = 3,
) -> dict:
    """Tokens/s of batch-1 sampling (temperature 1, no top-k/p) with our Decoder vs HF GPT-2 generate."""
    s = Shape(**{**s.__dict__, "seq": max(s.seq, prompt + new_tokens)})
    models = {"ours": ours("decoder", s).to(device).eval(), "hf": theirs("decoder", s).to(device).eval()}
    ids = torch.randint(2, s.vocab, (1, prompt), generator=torch.Generator().manual_seed(0)).to(device)  # (1, P)
    autocast = build_precision(precision, device).autocast

    def run_ours() -> float:
        with torch.inference_mode(), autocast():
            return timed(lambda: generate(models["ours"], ids, new_tokens, eos_id=None, temperature=1.0), device)

    def run_hf() -> float:
        with torch.inference_mode(), autocast():
            return timed(lambda: models["hf"].generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0,
                max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0), device)

    times = interleaved({"ours": run_ours, "hf": run_hf}, repeats, warmup=1)
    out: dict = {"prompt": prompt, "new_tokens": new_tokens}
    for k, t in times.items():
        stats = summarize(t)
        out[k] = {**stats, "tokens_per_s": new_tokens / stats["median_s"]}
    out["speedup"] = out["hf"]["median_s"] / out["ours"]["median_s"]
    return out
