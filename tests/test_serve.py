"""`trainformer serve`: the HTTP API over tiny trained models, in a real uvicorn server on loopback.

Models (trained here in about 12 s, shared with test_serve_sigterm.py and
test_serve_playground.py): a toy EN->FR translator, a NER tagger, a relation
classifier, a language model and a chat model fine-tuned from it. Clients:
the official `openai` package and httpx. Every address is 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from test_chat_e2e import tiny_config, write_dailydialog
from test_ie_cli import conll_text, relation_rows, semeval_text
from test_translation_e2e import make_pairs
from trainformer.cli import main
from trainformer.config import from_dict
from trainformer.rundir import RunDir
from trainformer.serve.app import build_app
from trainformer.serve.batching import Batcher, Engine, Job
from trainformer.serve.decoding import GenRow, ReplyText, RowSampling, decode_rows
from trainformer.serve.engines import ModelSpec, TranslationEngine
from trainformer.serve.errors import APIError
from trainformer.serve.metrics import Metrics
from trainformer.serve.server import bind_socket, exposure_warning, make_server
from trainformer.serve.settings import ServeSettings
from trainformer.tasks import build_task
from trainformer.training.trainer import Trainer

# trains models or starts servers: the end-to-end tier (`pytest -m "not slow"` skips it)
pytestmark = pytest.mark.slow

# ----------------------------------------------------------------------------
# Tiny trained models (built once per session, whichever test module asks first)
# ----------------------------------------------------------------------------

_TRAIN = {"precision": "fp32", "device": "cpu", "threads": 1, "progress": False, "log_every": 100,
          "eval_every": 0, "ckpt_every": 0, "label_smoothing": 0.0}


def _fit(cfg: dict, out: Path) -> Path:
    config = from_dict(cfg)
    Trainer(config, build_task(config), RunDir(out)).fit()
    return out / "model"


def _encoder(head: str) -> dict:
    return {"family": "encoder", "d_model": 32, "n_heads": 2, "n_layers": 1, "d_ff": 64, "max_len": 64,
            "position": "learned", "dropout": 0.0, "head": head}


@functools.cache
def build_models(root: Path) -> dict[str, Path]:
    """Model dirs by name: tr (translation), ner, rel (relations), lm, chat."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "pairs.tsv").write_text("en\tfr\n" + "".join(f"{e}\t{f}\n" for e, f in make_pairs(600)))
    (root / "train.conll").write_text(conll_text(300, 0), encoding="utf-8")
    (root / "rel.tsv").write_text(semeval_text(relation_rows(300, 1)), encoding="utf-8")
    write_dailydialog(root / "data")
    out = {}
    # 1+1 layers, 300 steps: the word-for-word toy language is learnt (test BLEU 100) in ~7 s
    out["tr"] = _fit({
        "task": "translation", "name": "tr",
        "model": {"preset": "tiny-encdec", "d_model": 64, "d_ff": 128, "n_heads": 4, "n_layers": 1, "dropout": 0.0},
        "data": {"dataset": str(root / "pairs.tsv"), "format": "tsv", "max_tokens": 500, "valid_size": 20,
                 "test_size": 20, "tokenizer": {"vocab_size": 100, "min_frequency": 1}},
        "optim": {"lr": 0.003, "warmup_steps": 20, "schedule": "constant"},
        "train": {**_TRAIN, "max_steps": 300}, "eval": {"beam": 2, "samples": 0, "max_examples": 20},
    }, root / "tr")
    tokenizer = {"kind": "wordpiece", "vocab_size": 200, "min_frequency": 1}
    out["ner"] = _fit({
        "task": "ner", "name": "ner", "model": _encoder("tagging"),
        "data": {"dataset": str(root / "train.conll"), "tokenizer": tokenizer, "max_tokens": 512,
                 "valid_size": 20, "test_size": 20},
        "optim": {"lr": 0.005, "warmup_steps": 5, "schedule": "linear"},
        "train": {**_TRAIN, "max_steps": 70}, "eval": {"samples": 0},
    }, root / "ner")
    out["rel"] = _fit({
        "task": "relations", "name": "rel", "model": _encoder("relation"),
        "data": {"dataset": str(root / "rel.tsv"), "tokenizer": tokenizer, "max_tokens": 512,
                 "valid_size": 20, "test_size": 20},
        "optim": {"lr": 0.005, "warmup_steps": 5, "schedule": "linear"},
        "train": {**_TRAIN, "max_steps": 40}, "eval": {"samples": 0},
    }, root / "rel")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRAINFORMER_DATA", str(root / "data"))
        lm = tiny_config("lm", 40)
        Trainer(lm, build_task(lm), RunDir(root / "lm")).fit()
        chat = tiny_config("chat", 60, init_from=str(root / "lm" / "model"))
        Trainer(chat, build_task(chat), RunDir(root / "chat")).fit()
    out["lm"], out["chat"] = root / "lm" / "model", root / "chat" / "model"
    return out


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    return build_models(tmp_path_factory.getbasetemp() / "serve-models")


