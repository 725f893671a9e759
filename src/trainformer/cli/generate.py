"""`trainformer generate MODEL_DIR --prompt TEXT`: continue a text with a language model.

Plain continuation (no chat template) from an `lm` model — or a chat model.
The prompt starts as a document does in pretraining (after ``</s>``); an
empty prompt samples from scratch. Without ``--prompt`` every stdin line is
a prompt. The continuation is streamed as it is generated.
"""

from __future__ import annotations

import sys

from trainformer.cli.common import add_model_verb, add_runtime_args
from trainformer.textio import read_lines


def add_sampling_args(p) -> None:
    """The sampling flags shared by `generate` and `chat`."""
    p.add_argument("--max-new-tokens", type=int, default=64, help="most tokens generated per reply (default 64)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (1 = off; default 0.9)")
    p.add_argument("--repetition-penalty", type=float, default=1.1, help="CTRL penalty on seen tokens (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="fixes the samples (same seed, same output)")
    add_runtime_args(p)


def sampling_settings(args):
    from trainformer.inference.sampling import SamplingSettings

    return SamplingSettings(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens, seed=args.seed,
    ).check()


def add_parser(sub) -> None:
    p = add_model_verb(
        sub, "generate", help="continue a text with a language model",
        description="Sample a continuation of --prompt (or of each stdin line) from an lm or chat "
        "model. The output is the prompt followed by its continuation, one per prompt.",
    )
    p.add_argument("--prompt", default=None, help="the text to continue (default: one prompt per stdin line)")
    add_sampling_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from trainformer.data.tokenizer import EOS_ID
    from trainformer.inference.loading import load_for_task
    from trainformer.inference.sampling import StreamDecoder, TorchGenerator, prompt_ids

    settings = sampling_settings(args)
    prompts = [args.prompt] if args.prompt is not None else read_lines("-")
    loaded, tokenizer = load_for_task(args.model_dir, ("lm", "chat"), args.device)
    engine = TorchGenerator(loaded.model, settings.seed, args.precision)  # one generator for every prompt
    for text in prompts:
        ids = prompt_ids(tokenizer, text, loaded.cfg.model.max_len, settings.max_new_tokens)
        decoder = StreamDecoder(tokenizer)
        sys.stdout.write(text)
        sys.stdout.flush()

        def show(row: int, token: int, decoder=decoder) -> None:
            sys.stdout.write(decoder.push(token))
            sys.stdout.flush()

        engine.generate([ids], settings, EOS_ID, show)
        sys.stdout.write("\n")
        sys.stdout.flush()
    return 0
