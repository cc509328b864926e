"""The lens page (/lens) in a real browser.

Two halves:

- Against the live server (`tzoo serve`) and the tiny random Llama group: the logit
  lens heat map has a cell per layer and position and its tooltip shows the top tokens
  `tzoo.logit_lens` computes directly; verbalize rows stream in before the result and
  match `tzoo.verbalize`; a second page waits in the queue while the first runs, and
  Stop and Cancel work; the server's sentence for a bad request shows in the alert; and
  nothing leaves the host.
- The same page with its WebSocket answered by a fake written here (Playwright's
  WebSocket routing): the API-key prompt and reconnect, the live queue position, a
  hostile token text that stays inert, and a partial verbalisation.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

pytestmark = pytest.mark.browser

GROUP = "tiny-llama"
TEXT = "The capital of France is"
XSS = "<img src=x onerror=window.__pwned=1>"
STAND_INS = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"}


def visible(token: str) -> str:
    """A token as the page labels it (format.js's visibleToken)."""
    if token == "":
        return "∅"
    if token.strip() == "":
        return "".join(STAND_INS.get(ch, ch) for ch in token)
    if token.startswith(" "):
        token = "␣" + token[1:]
    return re.sub(r"[\n\t\r]", lambda m: STAND_INS[m.group(0)], token)


def short(token: str, limit: int) -> str:
    """`visible`, cut with an ellipsis past `limit` characters (format.js's shortToken)."""
    chars = list(visible(token))
    return "".join(chars[: limit - 1]) + "…" if len(chars) > limit else "".join(chars)


def percent_value(text: str) -> float:
    """A shown percentage as a probability: "41.2%" is 0.412."""
    return float(text.strip().rstrip("%").lstrip("<")) / 100


def open_lens(page: Any, url: str) -> None:
    page.goto(url + "/lens")
    page.wait_for_selector("#tzoo-lens[data-ready=true]")


def run(page: Any, text: str, analysis: str, *, group: str = GROUP) -> None:
    page.fill("#lens-text", text)
    page.select_option("#lens-analysis", analysis)
    page.select_option("#lens-group", group)
    page.click("#lens-run")


def wait_state(page: Any, *states: str, timeout: float = 60_000) -> str:
    wanted = json.dumps(list(states))
    page.wait_for_function(
        f"{wanted}.includes(document.getElementById('tzoo-lens').dataset.state)",
        timeout=timeout,
    )
    return page.eval_on_selector("#tzoo-lens", "n => n.dataset.state")


def record_websockets(page: Any) -> list[str]:
    urls: list[str] = []
    page.on("websocket", lambda ws: urls.append(ws.url))
    return urls


def assert_stayed_home(page: Any, live_server: str, sockets: list[str]) -> None:
    host = urlsplit(live_server).netloc
    assert page.requests and all(url.startswith(live_server) for url in page.requests)
    assert sockets and all(url.startswith(f"ws://{host}/ws") for url in sockets)


# -- against the live server --------------------------------------------------------------------


def test_logit_lens_heat_map_matches_the_library(live_server: str, page: Any) -> None:
    import tzoo

    sockets = record_websockets(page)
    page.goto(live_server + "/")
    page.click('#tools [data-tool="lenses"] a')
    page.wait_for_selector("#tzoo-lens[data-ready=true]")
    assert page.title() == "Lenses — Transformer Zoo"
    groups = page.eval_on_selector_all("#lens-group option", "os => os.map(o => o.value)")
    assert GROUP in groups
    # Tiny models have no trained tuned lens: the page says so instead of failing later.
    page.select_option("#lens-group", GROUP)
    tuned = page.locator('#lens-analysis option[value="tuned_lens"]')
    assert tuned.is_disabled() and "none trained" in tuned.inner_text()

    run(page, TEXT, "logit_lens")
    assert wait_state(page, "done", "error") == "done", page.inner_text("#lens-alert")
    assert re.fullmatch(r"Done in \d+(\.\d+)? s\.", page.inner_text("#lens-status"))

    expected = tzoo.logit_lens(GROUP, TEXT, k=5)
    n_layers, n_tokens = len(expected.layers), len(expected.tokens)
    grid = page.locator("#lens-heatmap table[role=grid]")
    assert grid.get_attribute("data-layers") == str(n_layers)
    assert grid.get_attribute("data-positions") == str(n_tokens)
    assert page.locator("#lens-heatmap td.lens-cell").count() == n_layers * n_tokens
    # The output at the top, the embeddings at the bottom; token strings label the columns.
    labels = page.eval_on_selector_all(
        "#lens-heatmap tbody th", "ths => ths.map(t => t.textContent)"
    )
    assert labels[0] == "output" and labels[-1] == "embed" and len(labels) == n_layers
    columns = page.eval_on_selector_all(
        "#lens-heatmap thead th.lens-col .lens-token", "ns => ns.map(n => n.textContent)"
    )
    assert columns == [short(t, 8) for t in expected.tokens]

    # Hovering a cell shows the top-k tokens and probabilities that the library computes.
    for layer, position in [(1, 3), (n_layers - 1, n_tokens - 1), (0, 0)]:
        cell = page.locator(f'#lens-heatmap td[data-layer="{layer}"][data-position="{position}"]')
        cell.hover()
        tip = page.locator("#lens-heatmap .lens-tip")
        tip.wait_for(state="visible")
        assert tip.get_attribute("data-layer") == str(layer)
        assert tip.get_attribute("data-position") == str(position)
        shown = tip.locator(".lens-tip-top li").evaluate_all(
            "lis => lis.map(li => [li.querySelector('.lens-token').textContent,"
            " li.querySelector('.lens-tip-pct').textContent])"
        )
        want = expected.top_tokens(layer, position)
        assert [token for token, _ in shown] == [visible(t) for t, _ in want]
        for (_, text), (_, p) in zip(shown, want, strict=True):
            shown_to = (
                0.0001 if p < 0.01 else 0.001
            )  # two decimals of a percent below 1 %, else one
            assert percent_value(text) == pytest.approx(p, abs=shown_to / 2 + 1e-5)
        kl = float(tip.locator(".lens-tip-kl").inner_text().split()[0])
        assert kl == pytest.approx(float(expected.kl_to_final[layer, position]), abs=0.006)
        assert cell.text_content() == short(want[0][0], 6)

    # The keyboard: one Tab stop, arrows move (up is towards the output), focus shows the tip.
    page.locator('#lens-heatmap td[tabindex="0"]').focus()
    page.keyboard.press("PageDown")
    page.keyboard.press("Home")
    page.keyboard.press("ArrowUp")
    page.keyboard.press("ArrowRight")
    focused = page.evaluate(
        "[document.activeElement.dataset.layer, document.activeElement.dataset.position]"
    )
    assert focused == ["1", "1"]
    assert page.locator('#lens-heatmap td[tabindex="0"]').count() == 1
    tip = page.locator("#lens-heatmap .lens-tip")
    assert tip.get_attribute("data-layer") == "1" and tip.get_attribute("data-position") == "1"
    assert page.evaluate(
        "document.activeElement.getAttribute('aria-describedby')"
    ) == tip.get_attribute("id")

    # Colour by KL: the legend says so, with its scale in nats.
    page.check('#lens-colour input[value="kl_to_final"]')
    assert page.get_attribute("#lens-heatmap", "data-metric") == "kl_to_final"
    assert page.inner_text("#lens-legend .lens-legend-title") == "KL to final (nats)"
    assert page.inner_text("#lens-legend .lens-legend-ticks").split()[0] == "0.00"
    assert_stayed_home(page, live_server, sockets)


def test_verbalize_rows_stream_in_and_match_the_library(live_server: str, page: Any) -> None:
    import tzoo

    text = "Paris is the capital of France."  # 32 positions: four batches of eight
    sockets = record_websockets(page)
    open_lens(page, live_server)
    page.select_option("#lens-group", GROUP)
    page.select_option("#lens-analysis", "verbalize")
    assert page.input_value("#lens-layer") == "1"  # the group's suggested layer
    # Every change to the table is noted with whether the run had finished then.
    page.evaluate(
        """() => {
          window.__rows = [];
          const body = document.getElementById('lens-explain-body');
          new MutationObserver(() => window.__rows.push([body.rows.length,
            document.getElementById('tzoo-lens').dataset.state])).observe(body, {childList: true});
        }"""
    )
    run(page, text, "verbalize")
    assert wait_state(page, "done", "error") == "done", page.inner_text("#lens-alert")

    expected = tzoo.verbalize(GROUP, text, layer=1)
    total = len(expected.rows)
    seen = page.evaluate("window.__rows")
    streamed = [n for n, state in seen if state == "running"]
    assert streamed and 0 < min(streamed) < total, seen  # rows before the end, in steps
    assert len(set(streamed)) > 1
    rows = page.locator("#lens-explain-body tr").evaluate_all(
        "trs => trs.map(tr => Array.from(tr.cells, c => c.textContent))"
    )
    assert len(rows) == total
    for shown, row in zip(rows, expected.rows, strict=True):
        position, token, explanation, kl, entropy, _lens = shown
        assert int(position) == row.position
        assert token == visible(row.token)
        assert explanation == (row.explanation or "(nothing)")
        assert float(kl) == pytest.approx(row.kl, abs=0.006)
        assert float(entropy) == pytest.approx(row.entropy, abs=0.006)
    assert page.is_hidden("#lens-partial")
    assert "32 of 32 positions" in page.inner_text("#lens-explain-facts")
    assert_stayed_home(page, live_server, sockets)


def test_queue_position_stop_and_cancel(live_server: str, browser: Any) -> None:
    # 496 positions (the tiny Llama reads characters), under the 512-token limit: long
    # enough that the run is still going when the second page asks and when Stop comes.
    long_text = "The quick brown fox jumps over the lazy dog. " * 11
    # Two windows (contexts): a background tab of one window would not get animation
    # frames, which Playwright's clicks wait for.
    contexts = [browser.new_context(), browser.new_context()]
    try:
        first, second = (context.new_page() for context in contexts)
        open_lens(first, live_server)
        open_lens(second, live_server)

        # The first page's verbalisation holds the model; the second page's lens waits.
        run(first, long_text, "verbalize")
        first.wait_for_selector("#lens-explain-body tr")
        assert wait_state(first, "running") == "running"
        assert re.match(r"Running — \d+ of \d+ tokens explained", first.inner_text("#lens-status"))
        run(second, TEXT, "logit_lens")
        assert wait_state(second, "queued") == "queued"
        assert second.inner_text("#lens-status") == "Queued — position 1 of 1"

        # Stop keeps the rows done: "interrupted", marked partial.
        first.click("#lens-stop")
        assert wait_state(first, "interrupted", "error") == "interrupted"
        assert first.is_visible("#lens-partial")
        kept = first.locator("#lens-explain-body tr").count()
        assert 0 < kept < len(long_text)
        assert re.fullmatch(
            rf"Stopped after \d+(\.\d+)? s: kept the {kept} rows done\.",
            first.inner_text("#lens-status"),
        )
        # ...and the waiting page's request runs next.
        assert wait_state(second, "done", "error") == "done"

        # Cancel drops the request.
        run(first, long_text, "verbalize")
        first.wait_for_selector("#lens-explain-body tr")
        first.click("#lens-cancel")
        assert wait_state(first, "cancelled", "error") == "cancelled"
        assert first.inner_text("#lens-status").startswith("Cancelled")
        assert first.is_enabled("#lens-run") and first.is_disabled("#lens-cancel")
    finally:
        for context in contexts:
            context.close()


def test_the_servers_message_shows_for_a_bad_request(live_server: str, page: Any) -> None:
    open_lens(page, live_server)
    run(page, "   ", "logit_lens")
    assert wait_state(page, "error") == "error"
    alert = page.get_by_role("alert")
    assert alert.inner_text() == "The text is empty; give the model something to read."
    assert page.get_attribute("#lens-alert", "data-error") == "EmptyInputError"

    limit = int(page.get_attribute("#tzoo-lens", "data-max-text-length"))
    run(page, "a" * (limit + 1), "logit_lens")
    assert wait_state(page, "error") == "error"
    assert f"The text is {limit + 1} characters; the limit is {limit}" in alert.inner_text()
    assert "is-over" in page.get_attribute("#lens-text-count", "class")

    # A layer the model does not have. Once the group is loaded the page knows its range
    # (the groups are listed again after every run) and says so itself...
    run(page, TEXT, "verbalize")
    assert wait_state(page, "done") == "done"
    page.wait_for_function("document.getElementById('lens-layer').max === '1'")
    page.fill("#lens-layer", "7")
    page.click("#lens-run")
    assert alert.inner_text() == "Layer must be from -2 to 1."
    assert page.get_attribute("#tzoo-lens", "data-state") == "done"  # nothing was sent
    # ...and past that check, the analysis' own sentence comes back.
    page.evaluate("document.getElementById('lens-layer').removeAttribute('max')")
    page.click("#lens-run")
    assert wait_state(page, "error") == "error"
    assert "layer must be an integer from -2 to 1" in alert.inner_text()
    # The page stays usable.
    assert page.is_enabled("#lens-run") and page.is_hidden("#lens-progress")


# -- with a fake of the WebSocket ------------------------------------------------------------------

FAKE_GROUPS = [
    {
        "name": "tiny-llama",
        "model": "tiny-llama",
        "description": "Tiny",
        "tuned_lens": False,
        "loaded": True,
        "current": True,
        "n_layers": 2,
        "verbalize_layer": 1,
    },
    {
        "name": "big",
        "model": XSS,
        "description": XSS,
        "tuned_lens": True,
        "loaded": False,
        "current": False,
        "n_layers": None,
        "verbalize_layer": 3,
    },
]


def lens_result(tokens: list[str], n_layers: int = 2, k: int = 3) -> dict[str, Any]:
    """A small made-up lens RESULT whose token strings include hostile text."""
    strings = {"0": XSS, "1": " the", "2": "\n", "3": "Paris"}
    layers = list(range(n_layers + 1))
    return {
        "analysis": "logit_lens",
        "model": "tiny-llama",
        "model_group": "tiny-llama",
        "tokens": tokens,
        "token_ids": list(range(len(tokens))),
        "layers": layers,
        "top_ids": [[[0, 1, 2][:k] for _ in tokens] for _ in layers],
        "top_probs": [[[0.5, 0.3, 0.1][:k] for _ in tokens] for _ in layers],
        "token_strings": strings,
        "kl_to_final": [[float(n_layers - layer) for _ in tokens] for layer in layers],
        "entropy": [[1.5 for _ in tokens] for _ in layers],
        "final_probability": [[0.5 for _ in tokens] for _ in layers],
        "final_token_rank": [[0 for _ in tokens] for _ in layers],
        "complete": True,
    }


@dataclass
class FakeSocket:
    """Answers /ws like the server does; `on_analyze` scripts the reply."""

    key: str | None = None  # the API key it asks for, if any
    urls: list[str] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)
    on_analyze: Callable[[Any, dict[str, Any]], None] | None = None
    route: Any = None

    def handle(self, ws: Any) -> None:
        self.urls.append(ws.url)
        self.route = ws
        given = parse_qs(urlsplit(ws.url).query).get("api_key", [None])[0]
        if self.key and given != self.key:
            text = "This server needs an API key" if given is None else "The API key is wrong."
            ws.send(
                json.dumps(
                    {
                        "type": "error",
                        "request_id": None,
                        "error": "Unauthorized",
                        "message": text,
                        "status": 401,
                    }
                )
            )
            ws.close(code=4401, reason="API key")
            return
        ws.send(
            json.dumps(
                {
                    "type": "connection_established",
                    "client_id": "c1",
                    "queue_size": 0,
                    "model_groups": FAKE_GROUPS,
                    "current_group": "tiny-llama",
                    "analyses": ["logit_lens", "tuned_lens", "verbalize"],
                    "max_text_length": 100,
                    "api_key_required": bool(self.key),
                }
            )
        )

        def on_message(raw: str | bytes) -> None:
            data = json.loads(raw)
            self.received.append(data)
            if data["type"] == "analyze" and self.on_analyze:
                self.on_analyze(ws, data)

        ws.on_message(on_message)

    def send(self, **fields: Any) -> None:
        self.route.send(json.dumps(fields))

    def sent(self, page: Any, kind: str, *, after: int = 0) -> dict[str, Any]:
        """The newest message of type `kind` the page sent past index `after` (waiting up
        to 5 s: Playwright delivers them while the test waits on the page)."""
        for _ in range(250):
            found = [m for m in self.received[after:] if m["type"] == kind]
            if found:
                return found[-1]
            page.wait_for_timeout(20)
        raise AssertionError(f"the page sent no {kind!r}; it sent {self.received}")