def specs(models: dict[str, Path], *names: str) -> list[ModelSpec]:
    return [ModelSpec.from_dir(n, models[n]) for n in names or models]


class LiveServer:
    """The app under uvicorn in a thread, on a free loopback port; waits until it is ready."""

    def __init__(self, app, wait_ready: bool = True):
        self.app, self.wait_ready = app, wait_ready
        self.sock = bind_socket("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = make_server(app, shutdown_timeout=5, log_level="warning", access_log=False)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        while self.wait_ready and httpx.get(self.url + "/readyz").status_code != 200:
            assert time.monotonic() < deadline, "models did not load"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()

    def post(self, path: str, body=None, **kw) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=30, **kw)

    def metrics(self) -> dict[tuple, float]:
        """(sample name, sorted labels) -> value of every sample at /metrics."""
        text = httpx.get(self.url + "/metrics", headers=getattr(self, "auth", {})).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.fixture(scope="module")
def server(models):
    # max_wait_ms 30: concurrent test requests reliably meet in batches
    app = build_app(specs(models), ServeSettings(max_wait_ms=30, device="cpu", precision="fp32"))
    with LiveServer(app) as live:
        yield live


def assert_error(response: httpx.Response, status: int, code: str, param: str | None = "?") -> dict:
    """An error in OpenAI's shape, with a message a person can read, and no traceback."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and len(error["message"]) > 10, error
    assert error["type"] == ("invalid_request_error" if status < 429 else error["type"])
    if param != "?":
        assert error["param"] == param, error
    assert "Traceback" not in response.text
    return error


HELLO = "hello , what is your name ?"

# ----------------------------------------------------------------------------
# Batch independence, below HTTP
# ----------------------------------------------------------------------------


def test_translator_merged_batch_equals_separate_calls(models):
    """What the batcher relies on: one translate() over many requests' texts == each alone."""
    from trainformer.inference.loading import load_translator

    translator = load_translator(models["tr"], "cpu", "fp32")
    texts = [e for e, _ in make_pairs(24, seed=5)] + ["red " * 20 + ".", "the cat"]
    for beam in (1, 2, 4):
        merged = translator.translate(texts, beam=beam)
        assert merged == [translator.translate([t], beam=beam)[0] for t in texts], beam


def test_decode_rows_each_row_as_alone_and_as_chatbot(models):
    """Rows with different prompts, settings, seeds and limits give in one batch what they give
    alone; a lone row gives exactly `trainformer chat`'s reply for the same seed."""
    from trainformer.inference.loading import load_chatbot
    from trainformer.inference.sampling import SamplingSettings

    settings = SamplingSettings(temperature=0.9, top_p=0.95, repetition_penalty=1.1, max_new_tokens=20, seed=5)
    bot = load_chatbot(models["chat"], settings, device="cpu", precision="fp32")
    expected = bot.reply(HELLO)
    bot.reset()
    template, model = bot.template, bot.engine.model

    def rows():
        prompts = [HELLO, "where are you going ?", "hi", "have a nice day !"]
        out = []
        for i, text in enumerate(prompts * 2):
            ids = bot.prompt(text)[0]
            sampling = RowSampling(0.0) if i % 2 else RowSampling(0.9, 0, 0.95, 1.1)
            out.append(GenRow(ids, 20 - i, sampling, 5 + i, ReplyText(template.tokenizer, strip=True)))
        return out

    together = rows()
    decode_rows(model, together, template.end_id, "fp32")
    alone = rows()
    for row in alone:
        decode_rows(model, [row], template.end_id, "fp32")
    assert [r.text.ids for r in together] == [r.text.ids for r in alone]
    assert [r.finish_reason for r in together] == [r.finish_reason for r in alone]
    assert together[0].text.text == expected and together[0].cap == 20


class _Chars:
    """A tokenizer whose ids are characters: decode is chr()."""

    def decode(self, ids):
        return "".join(map(chr, ids))


