"""What goes beside the weights of a Hugging Face export: tokenizer files, generation config, model card.

The tokenizer gets a post-processor that adds what our pipeline adds around a
text (``</s>`` after a source; ``<cls> ... <sep>`` around an encoder's input),
so `AutoTokenizer` gives our ids; a chat model's tokenizer gets a Jinja
``chat_template`` that renders our role markers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainformer.config import Config
from trainformer.data.tokenizer import BOS_ID, CLS_ID, EOS_ID, PAD_ID, SEP_ID, SPECIAL_TOKENS
from trainformer.interop import require

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{{ message['content'] | trim | replace('<|system|>', '< |system|>') | replace('<|user|>', '< |user|>')"
    " | replace('<|assistant|>', '< |assistant|>') | replace('<|end|>', '< |end|>') }}"
    "{{ '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _post_processor(task: str):
    """What our pipeline adds around a text, as a `tokenizers` post-processor (None: nothing)."""
    from tokenizers import processors

    pad, unk, bos, eos, mask, sep, cls = SPECIAL_TOKENS
    if task == "translation":  # sources end with </s>
        return processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A {eos} $B {eos}",
                                             special_tokens=[(eos, EOS_ID)])
    if task in ("ner", "mlm"):  # <cls> words <sep>
        return processors.TemplateProcessing(single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B {sep}",
                                             special_tokens=[(cls, CLS_ID), (sep, SEP_ID)])
    return None


def save_hf_tokenizer(tokenizer_json: Path, cfg: Config, out: Path) -> None:
    """tokenizer.json + tokenizer_config.json that `AutoTokenizer` loads, giving our ids."""
    from tokenizers import Tokenizer

    transformers = require("transformers")
    tok = Tokenizer.from_file(str(tokenizer_json))
    post = _post_processor(cfg.task)
    if post is not None:
        tok.post_processor = post
    pad, unk, bos, eos, mask, sep, cls = SPECIAL_TOKENS
    is_lm = cfg.task in ("lm", "chat")
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=pad, unk_token=unk, bos_token=eos if is_lm else bos, eos_token=eos,
        mask_token=mask, sep_token=sep, cls_token=cls, model_max_length=cfg.model.max_len,
        clean_up_tokenization_spaces=False,
    )
    if tok.token_to_id("<|assistant|>") is not None:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))


def generation_config(cfg: Config) -> dict[str, Any] | None:
    """generation_config.json: how our translate / chat decode by default."""
    if cfg.task == "translation":
        beam = dict(num_beams=cfg.eval.beam, length_penalty=cfg.eval.length_penalty, early_stopping=True)
        return dict(decoder_start_token_id=BOS_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                    pad_token_id=PAD_ID, max_length=cfg.model.max_len, **(beam if cfg.eval.beam > 1 else {}))
    if cfg.task in ("lm", "chat"):
        return dict(bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                    max_length=cfg.model.max_len)
    return None


def _summary(model_dir: Path) -> dict[str, Any]:
    """The run's summary.json when the model dir sits in a run dir (model_dir = RUN/model)."""
    path = model_dir.parent / "summary.json"
    if model_dir.name == "model" and path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return {}
    return {}


# Where each built-in dataset comes from and its licence (see the data README), for model cards.
DATA_SOURCES = {
    "tatoeba-en-fr": "Tatoeba English-French pairs via manythings.org/anki (CC-BY 2.0 France; "
    "attribution: www.manythings.org/anki and tatoeba.org)",
    "conll2003": "CoNLL-2003 English NER (Reuters RCV1 text: research use only)",
    "wnut17": "WNUT-17 emerging entities (CC-BY 4.0)",
    "semeval2010": "SemEval-2010 Task 8 relations (CC-BY 3.0)",
    "dailydialog": "DailyDialog (CC BY-NC-SA 4.0: non-commercial)",
    "tinyshakespeare": "Tiny Shakespeare (public domain text)",
    "tinystories": "TinyStories sample (CDLA-Sharing-1.0)",
}