@pytest.fixture
def fake_socket(page: Any) -> Iterator[FakeSocket]:
    fake = FakeSocket()
    page.route_web_socket(re.compile(r"/ws(\?.*)?$"), fake.handle)
    yield fake


def test_api_key_prompt_and_reconnect(live_server: str, page: Any, fake_socket: FakeSocket) -> None:
    fake_socket.key = "s3cret"
    page.goto(live_server + "/lens")
    page.wait_for_selector("#lens-key-form:not([hidden])")
    assert page.get_by_role("alert").inner_text() == "This server needs an API key"
    page.wait_for_selector("#tzoo-lens[data-connection=refused]")
    assert page.is_disabled("#lens-run")
    assert page.evaluate("document.activeElement.id") == "lens-api-key"

    page.fill("#lens-api-key", "wrong")
    page.click("#lens-key-save")
    page.wait_for_function(
        "document.getElementById('lens-alert').textContent === 'The API key is wrong.'"
    )
    page.fill("#lens-api-key", "s3cret")
    page.click("#lens-key-save")
    page.wait_for_selector("#tzoo-lens[data-ready=true][data-connection=open]")
    assert parse_qs(urlsplit(fake_socket.urls[-1]).query)["api_key"] == ["s3cret"]
    assert page.evaluate("sessionStorage.getItem('tzoo.lens.apiKey')") == "s3cret"
    assert page.is_hidden("#lens-alert") and page.is_enabled("#lens-run")
    assert page.is_visible("#lens-key-form")  # the server still asks: the key can be changed

    # A reload reconnects with the stored key at once.
    page.reload()
    page.wait_for_selector("#tzoo-lens[data-ready=true][data-connection=open]")
    assert parse_qs(urlsplit(fake_socket.urls[-1]).query)["api_key"] == ["s3cret"]


