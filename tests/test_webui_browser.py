"""The web page in a real headless Chromium (Debian's ``chromium``, driven by playwright) against
real servers (``python api.py`` on 127.0.0.1): an answer streams in, Stop cancels it on the
server, the API key is refused and then accepted, injected HTML stays text, UTF-8 split across
network chunks renders whole, the page fits a phone, and no test leaves a console error.

``WEBUI_SCREENSHOT=docs/webui.png python -m pytest tests/test_webui_browser.py -k screenshot``
remakes the README's screenshot.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import requests

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install -r requirements-test.txt)"
)
expect = sync_api.expect

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    pytest.skip("no Chromium: apt-get install chromium (.ci/run does)", allow_module_level=True)

API_KEY = "browser-key-4242"
WAIT_MS = 60_000  # generous: the suite shares two CPU cores with the servers
# Chromium reports every answer with an error status as a console error; the tests that ask for
# one expect it.
REFUSED_LOAD = "Failed to load resource: the server responded with a status of 401"


@pytest.fixture(scope="module")
def chromium():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page_server(start_server, own_model_dir, own_tokenizer_dir):
    """The self-made checkpoint never ends an answer early, so an answer asked for 1500 tokens
    is still streaming when the test presses Stop."""
    return start_server(own_model_dir, own_tokenizer_dir, "--max-batch-size", "4", "--max-model-len", "2048")


@pytest.fixture(scope="module")
def key_server(start_server, own_model_dir, own_tokenizer_dir):
    return start_server(
        own_model_dir, own_tokenizer_dir, "--max-batch-size", "2", "--max-model-len", "512", "--api-key", API_KEY
    )


class Console:
    """Console errors and uncaught exceptions of one page."""

    def __init__(self, page):
        self.errors: list[str] = []
        page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))


@pytest.fixture
def open_page(chromium):
    """open_page(url, **context options) -> (page, console); every page must end with no
    console error, unless the test empties ``console.errors`` of the ones it expects."""
    opened = []

    def open_(url: str, **options):
        context = chromium.new_context(**options)
        page = context.new_page()
        console = Console(page)
        opened.append((context, console))
        page.goto(url)
        return page, console

    yield open_
    for context, console in opened:
        context.close()
        assert console.errors == []


def set_field(page, field_id: str, value: str) -> None:
    page.locator(f"#{field_id}").fill(value)


def greedy_answers_of(page, max_tokens: int) -> None:
    """Greedy: the self-made checkpoint never picks the end-of-sequence token, so every answer
    is exactly max_tokens long (sampled, it could end at any step)."""
    set_field(page, "temperature", "0")
    set_field(page, "max_tokens", str(max_tokens))


def send(page, text: str) -> None:
    page.get_by_test_id("prompt").fill(text)
    page.get_by_test_id("prompt").press("Enter")


def wait_answered(page) -> None:
    expect(page.get_by_test_id("send")).to_be_enabled(timeout=WAIT_MS)


def server_running(url: str, headers: dict | None = None) -> int:
    return requests.get(url + "/stats", headers=headers, timeout=10).json()["requests_running"]


def test_an_answer_streams_in_with_its_numbers(open_page, page_server):
    page, _ = open_page(page_server.url)
    expect(page.get_by_test_id("server-state")).to_contain_text("running 0", timeout=WAIT_MS)
    greedy_answers_of(page, 120)
    prompt = page.get_by_test_id("prompt")
    prompt.fill("Once upon a time")
    prompt.press("Shift+Enter")  # a new line, not a send
    prompt.type("there was a fox")
    assert prompt.input_value() == "Once upon a time\nthere was a fox"
    assert page.get_by_test_id("answer").count() == 0
    # Every length the answer shows, recorded in the page (a loaded machine could answer all
    # 120 tokens between two looks from here).
    page.evaluate("""() => {
        window.answerLengths = [];
        new MutationObserver(() => {
            const answer = document.querySelector("[data-testid=answer]");
            if (answer) window.answerLengths.push(answer.textContent.length);
        }).observe(document.getElementById("messages"), { subtree: true, childList: true, characterData: true });
    }""")
    prompt.press("Enter")

    wait_answered(page)
    final = page.get_by_test_id("answer").text_content()
    assert final.strip()
    lengths = page.evaluate("window.answerLengths")
    partial = {n for n in lengths if 0 < n < len(final)}
    assert len(partial) >= 2, f"the answer did not stream in: {lengths}"
    assert page.locator(".message.user").inner_text() == "Once upon a time\nthere was a fox"
    assert prompt.input_value() == ""
    stats = page.get_by_test_id("stats").first.inner_text()
    assert stats.startswith("120 tok · TTFT ") and " s · " in stats and stats.endswith(" tok/s"), stats
    assert float(stats.split(" · ")[2].split()[0]) > 0

    send(page, "And then?")  # the history goes along: a second answer under the first
    wait_answered(page)
    expect(page.get_by_test_id("answer")).to_have_count(2)
    expect(page.get_by_test_id("server-state")).to_contain_text(
        "running 0 · waiting 0 · KV cache 0/512 blocks", timeout=WAIT_MS
    )


def test_stop_cancels_the_answer_on_the_server(open_page, page_server):
    page, _ = open_page(page_server.url)
    greedy_answers_of(page, 1500)
    expect(page.get_by_test_id("stop")).to_be_disabled()
    send(page, "Tell me a very long story")
    expect(page.get_by_test_id("answer")).not_to_have_text("", timeout=WAIT_MS)
    expect(page.get_by_test_id("server-state")).to_contain_text("running 1", timeout=WAIT_MS)
    assert server_running(page_server.url) == 1
    page.get_by_test_id("stop").click()

    expect(page.get_by_test_id("stats")).to_contain_text("stopped", timeout=WAIT_MS)
    expect(page.get_by_test_id("server-state")).to_contain_text("running 0", timeout=10_000)
    assert server_running(page_server.url) == 0
    stats = page.get_by_test_id("stats").inner_text()
    assert stats.startswith("~") and "tok/s" in stats, stats
    assert int(stats[1:].split()[0]) < 1500
    expect(page.get_by_test_id("send")).to_be_enabled()
    expect(page.get_by_test_id("stop")).to_be_disabled()


def test_api_key_refused_then_accepted_and_kept(open_page, key_server):
    page, console = open_page(key_server.url)
    key_field = page.get_by_test_id("api-key")
    expect(key_field).to_be_visible(timeout=WAIT_MS)  # shown once the server asked for a key
    expect(page.get_by_test_id("server-state")).to_contain_text("API key missing or wrong")
    greedy_answers_of(page, 8)

    key_field.fill("wrong-key")
    send(page, "Hello")
    expect(page.get_by_test_id("answer")).to_contain_text("HTTP 401", timeout=WAIT_MS)
    expect(page.get_by_test_id("answer")).to_contain_text("invalid API key")
    assert page.get_by_test_id("prompt").input_value() == "Hello"  # back in the box, to send again

    key_field.fill(API_KEY)
    page.get_by_test_id("prompt").press("Enter")
    wait_answered(page)
    expect(page.get_by_test_id("answer").nth(1)).not_to_have_text("")
    expect(page.get_by_test_id("stats").nth(1)).to_contain_text("8 tok")
    expect(page.get_by_test_id("server-state")).to_contain_text("running 0", timeout=WAIT_MS)

    page.reload()  # the key stays in this browser
    expect(page.get_by_test_id("api-key")).to_have_value(API_KEY)
    expect(page.get_by_test_id("server-state")).to_contain_text("running 0", timeout=WAIT_MS)
    assert console.errors and all(REFUSED_LOAD in error for error in console.errors), console.errors
    console.errors.clear()


INJECTIONS = [
    '<img src=x onerror="window.injected = 1">',
    "<script>window.injected = 2</script>",
    '**bold <svg onload="window.injected = 3">**',
    '[click](javascript:window.injected=4) [ok](https://example.com/"onmouseover="window.injected=5)',
    "```\n</code></pre><img src=x onerror=window.injected=6>\n```",
    "`<iframe src=javascript:window.injected=7>`",
]


def test_injected_html_is_rendered_as_text(open_page, page_server):
    """The renderer, as the page loads it, on hostile text; with the page's Content-Security-Policy
    bypassed, so that the escaping alone must hold."""
    page, _ = open_page(page_server.url, bypass_csp=True)
    rendered = page.evaluate(
        """async (texts) => {
        const { renderMarkdown } = await import("/webui/markdown.js");
        return texts.map((text) => {
            const node = document.createElement("div");
            node.innerHTML = renderMarkdown(text);
            document.getElementById("messages").append(node);
            return { text: node.textContent, tags: [...node.querySelectorAll("*")].map((e) => e.tagName.toLowerCase()),
                     hrefs: [...node.querySelectorAll("a")].map((a) => a.getAttribute("href")),
                     handlers: [...node.querySelectorAll("*")].flatMap((e) => e.getAttributeNames()
                                  .filter((name) => name.startsWith("on"))) };
        });
    }""",
        INJECTIONS,
    )
    for text, result in zip(INJECTIONS, rendered):
        assert set(result["tags"]) <= {"p", "strong", "em", "code", "pre", "a", "br"}, (text, result)
        assert result["handlers"] == [], (text, result)
        assert all(href.startswith("https://") for href in result["hrefs"]), result
    assert "<img src=x onerror" in rendered[0]["text"]
    assert rendered[2]["tags"] == ["p", "strong"] and "<svg" in rendered[2]["text"]
    assert "javascript:" in rendered[3]["text"]  # left as text, not made a link
    assert rendered[3]["hrefs"] == ['https://example.com/"onmouseover="window.injected=5']  # one attribute

    send(page, INJECTIONS[0] + " " + INJECTIONS[1])  # the prompt echoed in the user's bubble
    bubble = page.locator(".message.user")
    expect(bubble).to_have_text(INJECTIONS[0] + " " + INJECTIONS[1])
    assert bubble.locator("img, script").count() == 0
    wait_answered(page)
    time.sleep(0.5)  # an onerror would have fired by now
    assert page.evaluate("window.injected") is None


def test_markdown_renders(open_page, page_server):
    page, _ = open_page(page_server.url)
    markdown = (
        "# Title\nSome **bold** and *it* and `x < y`.\n\n- one\n- two\n\n1. first\n\n```py\nif a < b:\n    pass\n```"
    )
    html = page.evaluate("""async (text) => (await import("/webui/markdown.js")).renderMarkdown(text)""", markdown)
    assert html == (
        "<h3>Title</h3><p>Some <strong>bold</strong> and <em>it</em> and <code>x &lt; y</code>.</p>"
        "<ul><li>one</li><li>two</li></ul><ol><li>first</li></ol>"
        "<pre><code>if a &lt; b:\n    pass\n</code></pre>"
    )


def test_utf8_split_across_network_chunks_renders_whole(open_page, page_server):
    """The SSE reader on a stream cut inside every multi-byte character, and Chinese and emoji in
    the user's bubble."""
    page, _ = open_page(page_server.url)
    text = "你好，世界！🦊👩‍💻 ok"
    pieces = page.evaluate(
        """async (text) => {
        const { readSse } = await import("/webui/sse.js");
        const bytes = new TextEncoder().encode(`data: ${JSON.stringify({ t: text })}\\n\\ndata: [DONE]\\n\\n`);
        const results = [];
        for (let size = 1; size <= 5; size++) {
            const body = new ReadableStream({ start(controller) {
                for (let i = 0; i < bytes.length; i += size) controller.enqueue(bytes.slice(i, i + size));
                controller.close();
            } });
            const events = [];
            for await (const data of readSse(body)) events.push(data);
            results.push(events);
        }
        return results;
    }""",
        text,
    )
    for events in pieces:
        assert events[-1] == "[DONE]"
        assert events[:-1] == ['{"t":"' + text + '"}']

    send(page, text)  # (random weights make random bytes: the answer's own text proves nothing here)
    expect(page.locator(".message.user")).to_have_text(text)
    wait_answered(page)