def model_card(cfg: Config, arch: str, source: Path, notes: list[str]) -> str:
    """README.md of an export: task, data, metrics of the run, how it was made, what HF does not carry."""
    m = cfg.model
    summary = _summary(source)
    data_line = f"`{cfg.data.dataset}`"
    if cfg.data.dataset in DATA_SOURCES:
        data_line += f": {DATA_SOURCES[cfg.data.dataset]}"
    lines = [
        "---", "library_name: transformers", f"tags: [trainformer, {cfg.task}]", "---", "",
        f"# {cfg.name}: a trainformer {cfg.task} model as `{arch}`", "",
        f"Trained with trainformer's recipe `{cfg.name}`"
        + (f" ({cfg.description.strip()})" if cfg.description.strip() else "") + ".", "",
        f"- Task: {cfg.task}; data: {data_line}",
        f"- Model: {m.family}, {m.n_layers} layers"
        + (f" + {m.n_decoder_layers or m.n_layers} decoder layers" if m.family == "encoder_decoder" else "")
        + f", d_model {m.d_model}, {m.n_heads} heads, d_ff {m.d_ff}, vocabulary {m.vocab_size}, "
        f"positions {m.position}, {'pre' if m.norm_first else 'post'}-norm",
    ]
    for split in ("test", "valid"):
        scores = {k: v for k, v in (summary.get(split) or {}).items()
                  if isinstance(v, (int, float)) and not k.endswith(("sentences", "examples", "entities"))}
        if scores:
            lines.append(f"- {split.capitalize()} scores of the training run (trainformer's own decoding): "
                         + ", ".join(f"{k} {round(v, 4)}" for k, v in scores.items()))
    if summary.get("steps"):
        lines.append(f"- Training: {summary['steps']} steps, {summary.get('precision', '?')}, "
                     f"{summary.get('wall_time_s', 0) / 60:.0f} minutes")
    lines += ["", "## Use", "", "```python"]
    lines += _usage(cfg)
    lines += ["```", "", "## Made with", "", "```bash",
              f"trainformer train {cfg.name}" + "   # the recipe", "trainformer export MODEL_DIR --to hf --out DIR",
              "```"]
    if notes:
        lines += ["", "## What the Hugging Face class does not carry", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _usage(cfg: Config) -> list[str]:
    if cfg.task == "translation":
        return ["from transformers import AutoModelForSeq2SeqLM, AutoTokenizer",
                'tokenizer = AutoTokenizer.from_pretrained("DIR")',
                'model = AutoModelForSeq2SeqLM.from_pretrained("DIR")',
                'batch = tokenizer(["Where is the station?"], return_tensors="pt", padding=True)',
                "print(tokenizer.batch_decode(model.generate(**batch), skip_special_tokens=True))"]
    if cfg.task in ("lm", "chat"):
        return ["from transformers import pipeline", 'generate = pipeline("text-generation", model="DIR")',
                'print(generate("Once upon a time", max_new_tokens=40)[0]["generated_text"])']
    if cfg.task == "ner":
        return ["from transformers import pipeline",
                'tag = pipeline("token-classification", model="DIR", aggregation_strategy="first")',
                'print(tag("Angela Merkel visited Paris."))']
    return ["from transformers import pipeline", 'fill = pipeline("fill-mask", model="DIR")',
            'print(fill("Paris is the <mask> of France."))']


def export_notes(cfg: Config) -> list[str]:
    """Parts of our model or decoding that the HF class leaves out."""
    notes = []
    if cfg.task == "ner" and cfg.model.crf:
        notes.append("The CRF's tag-transition scores (and trainformer's Viterbi decoding with the tag-bigram "
                     "prior): HF token classification takes the argmax of each token's scores, so its tags "
                     "can break BIO order and its F1 is lower than `trainformer extract`'s.")
    if cfg.task == "ner":
        notes.append("Word-level tagging: trainformer tags the first subword of each word; use "
                     "`aggregation_strategy=\"first\"` in the pipeline for the same reading.")
    if cfg.task == "translation" and cfg.eval.beam > 1:
        notes.append("Beam scores: trainformer divides a hypothesis' log-probability by GNMT's length penalty "
                     f"((5 + n) / 6) ** {cfg.eval.length_penalty}, transformers by n ** {cfg.eval.length_penalty}; "
                     "at length_penalty 0 both give the same beams.")
    if cfg.task == "translation":
        notes.append("Length limit: trainformer stops at eval.max_len_a x source length + eval.max_len_b "
                     f"({cfg.eval.max_len_a} x + {cfg.eval.max_len_b}) tokens; generation_config.json "
                     "holds a fixed max_length instead.")
    return notes
