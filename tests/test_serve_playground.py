"""The playground page in a real headless Chromium (the distribution's package, driven by Playwright).

Types a sentence and sees its translation, sees entities highlighted, sees a
chat reply arrive in several streamed pieces; each must equal what the API
answers for the same request. A screenshot is saved as a test artifact
(under the test's tmp_path; set TRAINFORMER_PLAYGROUND_SCREENSHOT=FILE to keep
a copy). Skips, saying why, without chromium; .ci/run installs it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from test_serve import HELLO, LiveServer, models, specs  # noqa: F401  (models: the session's tiny models)
from trainformer.serve.app import build_app
from trainformer.serve.settings import ServeSettings


def find_chromium() -> str | None:
    candidates = [os.environ.get("TRAINFORMER_CHROMIUM"), "/usr/bin/chromium", "/usr/bin/chromium-browser",
                  shutil.which("chromium"), shutil.which("chromium-browser")]
    return next((c for c in candidates if c and Path(c).is_file()), None)


CHROMIUM = find_chromium()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not found: apt-get install -y chromium (or set TRAINFORMER_CHROMIUM)")]


def test_playground_translates_highlights_entities_and_streams_chat(models, tmp_path):  # noqa: F811
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the dev extra)")
    expect = sync_api.expect
    app = build_app(specs(models, "tr", "ner", "chat"), ServeSettings(device="cpu", precision="fp32"))
    with LiveServer(app) as live, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page(viewport={"width": 1440, "height": 960})
        problems: list[str] = []
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
        page.on("request", lambda r: r.url.startswith(live.url) or problems.append(f"outside request: {r.url}"))
        page.goto(live.url + "/")
        expect(page.locator("#status")).to_have_text("ready")
        expect(page.locator("#translate-model")).to_have_value("tr")

        sentences = ["red cat .", "the big dog ."]
        page.fill("#translate-input", "\n".join(sentences))
        page.click("#translate-run")
        shown = page.locator("#translate-output li.translation")
        expect(shown).to_have_count(2)
        api = live.post("/v1/translate", {"model": "tr", "texts": sentences}).json()["translations"]
        assert shown.all_inner_texts() == api and api[0] == "rouge chat ."

        texts = ["Anna Smith met Omar Chen in Paris .", "😀 later Maria Garcia visited Tokyo ."]
        page.fill("#extract-input", "\n".join(texts))
        page.click("#extract-run")
        expect(page.locator("#extract-output .extract-line")).to_have_count(2)
        results = live.post("/v1/extract", {"model": "ner", "texts": texts}).json()["results"]
        for i, result in enumerate(results):  # code-point offsets, shown right after an emoji too
            marks = page.locator("#extract-output .extract-line").nth(i).locator("mark.entity")
            seen = [(m.get_attribute("data-type"), m.inner_text()) for m in marks.all()]
            assert seen == [(e["type"], e["text"]) for e in result["entities"]] and seen
        assert page.locator("#extract-output .extract-line").nth(1).inner_text().startswith("😀 later")

        page.fill("#chat-temperature", "0")
        page.fill("#chat-max-tokens", "20")
        page.fill("#chat-input", HELLO)
        page.press("#chat-input", "Enter")
        reply = page.locator("#chat-log .msg.assistant").last
        expect(reply).to_have_attribute("data-done", "true", timeout=30_000)
        api_reply = live.post("/v1/chat/completions", {"model": "chat", "temperature": 0, "max_tokens": 20,
                                                        "messages": [{"role": "user", "content": HELLO}]}).json()
        assert reply.inner_text() == api_reply["choices"][0]["message"]["content"]
        assert reply.inner_text().startswith("my name is")
        assert int(reply.get_attribute("data-chunks")) > 2  # it arrived in pieces: streamed
        assert page.locator("#chat-error").inner_text() == ""

        shot = tmp_path / "playground.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.stat().st_size > 10_000
    if os.environ.get("TRAINFORMER_PLAYGROUND_SCREENSHOT"):
        shutil.copy(shot, os.environ["TRAINFORMER_PLAYGROUND_SCREENSHOT"])
    assert not problems, problems