def test_reply_text_holds_back_stop_prefixes_and_whitespace():
    text = ReplyText(_Chars(), stops=["\nUser:"], strip=True)
    pieces = [text.push(ord(c)) for c in "  Hi there\nUs"]
    assert "".join(pieces) == "Hi there"  # "\nUs" may start the stop string: held back
    assert text.push(ord("a")) == "\nUsa" and not text.stopped  # "\nUsa" starts no stop: shown
    pieces = [text.push(ord(c)) for c in "ge \nUser: more"]
    assert "".join(pieces) == "ge" and text.stopped  # the space waited; then the stop string came
    assert text.close() == "" and text.text == "Hi there\nUsage"
    plain = ReplyText(_Chars(), stops=["STOP"])
    assert [plain.push(ord(c)) for c in " aST"] == [" ", "a", "", ""]
    assert plain.push(ord("x")) == "STx" and plain.close() == "" and plain.text == " aSTx"


# ----------------------------------------------------------------------------
# The batcher on its own
# ----------------------------------------------------------------------------


class _Recorder(Engine):
    """Runs batches by recording them; blocks while `gate` is clear; fails on 'boom'."""

    def __init__(self):
        self.batches, self.gate = [], threading.Event()
        self.gate.set()

    def load(self):
        pass

    def run(self, jobs):
        self.gate.wait(10)
        self.batches.append([j.payload for j in jobs])
        if any(j.payload == "boom" for j in jobs):
            raise RuntimeError("boom")
        for j in jobs:
            j.resolve(j.payload.upper())


def test_batcher_merges_by_key_and_budget_and_isolates_failures():
    async def scenario():
        loop = asyncio.get_running_loop()
        engine = _Recorder()
        settings = ServeSettings(max_wait_ms=200, max_batch_tokens=10, max_queue=4)
        batcher = Batcher("m", engine, settings, Metrics())
        batcher.start()
        while batcher.state != "ready":
            await asyncio.sleep(0.01)
        engine.gate.clear()  # the worker holds its first batch until we let it go
        busy = Job(loop, "z", 1, 0)
        batcher.submit(busy)  # alone, on an idle model: it runs at once, without waiting
        while not engine.batches and batcher.queue:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        jobs = [Job(loop, p, cost, key) for p, cost, key in [("a", 4, 1), ("b", 4, 1), ("c", 4, 2), ("d", 4, 1)]]
        for job in jobs:  # they queue up behind "z"
            batcher.submit(job)
        with pytest.raises(APIError) as full:
            batcher.submit(Job(loop, "e", 1, 3))
        assert full.value.status == 429 and full.value.code == "queue_full"
        engine.gate.set()
        results = await asyncio.wait_for(asyncio.gather(busy.future, *(j.future for j in jobs)), 10)
        assert results == ["Z", "A", "B", "C", "D"]
        # a and b share a batch; d has their key but would pass the 10-token budget; c has another key
        assert engine.batches == [["z"], ["a", "b"], ["c"], ["d"]]
        bad, good = Job(loop, "boom", 1, 9), Job(loop, "fine", 1, 9)
        engine.gate.clear()
        batcher.submit(Job(loop, "y", 1, 0))
        await asyncio.sleep(0.05)
        batcher.submit(bad)
        batcher.submit(good)
        engine.gate.set()
        assert await asyncio.wait_for(good.future, 10) == "FINE"  # its companion's failure is not its own
        with pytest.raises(APIError) as failed:
            await asyncio.wait_for(bad.future, 10)
        assert failed.value.status == 500 and "RuntimeError" in failed.value.message
        assert engine.batches[-3:] == [["boom", "fine"], ["boom"], ["fine"]]  # failed together, retried alone
        late = Job(loop, "late", 1, 7)
        late.cancel()  # its client has gone: never run
        batcher.submit(late)
        await asyncio.to_thread(batcher.stop)
        assert not batcher.thread.is_alive() and all("late" not in b for b in engine.batches)

    asyncio.run(scenario())


def test_batcher_waits_for_companions_only_when_requests_overlap():
    async def scenario():
        loop = asyncio.get_running_loop()
        engine = _Recorder()
        batcher = Batcher("m", engine, ServeSettings(max_wait_ms=600), Metrics())
        batcher.start()

        async def alone(payload: str) -> float:
            t0 = time.monotonic()
            batcher.submit(job := Job(loop, payload, 1))
            assert await asyncio.wait_for(job.future, 10) == payload.upper()
            return time.monotonic() - t0

        assert await alone("a") < 0.4 and await alone("b") < 0.4  # one client at a time: no wait
        engine.gate.clear()
        batcher.submit(busy := Job(loop, "z", 1))
        await asyncio.sleep(0.05)
        pair = [Job(loop, "c", 1), Job(loop, "d", 1)]
        for job in pair:  # they overlap with "z": from now on, company is expected for a second
            batcher.submit(job)
        engine.gate.set()
        await asyncio.wait_for(asyncio.gather(busy.future, *(j.future for j in pair)), 10)
        assert await alone("e") >= 0.5  # a lone request now waits (at most 600 ms) for companions
        await asyncio.sleep(1.1)
        assert await alone("f") < 0.4  # a second without overlap: no more waiting
        await asyncio.to_thread(batcher.stop)
        assert engine.batches == [["a"], ["b"], ["z"], ["c", "d"], ["e"], ["f"]]

    asyncio.run(scenario())