def test_queue_updates_and_hostile_tokens(
    live_server: str, page: Any, fake_socket: FakeSocket
) -> None:
    page.goto(live_server + "/lens")
    page.wait_for_selector("#tzoo-lens[data-ready=true]")
    # Group names and descriptions are text, never markup.
    page.select_option("#lens-group", "big")
    assert XSS in page.inner_text("#lens-group-note")
    page.select_option("#lens-group", "tiny-llama")

    def queue(ws: Any, data: dict[str, Any]) -> None:
        ws.send(
            json.dumps(
                {
                    "type": "queued",
                    "request_id": "r1",
                    "position": 3,
                    "queue_size": 4,
                    "client_request_id": data["client_request_id"],
                }
            )
        )

    fake_socket.on_analyze = queue
    run(page, "Hello", "logit_lens")
    page.wait_for_function(
        "document.getElementById('lens-status').textContent === 'Queued — position 3 of 4'"
    )
    sent = fake_socket.sent(page, "analyze")
    assert sent == {
        "type": "analyze",
        "text": "Hello",
        "analysis": "logit_lens",
        "options": {"k": 5},
        "model_group": "tiny-llama",
        "client_request_id": sent["client_request_id"],
    }
    # Another request's updates are not ours.
    fake_socket.send(type="queue_update", request_id="other", position=1, queue_size=4)
    fake_socket.send(type="queue_update", request_id="r1", position=2, queue_size=3)
    page.wait_for_function(
        "document.getElementById('lens-status').textContent === 'Queued — position 2 of 3'"
    )
    fake_socket.send(type="queue_update", request_id="r1", position=1, queue_size=2)
    page.wait_for_function(
        "document.getElementById('lens-status').textContent === 'Queued — position 1 of 2'"
    )
    fake_socket.send(type="progress", request_id="r1", stage="loading", done=0, total=1)
    page.wait_for_function(
        "document.getElementById('lens-status').textContent === 'Loading tiny-llama…'"
    )
    tokens = [XSS, " Paris", "\n"]
    fake_socket.send(
        type="completed",
        request_id="r1",
        status="completed",
        elapsed_s=1.234,
        result=lens_result(tokens),
    )
    wait_state(page, "done")
    assert page.inner_text("#lens-status") == "Done in 1.23 s."
    assert page.evaluate("window.__pwned") is None
    assert page.locator("#lens-heatmap img").count() == 0
    assert page.locator("#lens-heatmap td.lens-cell").count() == 3 * 3
    page.locator('#lens-heatmap td[data-layer="2"][data-position="0"]').hover()
    tip = page.locator("#lens-heatmap .lens-tip")
    assert tip.locator(".lens-tip-top .lens-token").all_inner_texts() == [XSS, "␣the", "↵"]
    assert XSS in tip.locator(".lens-tip-head").inner_text()
    assert page.evaluate("window.__pwned") is None


