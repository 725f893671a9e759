"""Request bodies: reading them under a size limit, and their pydantic models.

`read_json` turns every way a body can be wrong into one `APIError` with a
clear message: too large (413), not UTF-8, not JSON, not an object, a string
holding a lone surrogate (``"\\ud800"``: valid JSON, but no UTF-8 text), a
missing field or a wrong type (400, naming the field). The models are strict:
``"beam": "4"`` is a wrong type, not 4. Our own endpoints (translate,
extract) refuse unknown fields, so a typo such as ``"text"`` is an error;
the OpenAI ones ignore fields they do not know (clients add new ones) but
refuse the known ones we do not implement (tools, logprobs, ...).
"""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request

from trainformer.serve.errors import APIError, bad_request

M = TypeVar("M", bound=BaseModel)


async def read_json(request: Request, model: type[M], max_bytes: int) -> M:
    """The body of `request` validated as `model`; an `APIError` for every kind of bad body."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    return parse_json(b"".join(chunks), model)


def parse_json(raw: bytes, model: type[M]) -> M:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {e.start})", "invalid_utf8") from None
    if not text.strip():
        raise APIError(400, "the request body is empty; expected a JSON object", "invalid_json")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise APIError(400, f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}",
                       "invalid_json") from None
    except RecursionError:
        raise APIError(400, "the JSON is nested too deeply", "invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"expected a JSON object, got {type(data).__name__}", "invalid_json")
    try:
        _check_surrogates(data, "")
    except RecursionError:
        raise APIError(400, "the JSON is nested too deeply", "invalid_json") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from None


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than {limit} bytes (see --max-body-bytes)",
                    "body_too_large")


def _check_surrogates(value: Any, path: str) -> None:
    """A lone surrogate (from a ``\\ud800`` escape) is valid JSON but no text: refuse it here."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise APIError(400, f"{path or 'body'}: not valid Unicode text (a lone surrogate at "
                           f"character {e.start})", "invalid_utf8", path or None) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_surrogates(k, path)
            _check_surrogates(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_surrogates(v, f"{path}[{i}]")


_UNION_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}


def field_path(loc: tuple) -> str:
    """pydantic's ``('texts', 3)`` -> ``texts[3]``; the branch names of unions
    (``'str'``, ``'list[str]'``, model class names) are left out."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _UNION_TAGS or "[" in part or part[:1].isupper() or "-" in part:
            continue
        else:
            out += f".{part}" if out else part
    return out


def _validation_error(e: ValidationError) -> APIError:
    errors = e.errors(include_url=False)
    # For a union (``str | list[ContentPart]``) pydantic reports each branch; the deepest
    # error is the useful one (``messages[0].content[0].type`` rather than "not a string").
    first = max(errors, key=lambda err: len(err["loc"]))
    param = field_path(tuple(first["loc"])) or None
    kind, msg = first["type"], first["msg"]
    if kind == "missing":
        msg, code = "a required field is missing", "missing_field"
    elif kind == "extra_forbidden":
        msg, code = "unknown field", "unknown_field"
    else:
        code = "invalid_type" if kind.endswith(("_type", "_parsing")) else "invalid_value"
    return bad_request(f"{param or 'body'}: {msg}", param, code)


# ----------------------------------------------------------------------------
# Our endpoints
# ----------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class TranslateRequest(_Strict):
    model: str
    texts: list[str] = Field(min_length=1)
    beam: int | None = Field(None, ge=1, le=16, description="beam size; 1 = greedy; default: the model's eval.beam")
    nbest: int = Field(1, ge=1, le=16, description="translations per text (<= beam)")
    max_len: int | None = Field(None, ge=1, description="most tokens per translation")


class ExtractRequest(_Strict):
    model: str
    texts: list[str] = Field(min_length=1)


# ----------------------------------------------------------------------------
# OpenAI-compatible endpoints
# ----------------------------------------------------------------------------


class _Lenient(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class ContentPart(_Lenient):
    type: Literal["text"]
    text: str


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Lenient):
    include_usage: bool = False


class SamplingRequest(_Lenient):
    """What chat and completion requests share: sampling, stopping, streaming."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)  # an extension (vLLM has it too); 0 = off
    repetition_penalty: float | None = Field(None, gt=0.0)  # an extension; 1 = off
    seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 63)
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    user: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """(field, why) of the first requested feature we do not implement, or None."""
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                return name, "is not supported (use repetition_penalty, e.g. 1.1)"
        if self.logit_bias:
            return "logit_bias", "is not supported"
        return None


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.logprobs:
            return "logprobs", "is not supported"
        for name in ("tools", "functions"):
            if getattr(self, name):
                return name, "is not supported: these models have no tool calling"
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            return "response_format", "only {\"type\": \"text\"} is supported"
        return super().unsupported()


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]
    echo: bool | None = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.logprobs is not None:
            return "logprobs", "is not supported"
        if self.suffix:
            return "suffix", "is not supported (no infilling)"
        if self.best_of not in (None, 1) and self.best_of != self.n:
            return "best_of", "is not supported"
        return super().unsupported()