# ----------------------------------------------------------------------------
# The API over HTTP
# ----------------------------------------------------------------------------


def test_models_health_readiness_and_playground(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    listed = {m.id: m for m in client.models.list()}
    assert set(listed) == {"tr", "ner", "rel", "lm", "chat"}
    assert listed["chat"].model_extra["task"] == "chat" and listed["chat"].model_extra["max_len"] == 64
    assert client.models.retrieve("ner").model_extra["labels"][0] == "O"
    health = httpx.get(server.url + "/healthz").json()
    assert health["status"] == "ok" and health["ready"] and set(health["models"].values()) == {"ready"}
    assert httpx.get(server.url + "/readyz").json()["ready"] is True
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "http://" not in page.text and "https://" not in page.text  # nothing from a CDN


def test_translate_in_order_with_beam_and_nbest(server):
    texts = ["red cat .", "the big dog .", "blue car ."]
    body = server.post("/v1/translate", {"model": "tr", "texts": texts}).json()
    assert body["object"] == "translation" and body["model"] == "tr"
    assert body["translations"] == ["rouge chat .", "le grand chien .", "bleu voiture ."]
    greedy = server.post("/v1/translate", {"model": "tr", "texts": texts[:1], "beam": 1}).json()
    assert greedy["translations"] == ["rouge chat ."]
    nbest = server.post("/v1/translate", {"model": "tr", "texts": texts[:1], "beam": 3, "nbest": 2}).json()
    assert len(nbest["nbest"][0]) == 2 and nbest["nbest"][0][0] == nbest["translations"][0]
    short = server.post("/v1/translate", {"model": "tr", "texts": ["red cat blue dog ."], "max_len": 2}).json()
    assert len(short["translations"][0].split()) <= 2


def test_extract_returns_what_the_cli_prints(server, models):
    from trainformer.cli.extract import extract_lines

    texts = ["Anna Smith met Omar Chen in Paris .", "the team went home !", "Zoë Müller visited Tokyo ."]
    body = server.post("/v1/extract", {"model": "ner", "texts": texts}).json()
    assert body["task"] == "ner" and body["results"] == extract_lines(str(models["ner"]), texts, "-", "cpu", "fp32")
    first = body["results"][0]
    assert {(e["type"], e["text"]) for e in first["entities"]} >= {("LOC", "Paris")}
    assert all(texts[0][e["start"]:e["end"]] == e["text"] for e in first["entities"])
    rel_texts = ["The <e1>storm</e1> caused the <e2>flood</e2> .", "The <e2>wheel</e2> is part of the <e1>car</e1> ."]
    rel = server.post("/v1/extract", {"model": "rel", "texts": rel_texts}).json()
    assert rel["results"] == extract_lines(str(models["rel"]), rel_texts, "-", "cpu", "fp32")
    assert set(rel["results"][0]) == {"text", "relation", "score"}


def test_chat_with_the_openai_client(server, models):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": HELLO}]
    greedy = client.chat.completions.create(model="chat", messages=messages, temperature=0, max_tokens=20)
    assert greedy.object == "chat.completion" and greedy.choices[0].message.role == "assistant"
    assert greedy.choices[0].message.content.startswith("my name is")  # the learnt answer
    assert greedy.choices[0].finish_reason == "stop"
    usage = greedy.usage
    assert usage.prompt_tokens == 12 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # seeded sampling: reproducible, and the same reply `trainformer chat --seed 7` gives
    kw = dict(model="chat", messages=messages, temperature=0.9, top_p=0.95, max_tokens=20, seed=7)
    first = client.chat.completions.create(**kw, extra_body={"repetition_penalty": 1.1})
    again = client.chat.completions.create(**kw, extra_body={"repetition_penalty": 1.1})
    assert first.choices[0].message.content == again.choices[0].message.content
    from trainformer.inference.loading import load_chatbot
    from trainformer.inference.sampling import SamplingSettings

    bot = load_chatbot(models["chat"], SamplingSettings(0.9, 0, 0.95, 1.1, 20, 7), device="cpu", precision="fp32")
    assert first.choices[0].message.content == bot.reply(HELLO)
    # n choices: choice k is the request with seed 7 + k
    three = client.chat.completions.create(**kw, n=3, extra_body={"repetition_penalty": 1.1})
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert three.choices[0].message.content == first.choices[0].message.content
    assert three.usage.prompt_tokens == 12  # the prompt counts once
    # system message, history, max_tokens
    short = client.chat.completions.create(model="chat", max_tokens=2, temperature=0, messages=[
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello !"}, {"role": "user", "content": HELLO}])
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2


def test_chat_streamed_with_the_openai_client(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    kw = dict(model="chat", messages=[{"role": "user", "content": HELLO}], temperature=0.8, seed=3, max_tokens=30)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 2 and "".join(pieces) == whole  # streamed token by token, same reply
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    # stop strings: never shown, not even their start, in the stream or not
    stopped = client.chat.completions.create(**{**kw, "temperature": 0}, stop=[" is"])
    assert stopped.choices[0].message.content == "my name" and stopped.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(**{**kw, "temperature": 0}, stop=[" is"], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "my name"


def test_chat_stream_is_server_sent_events_ending_in_done(server):
    body = {"model": "chat", "messages": [{"role": "user", "content": HELLO}], "stream": True,
            "temperature": 0, "max_tokens": 10}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    objects = [json.loads(line[6:]) for line in lines[:-1]]
    assert {o["object"] for o in objects} == {"chat.completion.chunk"} and len({o["id"] for o in objects}) == 1


def test_completions_equal_trainformer_generate(server, models, capsys):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    prompt = "where are you"
    out = client.completions.create(model="lm", prompt=prompt, max_tokens=12, temperature=0.8, top_p=0.9,
                                    seed=4, echo=True, extra_body={"repetition_penalty": 1.1})
    assert out.object == "text_completion" and out.usage.prompt_tokens > 1  # </s> + the prompt
    assert main(["generate", str(models["lm"]), "--prompt", prompt, "--max-new-tokens", "12", "--seed", "4",
                 "--device", "cpu", "--precision", "fp32"]) == 0
    assert out.choices[0].text == capsys.readouterr().out.rstrip("\n")
    several = client.completions.create(model="chat", prompt=["hi", "my name"], n=2, max_tokens=5, seed=1)
    assert [c.index for c in several.choices] == [0, 1, 2, 3]
    streamed = list(client.completions.create(model="lm", prompt=prompt, max_tokens=12, temperature=0.8,
                                              top_p=0.9, seed=4, stream=True, extra_body={"repetition_penalty": 1.1}))
    assert prompt + "".join(c.choices[0].text for c in streamed) == out.choices[0].text


def test_conversation_longer_than_the_window_drops_oldest_turns(server):
    turns = [{"role": r, "content": f"{HELLO} {i}"} for i in range(6) for r in ("user", "assistant")]
    r = server.post("/v1/chat/completions", {"model": "chat", "messages": turns + [{"role": "user", "content": "hi"}],
                                             "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200 and int(r.headers["x-trainformer-dropped-messages"]) >= 2
    assert r.json()["usage"]["prompt_tokens"] <= 64 - 8
    long = server.post("/v1/chat/completions", {"model": "chat", "max_tokens": 8,
                                                "messages": [{"role": "user", "content": "hello " * 80}]})
    assert_error(long, 400, "context_length_exceeded", "messages")


BAD_REQUESTS = [
    # (endpoint, raw body or JSON, status, code, param)
    ("/v1/translate", b'{"model": "tr", "texts": ["red cat ."', 400, "invalid_json", None),
    ("/v1/translate", b"", 400, "invalid_json", None),
    ("/v1/translate", b'["red cat ."]', 400, "invalid_json", None),
    ("/v1/translate", b'{"model": "tr", "texts": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 400, "invalid_json", None),
    ("/v1/translate", b'{"model": "tr", "texts": ["red"], "max_len": NaN}', 400, "invalid_type", "max_len"),
    ("/v1/translate", b'{"model": "tr", "texts": ["\xff\xfe broken"]}', 400, "invalid_utf8", None),
    ("/v1/translate", b'{"model": "tr", "texts": ["\\ud800 lone"]}', 400, "invalid_utf8", "texts[0]"),
    ("/v1/translate", {"model": "tr", "texts": "red cat ."}, 400, "invalid_type", "texts"),
    ("/v1/translate", {"model": "tr", "texts": ["red", 3]}, 400, "invalid_type", "texts[1]"),
    ("/v1/translate", {"model": "tr", "texts": ["red"], "beam": "4"}, 400, "invalid_type", "beam"),
    ("/v1/translate", {"model": "tr", "texts": ["red"], "beam": 0}, 400, "invalid_value", "beam"),
    ("/v1/translate", {"model": "tr", "text": ["red"]}, 400, "missing_field", "texts"),
    ("/v1/translate", {"model": "tr", "texts": ["red"], "bream": 2}, 400, "unknown_field", "bream"),
    ("/v1/translate", {"model": "nope", "texts": ["red"]}, 404, "model_not_found", "model"),
    ("/v1/translate", {"model": "chat", "texts": ["red"]}, 400, "wrong_model_type", "model"),
    ("/v1/translate", {"model": "tr", "texts": []}, 400, "invalid_value", "texts"),
    ("/v1/translate", {"model": "tr", "texts": ["red", "  "]}, 400, "empty_text", "texts[1]"),
    ("/v1/translate", {"model": "tr", "texts": ["red " * 300]}, 400, "text_too_long", "texts[0]"),
    ("/v1/translate", {"model": "tr", "texts": ["red"] * 65}, 400, "too_many_texts", "texts"),
    ("/v1/translate", {"model": "tr", "texts": ["red"], "beam": 2, "nbest": 3}, 400, "invalid_value", "nbest"),
    ("/v1/extract", {"model": "ner", "texts": ["Anna " * 100]}, 400, "text_too_long", "texts[0]"),
    ("/v1/extract", {"model": "rel", "texts": ["no markers here"]}, 400, "bad_markers", "texts[0]"),
    ("/v1/extract", {"model": "tr", "texts": ["x"]}, 400, "wrong_model_type", "model"),
    ("/v1/chat/completions", {"model": "chat"}, 400, "missing_field", "messages"),
    ("/v1/chat/completions", {"model": "chat", "messages": []}, 400, "invalid_value", "messages"),
    ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "robot", "content": "hi"}]},
     400, "invalid_value", "messages[0].role"),
    ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, "invalid_value", "messages[0].content[0].type"),
    ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": " "}]},
     400, "empty_text", "messages[0].content"),
    ("/v1/chat/completions", {"model": "lm", "messages": [{"role": "user", "content": "hi"}]},
     400, "wrong_model_type", "model"),
    ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6},
     400, "invalid_value", "max_tokens"),
    ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "temperature": 3},
     400, "invalid_value", "temperature"),
    ("/v1/chat/completions", b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}], "top_p": NaN}',
     400, "invalid_value", "top_p"),
    ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "stop": ["a"] * 5},
     400, "invalid_value", "stop"),
    ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "n": 99},
     400, "invalid_value", "n"),
    ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "logprobs": True},
     400, "unsupported", "logprobs"),
    ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "hi"}],
                              "presence_penalty": 0.5}, 400, "unsupported", "presence_penalty"),
    ("/v1/completions", {"model": "lm", "prompt": 7}, 400, "invalid_type", "prompt"),
    ("/v1/completions", {"model": "lm", "prompt": "hello " * 100}, 400, "context_length_exceeded", "prompt"),
    ("/v1/completions", {"model": "tr", "prompt": "hi"}, 400, "wrong_model_type", "model"),
]