def test_raw_completion_shows_prompt_and_continuation(open_page, page_server):
    page, _ = open_page(page_server.url)
    page.locator("#mode").select_option("completion")
    expect(page.locator("#system")).to_be_disabled()
    greedy_answers_of(page, 10)
    send(page, "Once upon a time")
    wait_answered(page)
    answer = page.get_by_test_id("answer")
    expect(answer.locator(".echo")).to_have_text("Once upon a time")
    assert len(answer.inner_text()) > len("Once upon a time")
    expect(page.get_by_test_id("stats")).to_contain_text("10 tok")
    assert page.locator(".message.user").count() == 0


def test_settings_reach_the_server_and_its_errors_show(open_page, page_server):
    page, console = open_page(page_server.url)
    requests_sent = []
    page.on(
        "request",
        lambda request: request.url.endswith("/v1/chat/completions") and requests_sent.append(request.post_data_json),
    )
    page.locator("#system").fill("You are terse.")
    for field, value in [
        ("temperature", "0.5"),
        ("top_p", "0.9"),
        ("top_k", "40"),
        ("max_tokens", "6"),
        ("repetition_penalty", "1.1"),
        ("seed", "7"),
    ]:
        set_field(page, field, value)
    page.locator("#stop").fill("\\n\nTHE END")
    send(page, "Hi")
    wait_answered(page)
    body = requests_sent[0]
    assert body["messages"] == [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}]
    assert {k: body[k] for k in ("temperature", "top_p", "top_k", "max_tokens", "repetition_penalty", "seed")} == {
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 40,
        "max_tokens": 6,
        "repetition_penalty": 1.1,
        "seed": 7,
    }
    assert body["stop"] == ["\n", "THE END"] and body["stream"] is True

    set_field(page, "top_p", "5")  # out of range: the server's 400 is shown, not swallowed
    send(page, "Hi again")
    expect(page.get_by_test_id("answer").nth(1)).to_contain_text("HTTP 400", timeout=WAIT_MS)
    expect(page.get_by_test_id("answer").nth(1)).to_contain_text("top_p")
    assert page.get_by_test_id("prompt").input_value() == "Hi again"
    assert len(requests_sent) == 2 and requests_sent[1]["messages"][-1]["content"] == "Hi again"
    page.get_by_role("button", name="New conversation").click()
    expect(page.get_by_test_id("answer")).to_have_count(0)
    # Chromium reports the 400 as a failed load: the answer this test asked for.
    assert console.errors == ["Failed to load resource: the server responded with a status of 400 (Bad Request)"]
    console.errors.clear()