def test_verbalize_partial_result_and_cancel_before_queued(
    live_server: str, page: Any, fake_socket: FakeSocket
) -> None:
    page.goto(live_server + "/lens")
    page.wait_for_selector("#tzoo-lens[data-ready=true]")
    replies: list[dict[str, Any]] = []
    fake_socket.on_analyze = lambda ws, data: replies.append(data)

    def row(position: int, explanation: str) -> dict[str, Any]:
        return {
            "position": position,
            "token": XSS if position == 1 else "a",
            "explanation": explanation,
            "kl": 0.5,
            "entropy": 2.0,
            "lens_top": [[XSS, 0.4], [" b", 0.2]],
        }

    run(page, "abc", "verbalize")
    page.wait_for_function("document.getElementById('tzoo-lens').dataset.state === 'sending'")
    # Cancel before the server has said the id: it is sent once "queued" arrives.
    page.click("#lens-cancel")
    assert page.inner_text("#lens-status") == "Cancelling…"
    sent = fake_socket.sent(page, "analyze")
    assert not any(m["type"] == "cancel_request" for m in fake_socket.received)
    assert sent["options"] == {"layer": 1, "target_layer": 1}
    fake_socket.send(
        type="queued",
        request_id="r2",
        position=1,
        queue_size=1,
        client_request_id=sent["client_request_id"],
    )
    assert fake_socket.sent(page, "cancel_request") == {
        "type": "cancel_request",
        "request_id": "r2",
    }
    fake_socket.send(type="request_cancelled", request_id="r2", result=None)
    assert wait_state(page, "cancelled") == "cancelled"
    assert page.inner_text("#lens-status") == "Cancelled."

    # A run that streams rows out of order, then is stopped: partial.
    before = len(fake_socket.received)
    run(page, "abc", "verbalize")
    sent = fake_socket.sent(page, "analyze", after=before)
    fake_socket.send(
        type="queued",
        request_id="r3",
        position=0,
        queue_size=0,
        client_request_id=sent["client_request_id"],
    )
    fake_socket.send(
        type="progress", request_id="r3", stage="running", done=1, total=3, rows=[row(2, "two")]
    )
    fake_socket.send(
        type="progress", request_id="r3", stage="running", done=2, total=3, rows=[row(0, "zero")]
    )
    page.wait_for_function("document.getElementById('lens-explain-body').rows.length === 2")
    assert page.locator("#lens-explain-body tr").evaluate_all(
        "trs => trs.map(t => t.dataset.position)"
    ) == ["0", "2"]
    assert page.inner_text("#lens-status") == "Running — 2 of 3 tokens explained"
    assert page.get_attribute("#lens-progress", "value") == "2"
    page.click("#lens-stop")
    assert fake_socket.sent(page, "interrupt") == {"type": "interrupt", "request_id": "r3"}
    result = {
        "analysis": "verbalize",
        "model": "tiny-llama",
        "model_group": "tiny-llama",
        "tokens": ["a", XSS, "a"],
        "source_layer": 1,
        "target_layer": 1,
        "identity_prompt": "x",
        "max_new_tokens": 8,
        "rows": [row(0, "zero"), row(1, XSS)],
        "complete": False,
    }
    fake_socket.send(
        type="completed", request_id="r3", status="interrupted", elapsed_s=0.5, result=result
    )
    assert wait_state(page, "interrupted") == "interrupted"
    assert page.is_visible("#lens-partial") and page.text_content("#lens-partial") == "partial"
    texts = page.locator("#lens-explain-body .lens-explanation").all_inner_texts()
    assert texts == ["zero", XSS]  # the final rows replace the streamed ones
    assert page.evaluate("window.__pwned") is None
    assert page.inner_text("#lens-status") == "Stopped after 0.50 s: kept the 2 rows done."