@pytest.mark.parametrize("endpoint,body,status,code,param", BAD_REQUESTS,
                         ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD_REQUESTS)])
def test_bad_input_is_a_4xx_in_openai_shape(server, endpoint, body, status, code, param):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + endpoint, content=raw, headers={"Content-Type": "application/json"}, timeout=30)
    assert_error(r, status, code, param)


def test_limits_routes_and_the_server_keeps_serving(server):
    big = httpx.post(server.url + "/v1/translate", content=b"x" * (2 << 20), timeout=30)
    assert_error(big, 413, "body_too_large")
    assert_error(httpx.get(server.url + "/v1/nothing"), 404, "not_found")
    assert_error(httpx.get(server.url + "/v1/translate"), 405, "method_not_allowed")
    with pytest.raises(openai.NotFoundError, match="not served here"):
        openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0).chat.completions.create(
            model="missing", messages=[{"role": "user", "content": "hi"}])
    ok = server.post("/v1/translate", {"model": "tr", "texts": ["red cat ."]})  # still serving
    assert ok.status_code == 200 and ok.json()["translations"] == ["rouge chat ."]


def test_32_concurrent_requests_equal_32_sequential_ones(server):
    rng = random.Random(3)
    sentences = [e for e, _ in make_pairs(64, seed=11)]
    translate = [{"model": "tr", "texts": rng.sample(sentences, rng.randint(1, 3)), "beam": rng.choice([1, 2])}
                 for _ in range(32)]
    prompts = [HELLO, "where are you going ?", "have a nice day !", "hi , what is your name ?"]
    chat = [{"model": "chat", "messages": [{"role": "user", "content": prompts[i % 4]}], "max_tokens": 8 + i % 12,
             "temperature": 0 if i % 3 == 0 else 0.9, "seed": i} for i in range(32)]
    requests = [("/v1/translate", b) for b in translate] + [("/v1/chat/completions", b) for b in chat]

    def result(path, body):
        r = server.post(path, body)
        assert r.status_code == 200, r.text
        data = r.json()
        return data["translations"] if path == "/v1/translate" else data["choices"][0]["message"]["content"]

    before = server.metrics()
    sequential = [result(p, b) for p, b in requests]
    mid = server.metrics()

    async def all_at_once():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            responses = await asyncio.gather(*(client.post(p, json=b) for p, b in requests))
        return [r.json()["translations"] if p == "/v1/translate" else r.json()["choices"][0]["message"]["content"]
                for (p, _), r in zip(requests, responses)]

    concurrent = asyncio.run(all_at_once())
    after = server.metrics()
    assert concurrent == sequential
    for model, n in (("tr", 32), ("chat", 32)):
        key = lambda name, m=model: (name, (("model", m),))  # noqa: E731
        count = key("trainformer_batch_requests_count")
        batches_seq, batches = mid[count] - before.get(count, 0), after[count] - mid[count]
        assert batches_seq == n and batches < n / 2, (model, batches)  # concurrent requests did share batches