def test_usable_at_phone_width(open_page, page_server):
    page, _ = open_page(page_server.url, viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True)
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    expect(page.locator("#settings")).not_to_have_attribute("open", "")  # folded away above the chat
    for testid in ("prompt", "send", "stop"):
        box = page.get_by_test_id(testid).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 375 and box["y"] + box["height"] <= 740, testid
    send(page, "A long line without spaces: " + "x" * 300)
    wait_answered(page)
    assert page.evaluate("document.documentElement.scrollWidth") <= 375


def test_screenshot(open_page, server, tmp_path):
    """The README's picture: a short conversation on a laptop-sized window, on the default server
    (the real Llama-2 tokenizer when ../shared is here, so the random answers are word pieces)."""
    page, _ = open_page(server.url, viewport={"width": 1100, "height": 640})
    page.locator("#system").fill("You are a helpful assistant.")
    set_field(page, "max_tokens", "40")
    set_field(page, "seed", "1")
    for question in ("你好，请介绍一下你自己。", "Write a haiku about foxes."):
        send(page, question)
        wait_answered(page)
    expect(page.get_by_test_id("server-state")).to_contain_text("running 0", timeout=WAIT_MS)
    target = Path(os.environ.get("WEBUI_SCREENSHOT") or tmp_path / "webui.png")
    page.screenshot(path=str(target))
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and target.stat().st_size < 300_000
