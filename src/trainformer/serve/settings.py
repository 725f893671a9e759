"""What a server allows and how it batches: one dataclass, filled from `trainformer serve`'s flags."""

from __future__ import annotations

from dataclasses import dataclass

from trainformer.errors import UserError


@dataclass
class ServeSettings:
    """Limits on requests and the dynamic batcher's bounds.

    Attributes:
        max_body_bytes: a larger request body is refused (413) before it is parsed.
        max_texts: texts per translate / extract request, prompts per completion request.
        max_text_tokens: tokens per text (also capped by each model's own window).
        max_reply_tokens: the most tokens one reply (chat, completion, translation) may ask for.
        max_n: most choices (``n``) per chat or completion request.
        timeout_s: a request not answered in this time gets 504 and its work is dropped.
        max_batch_tokens: work merged into one batch, in tokens (translation: source tokens
            x beam; generation: prompt + reply tokens, the KV cache it needs).
        max_batch_requests: requests merged into one batch; 1 = no dynamic batching.
        max_wait_ms: how long the first request of a batch waits for companions.
        max_queue: requests waiting per model; more are refused with 429.
        api_key: when set, /v1/* and /metrics need ``Authorization: Bearer <key>``.
        device, precision: where and how the models run (as for every inference verb).
    """

    max_body_bytes: int = 1 << 20
    max_texts: int = 64
    max_text_tokens: int = 512
    max_reply_tokens: int = 256
    max_n: int = 8
    timeout_s: float = 60.0
    max_batch_tokens: int = 8192
    max_batch_requests: int = 256
    max_wait_ms: float = 5.0
    max_queue: int = 1024
    api_key: str | None = None
    device: str = "auto"
    precision: str = "auto"

    def check(self) -> ServeSettings:
        """Raise `UserError` naming the first flag out of range."""
        positive = {
            "--max-body-bytes": self.max_body_bytes, "--max-texts": self.max_texts,
            "--max-text-tokens": self.max_text_tokens, "--max-reply-tokens": self.max_reply_tokens,
            "--max-n": self.max_n, "--max-batch-tokens": self.max_batch_tokens,
            "--max-batch-requests": self.max_batch_requests, "--max-queue": self.max_queue,
        }
        for flag, value in positive.items():
            if value < 1:
                raise UserError(f"{flag}: expected an integer >= 1, got {value}")
        if not self.timeout_s > 0:
            raise UserError(f"--timeout: expected seconds > 0, got {self.timeout_s}")
        if self.max_wait_ms < 0:
            raise UserError(f"--max-wait-ms: expected milliseconds >= 0, got {self.max_wait_ms}")
        if self.api_key is not None and not self.api_key.strip():
            raise UserError("--api-key: expected a non-empty key")
        return self

    @property
    def batching(self) -> bool:
        return self.max_batch_requests > 1