def test_metrics_count_requests_errors_latency_batches_and_tokens(server):
    server.post("/v1/translate", {"model": "tr", "texts": ["red cat ."]})
    server.post("/v1/translate", {"model": "tr", "texts": [""]})
    server.post("/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "hi"}],
                                         "max_tokens": 5})
    m = server.metrics()
    assert m[("trainformer_requests_total", (("endpoint", "/v1/translate"), ("status", "200")))] >= 1
    assert m[("trainformer_requests_total", (("endpoint", "/v1/translate"), ("status", "400")))] >= 1
    assert m[("trainformer_request_errors_total", (("code", "empty_text"), ("endpoint", "/v1/translate")))] >= 1
    assert m[("trainformer_request_duration_seconds_count", (("endpoint", "/v1/chat/completions"),))] >= 1
    assert m[("trainformer_batch_items_sum", (("model", "tr"),))] >= 1
    assert m[("trainformer_generated_tokens_total", (("model", "chat"),))] >= 1
    assert m[("trainformer_texts_total", (("model", "tr"),))] >= 1
    assert m[("trainformer_model_ready", (("model", "chat"),))] == 1


# ----------------------------------------------------------------------------
# Servers with other settings
# ----------------------------------------------------------------------------


def test_api_key(models):
    app = build_app(specs(models, "tr", "chat"), ServeSettings(api_key="s3cret", device="cpu"))
    with LiveServer(app) as live:
        body = {"model": "tr", "texts": ["red cat ."]}
        assert_error(live.post("/v1/translate", body), 401, "invalid_api_key")
        wrong = live.post("/v1/translate", body, headers={"Authorization": "Bearer nope"})
        assert "wrong" in assert_error(wrong, 401, "invalid_api_key")["message"]
        right = live.post("/v1/translate", body, headers={"Authorization": "Bearer s3cret"})
        assert right.status_code == 200
        assert httpx.get(live.url + "/metrics").status_code == 401
        assert httpx.get(live.url + "/healthz").status_code == 200 and httpx.get(live.url + "/").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=live.url + "/v1", api_key="nope", max_retries=0).models.list()
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="s3cret", max_retries=0)
        assert client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=3).usage.completion_tokens >= 1
    assert exposure_warning("0.0.0.0", None) and "--api-key" in exposure_warning("::", None)
    assert exposure_warning("0.0.0.0", "key") is None and exposure_warning("127.0.0.1", None) is None
    assert exposure_warning("localhost", None) is None and exposure_warning("::1", None) is None


