"""CTranslate2 models from our model dirs, and translating / chatting with them.

Export writes the model as a Hugging Face directory (`interop.hf.export_hf`,
Pegasus or Marian for translation, GPT-2 for lm and chat) into a temp dir and
converts that with CTranslate2's own `TransformersConverter`. Three fix-ups
to the converter's model spec make CTranslate2 compute what our model
computes (greedy output is identical, see tests/test_interop_ct2.py):

- Decoder start: our decoder starts from ``<s>`` (BOS, id 2). The converter
  starts Pegasus from ``<pad>`` and Marian from a zero embedding, and cuts
  Marian's last embedding row (Marian's ``<pad>``; ours is a real token). The
  spec gets ``decoder_start_token = "<s>"``, and Marian the embedding of it
  and its full embedding matrix back.
- LayerNorm epsilon: the converter leaves it unset for these classes; it
  gets ours (``model.norm_eps``).
- Pegasus: the converter reads ``normalize_before`` / ``normalize_embedding``,
  which the google/pegasus-* configs carry and transformers' `PegasusConfig`
  does not define; they are set to what Pegasus is (pre-norm, no embedding
  LayerNorm).

The CTranslate2 dir then gets our ``tokenizer.json``, our config as
``trainformer.json`` (CTranslate2 owns ``config.json``) and ``labels.json``
if any, so it describes itself: `read_ct2_dir` needs nothing else.

Decoding: `Ct2Translator` has `Translator.translate`'s contract (and shares
its frame, `inference.translator.translate_in_order`), and `Ct2Generator`
writes the replies of a `Chatbot` as our `TorchGenerator` does; both hand
CTranslate2 token strings of our tokenizer and detokenise its output with it. Where CTranslate2 decodes
differently from us (beam length penalty, sampling RNG, repetition
penalty) the docstrings say how.
"""

from __future__ import annotations

import itertools
import json
import queue
import shutil
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from trainformer.config import Config, from_dict
from trainformer.data.tokenizer import BOS_ID, EOS_ID, SPECIAL_TOKENS, TextTokenizer
from trainformer.errors import UserError
from trainformer.generation.greedy import length_limits, strip_eos
from trainformer.inference.chatbot import Chatbot
from trainformer.inference.sampling import SamplingSettings
from trainformer.inference.translator import source_window, translate_in_order
from trainformer.interop import require
from trainformer.interop.hf import export_hf

# Weight types CTranslate2's converter accepts (`ctranslate2.specs.model_spec.ACCEPTED_MODEL_TYPES`).
QUANTIZATIONS = ("int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16", "float16",
                 "bfloat16", "float32")