def test_a_request_let_in_before_the_signal_is_answered_while_draining(models, monkeypatch):
    """SIGTERM between the gate and the model's queue: the request the gate let in is still
    answered (200); a POST after it is refused at the gate (503 shutting_down)."""
    from trainformer.serve import app as app_module

    app = build_app(specs(models, "tr"), ServeSettings(device="cpu"))
    state = app.state.serve
    looked_up = app_module.served_model

    def signal_arrives_now(*args):
        state.draining = True  # what the SIGTERM handler sets
        return looked_up(*args)

    monkeypatch.setattr(app_module, "served_model", signal_arrives_now)
    with LiveServer(app) as live:
        first = live.post("/v1/translate", {"model": "tr", "texts": ["red cat ."]})
        assert first.status_code == 200 and first.json()["translations"] == ["rouge chat ."]
        assert_error(live.post("/v1/translate", {"model": "tr", "texts": ["red cat ."]}), 503, "shutting_down")


def heavy_translation() -> dict:
    """A request that keeps the tiny translator busy for a while (about 1 s on one core)."""
    rng = random.Random(0)
    words = [e.split()[0] for e, _ in make_pairs(50)]
    return {"model": "tr", "beam": 16, "texts": [" ".join(rng.choices(words, k=100)) + " ." for _ in range(64)]}


def test_timeout_and_full_queue_answer_and_the_server_recovers(models):
    settings = ServeSettings(timeout_s=0.2, max_queue=1, device="cpu")
    app = build_app(specs(models, "tr"), settings)
    with LiveServer(app) as live:
        async def three():
            async with httpx.AsyncClient(base_url=live.url, timeout=30) as client:
                first = asyncio.create_task(client.post("/v1/translate", json=heavy_translation()))
                await asyncio.sleep(0.05)  # the worker is busy with it
                second = asyncio.create_task(client.post("/v1/translate", json={"model": "tr", "texts": ["b"]}))
                await asyncio.sleep(0.05)  # it waits in the queue, which is now full
                third = await client.post("/v1/translate", json={"model": "tr", "texts": ["c"]})
                return await first, await second, third

        first, second, third = asyncio.run(three())
        assert_error(third, 429, "queue_full")
        assert third.headers["retry-after"] == "1"
        assert_error(first, 504, "timeout")
        assert_error(second, 504, "timeout")
        assert httpx.get(live.url + "/healthz").status_code == 200
        deadline = time.monotonic() + 30  # once the heavy batch is over, it serves again
        while (r := live.post("/v1/translate", {"model": "tr", "texts": ["red cat ."]})).status_code != 200:
            assert r.status_code == 504 and time.monotonic() < deadline
        assert r.json()["translations"] == ["rouge chat ."]


def test_readiness_while_loading_and_a_model_that_fails_to_load(models, tmp_path, monkeypatch):
    loaded = threading.Event()
    original = TranslationEngine.load

    def slow_load(self):
        loaded.wait(30)
        original(self)

    monkeypatch.setattr(TranslationEngine, "load", slow_load)
    broken = tmp_path / "broken"
    shutil.copytree(models["chat"], broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    failed = []
    app = build_app(specs(models, "tr") + [ModelSpec.from_dir("broken", broken)],
                    ServeSettings(device="cpu"), on_model_failure=lambda name, err: failed.append(name))
    with LiveServer(app, wait_ready=False) as live:
        assert httpx.get(live.url + "/readyz").status_code == 503
        health = httpx.get(live.url + "/healthz").json()
        assert health["status"] == "ok" and health["models"]["tr"] == "loading"
        r = live.post("/v1/translate", {"model": "tr", "texts": ["red cat ."]})
        assert_error(r, 503, "model_loading")
        assert r.headers["retry-after"] == "1"
        loaded.set()
        deadline = time.monotonic() + 30
        while httpx.get(live.url + "/healthz").json()["models"] != {"tr": "ready", "broken": "failed"}:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert live.post("/v1/translate", {"model": "tr", "texts": ["red cat ."]}).status_code == 200
        assert failed == ["broken"] and httpx.get(live.url + "/readyz").status_code == 503
        assert_error(live.post("/v1/chat/completions", {"model": "broken", "messages": [
            {"role": "user", "content": "hi"}]}), 503, "model_failed")


# ----------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------


def test_cli_refuses_bad_arguments_in_one_line(models, tmp_path, capsys):
    from trainformer.cli.serve import default_name, model_specs

    def fails(*argv: str) -> str:
        assert main(["serve", *argv]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("trainformer: error: "), err
        return err

    assert "not found" in fails(str(tmp_path / "missing"))
    assert "taken by another model" in fails(str(models["tr"]), f"tr={models['chat']}")
    assert "--timeout" in fails(str(models["tr"]), "--timeout", "0")
    mlm = tmp_path / "mlm"
    shutil.copytree(models["ner"], mlm)
    config = json.loads((mlm / "config.json").read_text())
    (mlm / "config.json").write_text(json.dumps({**config, "task": "mlm"}))
    assert "'mlm' model" in fails(str(mlm))
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    with busy:
        assert "cannot listen" in fails(str(models["tr"]), "--port", str(busy.getsockname()[1]))
    broken = tmp_path / "broken"
    shutil.copytree(models["tr"], broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    assert "failed to load" in fails(str(broken), "--port", "0", "--log-level", "error")
    assert default_name(str(models["tr"])) == "tr" and default_name(str(models["tr"].parent)) == "tr"
    named = model_specs([str(models["tr"]), f"bot={models['chat']}"], ["fr"])
    assert [(s.name, s.task) for s in named] == [("fr", "translation"), ("bot", "chat")]