MANIFEST = "trainformer.json"  # our config in a CTranslate2 dir (its config.json is CTranslate2's)
# --precision of the inference verbs -> CTranslate2 compute type ("default": the type it was saved in)
COMPUTE_TYPES = {"auto": "default", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


# ----------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------


def export_ct2(loaded, out: Path, quantization: str = "float32") -> None:
    """Write `loaded` (a `LoadedModel`) into the empty dir `out` as a CTranslate2 model.

    Args:
        loaded: an encoder-decoder (translation) or decoder (lm, chat) model dir, loaded.
        out: an existing empty directory (the caller handles atomic rename and --force).
        quantization: CTranslate2 weight type, one of `QUANTIZATIONS`.
    """
    if quantization not in QUANTIZATIONS:
        raise UserError(f"--quantization: expected one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    m = loaded.cfg.model
    if m.family == "encoder":
        raise UserError(f"cannot export this encoder ({loaded.cfg.task}) model to CTranslate2: trainformer "
                        "serves translation (encoder-decoder) and lm/chat (decoder) models with it; "
                        "use --to hf or --to onnx")
    out = Path(out)
    if out.exists() and any(out.iterdir()):  # the converter empties its output dir: never a user's files
        raise UserError(f"{out}: not empty")
    require("ctranslate2")
    with tempfile.TemporaryDirectory(prefix="trainformer-ct2-") as tmp:
        hf_dir = Path(tmp)
        export_hf(loaded, hf_dir)  # also writes trainformer.json: our resolved config
        converter = _converter(hf_dir, m.norm_eps, copy_files=[MANIFEST])
        converter.convert(str(out), quantization=quantization, force=True)
    shutil.copyfile(loaded.tokenizer_path, out / "tokenizer.json")
    if (loaded.path / "labels.json").is_file():
        shutil.copyfile(loaded.path / "labels.json", out / "labels.json")


def _converter(hf_dir: Path, norm_eps: float, copy_files: list[str]):
    """A `TransformersConverter` for `hf_dir` with the fix-ups of the module docstring."""
    from ctranslate2.converters import TransformersConverter

    class Converter(TransformersConverter):
        hf_model = None

        def load_model(self, model_class, model_name_or_path, **kwargs):
            model = super().load_model(model_class, model_name_or_path, **kwargs)
            if model.config.model_type == "pegasus":
                model.config.normalize_before = True
                model.config.normalize_embedding = False
            self.hf_model = model
            return model

        def _load(self):  # `Converter.convert` builds the spec here; the fix-ups go on top
            spec = super()._load()
            spec.config.layer_norm_epsilon = norm_eps
            if self.hf_model.config.is_encoder_decoder:
                _start_decoder_from_bos(spec, self.hf_model)
            return spec

    return Converter(str(hf_dir), copy_files=copy_files)


def _start_decoder_from_bos(spec, hf_model) -> None:
    """Make the converted seq2seq decoder start as ours does: from the embedding of <s>."""
    spec.config.decoder_start_token = spec.config.bos_token = SPECIAL_TOKENS[BOS_ID]
    if hf_model.config.model_type == "marian":
        spec.decoder.start_from_zero_embedding = False
        # the converter cut the last row (Marian's <pad>); ours is a real token
        spec.encoder.embeddings[0].weight = hf_model.model.encoder.embed_tokens.weight
        spec.decoder.embeddings.weight = hf_model.model.decoder.embed_tokens.weight
        spec.decoder.projection.weight = hf_model.lm_head.weight


# ----------------------------------------------------------------------------
# Reading a CTranslate2 dir
# ----------------------------------------------------------------------------


def is_ct2_dir(path: str | Path) -> bool:
    """A dir written by `export_ct2` (CTranslate2 weights and our config beside them)."""
    p = Path(path)
    return (p / "model.bin").is_file() and (p / MANIFEST).is_file()


def read_ct2_dir(path: str | Path, tasks: tuple[str, ...]) -> tuple[Path, Config, TextTokenizer]:
    """(dir, our config, tokenizer) of a CTranslate2 export of a `tasks` model, or a one-line UserError."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"model directory not found: {p}")
    if not is_ct2_dir(p):
        hint = " (a trainformer model dir: use --engine torch)" if (p / "model.safetensors").is_file() else ""
        raise UserError(f"{p}: not a CTranslate2 export (expected model.bin and {MANIFEST}, as "
                        f"'trainformer export MODEL_DIR --to ctranslate2' writes){hint}")
    try:
        cfg = from_dict(json.loads((p / MANIFEST).read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{p / MANIFEST}: unreadable ({e})") from None
    if cfg.task not in tasks:
        raise UserError(f"{p}: a {cfg.task!r} model, expected {' or '.join(map(repr, tasks))}")
    return p, cfg, TextTokenizer.load(p / "tokenizer.json")


def compute_type_of(precision: str) -> str:
    """CTranslate2 compute type of an inference verb's --precision."""
    return COMPUTE_TYPES[precision]


def _runtime_options(device: str, threads: int, compute_type: str | None) -> dict[str, Any]:
    """Keyword arguments of `ctranslate2.Translator` / `Generator` for our --device names."""
    ctranslate2 = require("ctranslate2")
    name, _, index = device.partition(":")
    if name not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {device}: expected auto, cpu or cuda[:N]")
    if name == "cuda" and ctranslate2.get_cuda_device_count() == 0:
        raise UserError(f"--device {device}: this CTranslate2 sees no CUDA device")
    return dict(device=name, device_index=int(index or 0), compute_type=compute_type or "default",
                intra_threads=threads)


def _open(cls, path: Path, options: dict[str, Any]):
    """`cls(path, **options)`, with CTranslate2's refusals (compute type, device) as one line."""
    try:
        return cls(str(path), **options)
    except (ValueError, RuntimeError) as e:
        raise UserError(f"{path}: CTranslate2 cannot load it: {str(e).splitlines()[0]}") from None


def _sampling_options(temperature: float, top_k: int, top_p: float) -> dict[str, Any]:
    """CTranslate2's sampling arguments; temperature 0 is greedy, top_k 0 samples from every token."""
    if temperature == 0:
        return dict(sampling_topk=1)
    return dict(sampling_topk=top_k, sampling_topp=top_p, sampling_temperature=temperature)


# ----------------------------------------------------------------------------
# Translation
# ----------------------------------------------------------------------------


class Ct2Translator:
    """`Translator.translate` on a CTranslate2 model: same arguments, same results for greedy.

    Matched to our decoding (`generation.greedy`, `generation.beam`):

    - Decoder start ``<s>`` (set at export) and no target prefix.
    - Length limit: our ``a * src_len + b`` (or ``max_len``), capped by the
      position table, from the same `length_limits`; CTranslate2 takes one
      ``max_decoding_length`` per call, so sentences are decoded in groups
      that share a limit. Both count EOS in the limit, and both may end with
      EOS at the first step (``min_decoding_length=0``).
    - Beam search keeps the 2 x beam best extensions and stops a source once
      `beam` hypotheses ended, as ours does (at alpha exactly 0 CTranslate2
      stops when the best beam ends instead, so it gets 1e-6 then); the scores
      differ in the length penalty: ours is GNMT's ``logp / ((5 + n) / 6) ** alpha``, CTranslate2's
      ``logp / n ** alpha`` (n counts EOS in both: ``return_end_token``). With
      alpha = 0 the n-best lists are the same; otherwise CTranslate2
      normalises more strongly, so a few sentences may pick another length
      (on the toy language of the tests 1-best agrees at alpha 1, 2nd-best on
      ~94%). No CTranslate2 option gives GNMT's form.
    - Sampling draws from CTranslate2's own generator (seeded by
      ``sampling["seed"]``): reproducible, but not the samples of the torch engine.
    """

    def __init__(self, path: Path, tokenizer: TextTokenizer, cfg: Config, options: dict[str, Any]):
        self.path, self.tokenizer, self.cfg, self.options = path, tokenizer, cfg, options
        self.max_src = source_window(cfg)  # sources are read as `Translator` reads them
        self.truncated = 0
        self.translator = self._load()

    def _load(self):
        return _open(require("ctranslate2").Translator, self.path, self.options)

    def translate(
        self,
        sentences: list[str],
        beam: int = 4,
        nbest: int = 1,
        max_len: int | None = None,
        sampling: dict | None = None,
    ) -> list[list[str]]:
        """Translations of `sentences` in input order: `nbest` strings each (see `Translator.translate`)."""
        translator = self.translator if sampling is None else self._seeded(int(sampling.get("seed", 0)))
        options = self._decode_options(beam, nbest, sampling)
        results, self.truncated = translate_in_order(
            sentences, nbest, self.tokenizer, self.max_src,
            lambda encoded: self._translate_ids(translator, encoded, max_len, options),
        )
        return results

    def _translate_ids(self, translator, encoded: list[list[int]], max_len: int | None,
                       options: dict[str, Any]) -> list[list[str]]:
        """The texts of each encoded source, in the order given: decoded in groups that share
        a length limit (CTranslate2 takes one per call)."""
        out: list[list[str]] = [[] for _ in encoded]
        limits = self._limits(encoded, max_len)
        by_limit = sorted(range(len(encoded)), key=limits.__getitem__)
        for limit, group in itertools.groupby(by_limit, key=limits.__getitem__):
            group = list(group)
            tokens = [[self.tokenizer.id_to_token(t) for t in encoded[b]] for b in group]
            outs = translator.translate_batch(tokens, max_decoding_length=limit, **options)
            for b, result in zip(group, outs):
                out[b] = [self._detokenize(h) for h in result.hypotheses]
        return out

    def _limits(self, encoded: list[list[int]], max_len: int | None) -> list[int]:
        """Our per-sentence length limits (`length_limits` on a mask of the source lengths)."""
        if not encoded:
            return []
        lengths = torch.tensor([len(e) for e in encoded])
        mask = torch.arange(int(lengths.max()))[None, :] < lengths[:, None]  # (N, S)
        e = self.cfg.eval
        return length_limits(mask, mask, self.cfg.model.max_len, max_len, e.max_len_a, e.max_len_b)

    def _decode_options(self, beam: int, nbest: int, sampling: dict | None) -> dict[str, Any]:
        budget = max(self.cfg.eval.batch_tokens // max(beam, 1), 64)  # source tokens per batch, as ours
        options = dict(max_batch_size=budget, batch_type="tokens", min_decoding_length=0,
                       max_input_length=0, return_end_token=True, return_scores=False)
        if sampling is not None:
            return options | dict(beam_size=1, **_sampling_options(
                float(sampling.get("temperature", 1.0)), int(sampling.get("top_k", 0)),
                float(sampling.get("top_p", 1.0))))
        if beam <= 1:
            return options | dict(beam_size=1)
        # At a penalty of exactly 0 CTranslate2 stops a source when its best beam ends, not when `beam`
        # hypotheses have ended as we do; a negligible penalty keeps our rule (n ** 1e-6 < 1 + 1e-5).
        alpha = self.cfg.eval.length_penalty or 1e-6
        return options | dict(beam_size=beam, num_hypotheses=nbest, length_penalty=alpha)

    def _seeded(self, seed: int):
        """A translator whose sampler starts from `seed` (CTranslate2 seeds a worker when it starts)."""
        require("ctranslate2").set_random_seed(seed)
        return self._load()

    def _detokenize(self, tokens: Sequence[str]) -> str:
        ids = [self.tokenizer.token_to_id(t) for t in tokens]
        return self.tokenizer.decode(strip_eos(ids, EOS_ID))


def load_ct2_translator(path: str | Path, device: str = "cpu", threads: int = 0,
                        compute_type: str | None = None) -> Ct2Translator:
    """A `Ct2Translator` of a CTranslate2 export of a translation model.

    Args:
        device: auto, cpu or cuda[:N]; threads: CTranslate2's intra_threads (0 = its default).
        compute_type: CTranslate2 compute type; None = the type the model was exported in.
    """
    p, cfg, tokenizer = read_ct2_dir(path, ("translation",))
    return Ct2Translator(p, tokenizer, cfg, _runtime_options(device, threads, compute_type))


# ----------------------------------------------------------------------------
# Language models and chat
# ----------------------------------------------------------------------------


class Ct2Generator:
    """Continuations of token prompts by a CTranslate2 decoder, as `inference.sampling.sample_ids` gives them;
    the `SamplingEngine` of a `Chatbot` on a CTranslate2 export.

    Greedy (temperature 0) equals ours. Sampling uses CTranslate2's generator,
    seeded once when this object is made (as our session generator is), and
    its top-k / top-p filters; its repetition penalty counts the generated
    tokens only (the prompt is fed in one pass), where ours counts the prompt too.
    """

    def __init__(self, path: Path, tokenizer: TextTokenizer, cfg: Config, options: dict[str, Any],
                 seed: int = 0):
        self.tokenizer, self.cfg = tokenizer, cfg
        ctranslate2 = require("ctranslate2")
        ctranslate2.set_random_seed(seed)  # read when the generator's worker thread starts
        self.generator = _open(ctranslate2.Generator, path, options)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        settings: SamplingSettings,
        end_id: int,
        stream: Callable[[int, int], None] | None = None,
    ) -> list[list[int]]:
        """Per prompt, the generated ids without `end_id`; `stream(row, token)` sees each as it comes.

        At most ``settings.max_new_tokens``, and no further than the model's window
        from the longest prompt (as `generation.generate`).
        """
        steps = min(settings.max_new_tokens, self.cfg.model.max_len - max(len(p) for p in prompts))
        if steps < 1:
            return [[] for _ in prompts]
        end = self.tokenizer.id_to_token(end_id)
        tokens = [[self.tokenizer.id_to_token(i) for i in p] for p in prompts]
        options = dict(max_length=steps, min_length=0, end_token=end, include_prompt_in_result=False,
                       repetition_penalty=settings.repetition_penalty,
                       **_sampling_options(settings.temperature, settings.top_k, settings.top_p))
        if stream is None:
            outs = self.generator.generate_batch(tokens, **options)
        else:
            def show(row: int, token: str) -> None:
                if token != end:  # the end token is not part of the reply
                    stream(row, self.tokenizer.token_to_id(token))

            outs = self._streamed(tokens, options, show)
        return [[self.tokenizer.token_to_id(t) for t in out.sequences[0]] for out in outs]

    def _streamed(self, tokens: list[list[str]], options: dict[str, Any], show: Callable[[int, str], None]):
        """`generate_batch` results, with ``show(row, token)`` called in this thread as tokens come.

        CTranslate2 calls its callback in its own worker thread, so the callback
        only queues the token: an exception there (a closed stdout) would abort
        the process, and a callback holding the last reference to this object
        would destroy the generator inside its own thread (std::system_error).
        Here ``show`` runs in the caller's thread, where Ctrl-C stops decoding.
        """
        pending: queue.Queue = queue.Queue()
        stop = threading.Event()

        def on_step(step) -> bool:  # in CTranslate2's worker thread; True = stop this row
            pending.put((step.batch_id, step.token))
            return stop.is_set()

        results = self.generator.generate_batch(tokens, asynchronous=True, callback=on_step, **options)
        try:
            while True:
                try:
                    show(*pending.get(timeout=0.02))
                except queue.Empty:
                    if all(r.done() for r in results) and pending.empty():
                        break  # every step was queued before its result completed
        finally:
            stop.set()
            outs = [r.result() for r in results]
        return outs


def load_ct2_generator(path: str | Path, device: str = "cpu", threads: int = 0,
                       compute_type: str | None = None, seed: int = 0,
                       tasks: tuple[str, ...] = ("lm", "chat")) -> Ct2Generator:
    """A `Ct2Generator` of a CTranslate2 export of an lm or chat model.

    Arguments as `load_ct2_translator`; `seed` seeds its sampler for the whole session.
    """
    p, cfg, tokenizer = read_ct2_dir(path, tasks)
    return Ct2Generator(p, tokenizer, cfg, _runtime_options(device, threads, compute_type), seed)


def load_ct2_chatbot(path: str | Path, settings: SamplingSettings, system: str | None = None,
                     device: str = "cpu", threads: int = 0, compute_type: str | None = None) -> Chatbot:
    """`load_chatbot` for a CTranslate2 export of a chat model: our `Chatbot` (history, window
    fitting, streaming), its replies written by a `Ct2Generator`."""
    engine = load_ct2_generator(path, device, threads, compute_type, settings.seed, ("chat",))
    return Chatbot(engine, engine.tokenizer, engine.cfg.model.max_len, settings, system)
