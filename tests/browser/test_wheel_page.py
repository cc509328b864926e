"""The token wheel and its replay page in a real browser.

Two halves:

- The pages' real templates and ES modules, served by Playwright's request routing from
  a made-up origin (http://wheel.test) with a fake of the session API written here: the
  wheel draws a segment per token plus Other at the right angles, a spin lands on the
  segment chosen beforehand, the keyboard works, controls and errors show, a hostile
  token text stays inert, and the replay steps through a saved path. No server, no model.
- The same pages against the live server (`tzoo serve`) and the tiny random GPT-2.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jinja2
import pytest

pytestmark = pytest.mark.browser

WEB = Path(__file__).resolve().parents[2] / "src" / "tzoo" / "web"
ORIGIN = "http://wheel.test"
CSRF = "csrf-test-token"
XSS = "<img src=x onerror=window.__pwned=1>"

# The fake model's next-token distribution: (id, text, probability); the rest is "Other".
TOKENS = [
    (6342, " Paris", 0.412),
    (262, " the", 0.18),
    (257, " a", 0.09),
    (13, ".", 0.05),
    (666, XSS, 0.04),
    (198, "\n", 0.03),
    (220, "  ", 0.02),
]
OTHER_P = round(1 - sum(p for _, _, p in TOKENS), 6)
OTHER: dict[str, Any] = {
    "probability": OTHER_P,
    "count": 50250,
    "samples": [
        {"id": 11, "text": ",", "probability": 0.009},
        {"id": 99, "text": XSS, "probability": 0.004},
    ],
}
OTHER_DRAW = {"id": 4242, "text": " Lyon", "probability": 0.003}


# -- the fake session API --------------------------------------------------------------------


def distribution(threshold: float, temperature: float | None, top_k: int | None) -> dict[str, Any]:
    """The fake distribution: temperature reshapes it (p ** (1 / T)), top-k cuts it."""
    weights = [(i, t, p ** (1 / (temperature or 1.0))) for i, t, p in TOKENS]
    other = OTHER_P ** (1 / (temperature or 1.0))
    if top_k is not None:
        weights, other = weights[:top_k], 0.0
    total = sum(w for *_, w in weights) + other
    tokens = [
        {"id": i, "text": t, "probability": w / total}
        for i, t, w in weights
        if w / total >= threshold
    ]
    rest = 1 - sum(t["probability"] for t in tokens)
    applied: dict[str, Any] = {}
    if temperature not in (None, 1.0):
        applied["temperature"] = temperature
    if top_k is not None:
        applied["top_k"] = top_k
    return {
        "tokens": tokens,
        "other": {
            **OTHER,
            "probability": rest if rest > 1e-9 else 0.0,
            "count": OTHER["count"] if rest > 1e-9 else 0,
        },
        "applied": applied,
        "threshold": threshold,
    }


@dataclass
class FakeApi:
    """Sessions in memory, the server's contract, and every request it saw."""

    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    fail: dict[str, tuple[int, Any]] = field(
        default_factory=dict
    )  # "append-token" -> (413, detail)
    saves: int = 0
    pages: dict[str, str] = field(default_factory=dict)  # path -> rendered HTML

    def snapshot(self, sid: str) -> dict[str, Any]:
        s = self.sessions[sid]
        text = s["prompt"] + "".join(step["text"] for step in s["steps"])
        return {
            "id": sid,
            "model_name": s["model_name"],
            "prompt": s["prompt"],
            "prompt_tokens": [{"id": 1, "text": w} for w in s["prompt"].split(" ")],
            "steps": list(s["steps"]),
            "text": text,
            "context_tokens": len(s["prompt"].split(" ")) + len(s["steps"]),
            "created_at": "2025-01-01T00:00:00",
            "last_used": "2025-01-01T00:00:00",
            "expires_at": "2025-01-01T01:00:00",
        }

    def handle(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
        parts = path.strip("/").split("/")[1:]  # after "api"
        action = parts[2] if len(parts) > 2 else ""
        failing = action or ("sessions" if parts == ["sessions"] else "")
        if failing in self.fail:
            return self.fail[failing]
        if parts == ["sessions"] and method == "POST":
            sid = f"s{len(self.sessions) + 1}"
            self.sessions[sid] = {"model_name": body["model_name"], "prompt": "", "steps": []}
            return 201, self.snapshot(sid)
        sid = parts[1]
        if sid not in self.sessions:
            return 404, {
                "detail": f"No session {sid}: it expired after an hour idle, or never existed."
            }
        session = self.sessions[sid]
        if method == "DELETE":
            del self.sessions[sid]
            return 204, None
        if action == "" and method == "GET":
            return 200, self.snapshot(sid)
        if action == "set-prompt":
            session["prompt"] = body["prompt"]
            return 200, self.snapshot(sid)
        if action == "next-token-probs":

            def num(name: str, kind: type = float) -> Any:
                return kind(query[name]) if name in query else None

            if num("temperature") is not None and num("temperature") > 100:
                return 422, {"detail": "temperature must be at most 100"}
            dist = distribution(num("threshold") or 0.01, num("temperature"), num("top_k", int))
            return 200, {**dist, "context_tokens": self.snapshot(sid)["context_tokens"]}
        if action == "append-token":
            dist = distribution(
                body.get("threshold", 0.01), body.get("temperature"), body.get("top_k")
            )
            sampling = {k: body[k] for k in ("temperature", "top_k", "top_p") if k in body}
            if body.get("choice") == "other":
                token, choice = OTHER_DRAW, "other"
            else:
                token = next(t for t in dist["tokens"] if t["id"] == body["token_id"])
                choice = "token"
            step = {
                "token_id": token["id"],
                "text": token["text"],
                "probability": token["probability"],
                "choice": choice,
                "sampling": sampling,
                "threshold": body.get("threshold", 0.01),
                "wheel": {"tokens": dist["tokens"], "other": dist["other"]},
            }
            session["steps"].append(step)
            return 200, {"step": step, "session": self.snapshot(sid)}
        if action == "undo":
            undone = session["steps"].pop() if session["steps"] else None
            return 200, {"undone": undone, "session": self.snapshot(sid)}
        if action == "save":
            if not session["steps"]:
                return 422, {"detail": "Append at least one token before saving the path."}
            self.saves += 1
            slug = f"replay{self.saves}"
            return 201, {"slug": slug, "url": f"{ORIGIN}/wheel/replay/{slug}"}
        return 404, {"detail": "Not Found"}

    def calls(self, action: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"].rstrip("/").endswith(action)]


def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(WEB / "templates"), autoescape=True)
    env.globals["url_for"] = lambda name, path: f"{ORIGIN}/static/{path}"
    return env


def render(template: str, **context: Any) -> str:
    base = {"request": None, "current_user": None, "csrf_token": CSRF}
    return environment().get_template(template).render(**base, **context)


def replay_of(api: FakeApi, sid: str) -> dict[str, Any]:
    snap = api.snapshot(sid)
    keep = ("model_name", "prompt", "prompt_tokens", "steps", "text")
    return {**{k: snap[k] for k in keep}, "slug": "replay1", "created_at": "2025-01-02T03:04:05"}


MODELS = [
    {"name": "tiny-gpt2", "architecture": "decoder"},
    {"name": "smollm2-135m", "architecture": "decoder"},
]


@pytest.fixture
def fake(page: Any) -> Iterator[FakeApi]:
    """Route http://wheel.test to the real templates and static files and the fake API."""
    api = FakeApi()
    api.pages["/wheel"] = render("wheel/wheel.html", models=MODELS, default_model="smollm2-135m")

    def serve(route: Any) -> None:
        request = route.request
        url = urlsplit(request.url)
        if url.path.startswith("/static/"):
            file = WEB / "static" / url.path.removeprefix("/static/")
            kind = {".js": "text/javascript", ".css": "text/css"}.get(
                file.suffix, "application/octet-stream"
            )
            route.fulfill(status=200, body=file.read_bytes(), headers={"Content-Type": kind})
        elif url.path.startswith("/api/"):
            body = request.post_data_json if request.post_data else None
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            api.requests.append(
                {
                    "method": request.method,
                    "path": url.path,
                    "query": query,
                    "body": body,
                    "headers": request.headers,
                }
            )
            status, payload = api.handle(request.method, url.path, query, body)
            route.fulfill(
                status=status,
                body="" if payload is None else json.dumps(payload),
                headers={"Content-Type": "application/json"},
            )
        elif url.path in api.pages:
            route.fulfill(
                status=200,
                body=api.pages[url.path],
                headers={"Content-Type": "text/html; charset=utf-8"},
            )
        else:
            route.fulfill(status=404, body="not here")

    page.route(f"{ORIGIN}/**", serve)
    yield api


def open_wheel(page: Any, hash_: str = "") -> None:
    page.goto(f"{ORIGIN}/wheel{hash_}")
    page.wait_for_selector("#tzoo-wheel[data-ready=true]")


def start_session(page: Any, prompt: str = "The capital of France is") -> None:
    open_wheel(page)
    page.fill("#wheel-prompt", prompt)
    page.click("#wheel-start-button")
    page.wait_for_selector("#wheel-canvas svg[data-segments='8']")
    settle(page)


def settle(page: Any) -> None:
    page.wait_for_selector("#tzoo-wheel[data-busy=false][data-loading=false]")


def segments(page: Any) -> list[dict[str, Any]]:
    return page.eval_on_selector_all(
        "#wheel-canvas g.wheel-seg",
        "gs => gs.map(g => ({key: g.dataset.key, start: +g.dataset.start, end: +g.dataset.end, label: g.getAttribute('aria-label')}))",
    )


def measured_spans(page: Any) -> dict[str, float]:
    """Each wedge's angular width, measured on its drawn path (0.05° steps at r = 120)."""
    return page.evaluate(
        """() => {
            const svg = document.querySelector('#wheel-canvas svg');
            const spans = {};
            for (const g of svg.querySelectorAll('g.wheel-seg')) {
                const path = g.querySelector('path');
                let inside = 0;
                for (let a = 0; a < 360; a += 0.05) {
                    const t = a * Math.PI / 180;
                    const p = svg.createSVGPoint(); p.x = 120 * Math.sin(t); p.y = -120 * Math.cos(t);
                    if (path.isPointInFill(p)) inside++;
                }
                spans[g.dataset.key] = inside * 0.05;
            }
            return spans;
        }"""
    )


# -- the wheel page, on the fake API -----------------------------------------------------------


def test_wheel_draws_a_segment_per_token_plus_other_at_their_angles(
    page: Any, fake: FakeApi
) -> None:
    start_session(page)
    segs = segments(page)
    assert [s["key"] for s in segs] == [f"t{i}" for i, _, _ in TOKENS] + ["other"]
    assert page.locator("#wheel-canvas g.wheel-seg path").count() == len(TOKENS) + 1
    shares = [p for _, _, p in TOKENS] + [OTHER_P]
    spans = measured_spans(page)
    for seg, p in zip(segs, shares, strict=True):
        assert abs((seg["end"] - seg["start"]) - 360 * p) < 0.5, seg
        # the drawn wedge, less its 0.23° padding, covers the same angle
        assert abs(spans[seg["key"]] - 360 * p) < 0.5, (seg, spans[seg["key"]])
    assert segs[0]["label"] == "token ' Paris', 41.2 percent"
    assert segs[-1]["label"] == "other: 50250 more tokens, 17.8 percent"
    # the table: the same segments, with ids and percentages
    rows = page.locator("#wheel-table-body tr")
    assert rows.count() == len(TOKENS) + 1
    assert rows.nth(0).locator("td").nth(0).inner_text() == "6342"
    assert rows.nth(0).locator("td").nth(1).inner_text() == "41.2%"
    assert rows.nth(len(TOKENS)).locator("th").inner_text().startswith("Other")
    assert "Applied: none" in page.locator("#wheel-applied").inner_text()
    assert "50250 tokens" in page.locator("#wheel-other-summary").inner_text()
    assert page.locator("#wheel-other-samples li").count() == 2
    # every write carried the page's CSRF token
    writes = [r for r in fake.requests if r["method"] != "GET"]
    assert writes and all(r["headers"].get("x-csrf-token") == CSRF for r in writes)
    assert fake.calls("/sessions")[0]["body"] == {"model_name": "smollm2-135m"}
    assert fake.calls("set-prompt")[0]["body"] == {"prompt": "The capital of France is"}
    assert "#session=s1" in page.url


@pytest.mark.parametrize(("r", "expected"), [(0.05, "t6342"), (0.5, "t262"), (0.97, "other")])
def test_spin_lands_on_the_segment_chosen_first(
    page: Any, fake: FakeApi, r: float, expected: str
) -> None:
    page.emulate_media(reduced_motion="reduce")
    start_session(page)
    page.evaluate(f"() => {{ Math.random = () => {r}; }}")
    page.focus("#wheel-spin")
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelector('#tzoo-wheel').dataset.steps === '1'")
    settle(page)
    append = fake.calls("append-token")[-1]["body"]
    assert (
        (append.get("choice") == "other")
        if expected == "other"
        else append["token_id"] == int(expected[1:])
    )
    assert page.evaluate("document.activeElement.id") == "wheel-spin"  # ready to spin again
    assert append["threshold"] == 0.01


def test_spin_animates_and_stops_under_the_pointer(page: Any, fake: FakeApi) -> None:
    start_session(page)
    page.evaluate("() => { Math.random = () => 0.5; }")  # " the", 41.2 % .. 59.2 % of the circle
    page.click("#wheel-spin")
    page.wait_for_selector("#wheel-canvas svg.is-spinning")
    page.wait_for_timeout(600)
    moving = page.evaluate("() => document.querySelector('.wheel-rotor').getAttribute('transform')")
    assert moving != "rotate(0)"
    # At rest, the segment under the pointer (at 0°) is the one chosen before the spin.
    under_pointer = page.wait_for_function(
        """() => { const svg = document.querySelector('#wheel-canvas svg');
                   if (svg.dataset.landed !== 't262') return null;
                   const at = ((-svg.dataset.rotation % 360) + 360) % 360;
                   const g = [...svg.querySelectorAll('g.wheel-seg')].find(
                       (g) => at >= +g.dataset.start && at < +g.dataset.end);
                   return g.dataset.key; }""",
        timeout=6000,
    ).json_value()
    assert under_pointer == "t262"
    page.wait_for_function("document.querySelector('#tzoo-wheel').dataset.steps === '1'")
    assert fake.calls("append-token")[-1]["body"]["token_id"] == 262
    assert page.locator("#wheel-text .wheel-text-token").inner_text() == " the"


def test_keyboard_moves_between_segments_and_enter_or_space_appends(
    page: Any, fake: FakeApi
) -> None:
    start_session(page)
    page.focus("#wheel-spin")
    page.keyboard.press("Tab")  # the wheel's single tab stop
    assert page.evaluate("document.activeElement.dataset.key") == "t6342"
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    assert page.evaluate("document.activeElement.dataset.key") == "t257"
    assert page.locator("#wheel-canvas .wheel-tip").is_visible()
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelector('#tzoo-wheel').dataset.steps === '1'")
    settle(page)
    assert fake.calls("append-token")[-1]["body"]["token_id"] == 257
    # focus stays on the redrawn wheel; End reaches Other and Space draws from it
    assert page.evaluate("document.activeElement.classList.contains('wheel-seg')")
    page.keyboard.press("End")
    assert page.evaluate("document.activeElement.dataset.key") == "other"
    assert "Lyon" not in page.locator("#wheel-text").inner_text()
    page.keyboard.press(" ")
    page.wait_for_function("document.querySelector('#tzoo-wheel').dataset.steps === '2'")
    assert fake.calls("append-token")[-1]["body"]["choice"] == "other"
    assert page.locator("#wheel-chips li.is-other").count() == 1
    assert page.locator("#wheel-text").inner_text().endswith(" a Lyon")
    # Ctrl+Z undoes (outside text fields), and so does the button
    page.keyboard.press("Control+z")
    page.wait_for_function("document.querySelector('#tzoo-wheel').dataset.steps === '1'")
    settle(page)
    page.click("#wheel-undo")
    page.wait_for_function("document.querySelector('#tzoo-wheel').dataset.steps === '0'")
    settle(page)
    assert len(fake.calls("undo")) == 2
    assert page.locator("#wheel-undo").is_disabled() and page.locator("#wheel-save").is_disabled()


def test_a_hostile_token_text_stays_inert(page: Any, fake: FakeApi) -> None:
    start_session(page)
    xss = page.locator('#wheel-canvas g.wheel-seg[data-key="t666"]')
    xss.hover()
    assert XSS in page.locator("#wheel-canvas .wheel-tip").inner_text()
    page.focus('#wheel-canvas g.wheel-seg[data-key="other"]')  # its samples include it too
    assert "<img src=x onerror=" in page.locator("#wheel-canvas .wheel-tip").inner_text()
    xss.click(force=True)
    page.wait_for_function("document.querySelector('#tzoo-wheel').dataset.steps === '1'")
    settle(page)
    assert page.locator("#wheel-text .wheel-text-token").inner_text() == XSS
    assert XSS in page.locator("#wheel-chips").inner_text()
    assert XSS in page.locator("#wheel-table-body").inner_text()
    assert page.locator("#tzoo-wheel img").count() == 0
    assert page.evaluate("window.__pwned") is None


def test_controls_refetch_show_applied_and_reasons(page: Any, fake: FakeApi) -> None:
    start_session(page)
    page.fill("input[name=temperature]", "0.7")
    page.locator("input[name=temperature]").press("Tab")
    page.wait_for_function(
        "document.querySelector('#wheel-applied').textContent.includes('temperature 0.7')"
    )
    settle(page)
    assert fake.calls("next-token-probs")[-1]["query"] == {
        "threshold": "0.01",
        "temperature": "0.7",
    }
    page.fill("input[name=top_k]", "3")
    page.locator("input[name=top_k]").press("Tab")
    page.wait_for_selector("#wheel-canvas svg[data-segments='3']")
    assert page.locator("#wheel-applied").inner_text() == "Applied: temperature 0.7, top-k 3"
    # A value out of range is refused here, with the reason, and nothing is fetched.
    before = len(fake.calls("next-token-probs"))
    page.fill("input[name=temperature]", "5")
    page.locator("input[name=temperature]").press("Tab")
    assert (
        "Temperature must be a number from 0.05 to 3"
        in page.locator("#wheel-controls-error").inner_text()
    )
    assert page.locator("input[name=temperature]").get_attribute("aria-invalid") == "true"
    assert len(fake.calls("next-token-probs")) == before
    # A reason from the server (422) shows in the same place.
    fake.fail["next-token-probs"] = (422, {"detail": "top_p: Input should be greater than 0"})
    page.fill("input[name=temperature]", "1")
    page.locator("input[name=temperature]").press("Tab")
    page.wait_for_function(
        "document.querySelector('#wheel-controls-error').textContent.includes('top_p')"
    )
    assert page.locator("#wheel-controls-error").is_visible()
    # the appended token carries the controls in force
    del fake.fail["next-token-probs"]
    page.fill("input[name=top_k]", "")
    page.locator("input[name=top_k]").press("Tab")
    page.wait_for_selector("#wheel-canvas svg[data-segments='8']")
    settle(page)
    assert not page.locator("#wheel-controls-error").is_visible()
    page.locator("#wheel-table-body tr").nth(1).get_by_role("button").click()
    page.wait_for_function("document.querySelector('#tzoo-wheel').dataset.steps === '1'")
    assert fake.calls("append-token")[-1]["body"] == {"token_id": 262, "threshold": 0.01}


def test_expired_session_offers_a_new_one_and_other_errors_show(page: Any, fake: FakeApi) -> None:
    open_wheel(page, "#session=gone")
    alert = page.locator("#wheel-alert")
    assert alert.is_visible()
    assert "No session gone" in alert.inner_text()
    assert not page.locator("#wheel-session").is_visible()
    page.get_by_role("button", name="Start a new session").click()
    page.wait_for_selector("#wheel-canvas svg[data-segments='8']")
    settle(page)
    assert not alert.is_visible()
    fake.fail["append-token"] = (413, {"detail": "The context is full (2048 tokens)."})
    page.locator('#wheel-canvas g.wheel-seg[data-key="t6342"]').click()
    page.wait_for_function(
        "document.querySelector('#wheel-error').textContent.includes('context is full')"
    )
    del fake.fail["append-token"]
    fake.sessions.clear()  # the session expires while the page is open
    page.locator('#wheel-canvas g.wheel-seg[data-key="t6342"]').click()
    page.wait_for_selector("#wheel-alert:not([hidden])")
    fake.fail["sessions"] = (429, {"detail": "Too many sessions; try again in a few minutes."})
    page.get_by_role("button", name="Start a new session").click()
    page.wait_for_function(
        "document.querySelector('#wheel-start-error').textContent.includes('Too many sessions')"
    )


def test_save_shows_a_permanent_link(page: Any, fake: FakeApi) -> None:
    start_session(page)
    assert page.locator("#wheel-save").is_disabled()
    page.locator('#wheel-canvas g.wheel-seg[data-key="t6342"]').click()
    page.wait_for_function("document.querySelector('#tzoo-wheel').dataset.steps === '1'")
    settle(page)
    page.select_option("#wheel-visibility", "unlisted")
    page.click("#wheel-save")
    page.wait_for_selector("#wheel-saved:not([hidden])")
    assert fake.calls("save")[-1]["body"] == {"visibility": "unlisted"}
    assert fake.calls("save")[-1]["headers"].get("x-csrf-token") == CSRF
    assert (
        page.locator("#wheel-saved-link").get_attribute("href") == f"{ORIGIN}/wheel/replay/replay1"
    )
    assert page.input_value("#wheel-saved-url") == f"{ORIGIN}/wheel/replay/replay1"


# -- the replay page ----------------------------------------------------------------------------


@pytest.fixture
def replay_url(page: Any, fake: FakeApi) -> str:
    """A three-step path (" Paris", a hostile token, a draw from Other) as a replay page."""
    sid = "s1"
    fake.sessions[sid] = {
        "model_name": "tiny-gpt2",
        "prompt": "The capital of France is",
        "steps": [],
    }
    fake.handle(
        "POST", f"/api/sessions/{sid}/append-token", {}, {"token_id": 6342, "threshold": 0.01}
    )
    fake.handle(
        "POST",
        f"/api/sessions/{sid}/append-token",
        {},
        {"token_id": 666, "threshold": 0.01, "temperature": 0.7},
    )
    fake.handle(
        "POST", f"/api/sessions/{sid}/append-token", {}, {"choice": "other", "threshold": 0.01}
    )
    replay = replay_of(fake, sid)
    replay["model_name"] = f"tiny {XSS}"
    fake.pages["/wheel/replay/replay1"] = render("wheel/replay.html", replay=replay)
    return f"{ORIGIN}/wheel/replay/replay1"


def replay_position(page: Any) -> str:
    return page.evaluate("document.querySelector('#tzoo-wheel-replay').dataset.position")


def test_replay_steps_through_the_saved_path(page: Any, fake: FakeApi, replay_url: str) -> None:
    page.emulate_media(reduced_motion="reduce")
    page.goto(replay_url)
    page.wait_for_selector("#tzoo-wheel-replay[data-ready=true]")
    assert replay_position(page) == "0"
    assert page.locator("#replay-text").inner_text() == "The capital of France is"
    assert page.locator("#replay-canvas g.wheel-seg").count() == len(TOKENS) + 1
    assert page.locator("#replay-canvas g.wheel-seg.is-chosen").count() == 0
    assert page.locator("#replay-prev").is_disabled()

    page.click("#replay-next")
    page.wait_for_function("document.querySelector('#tzoo-wheel-replay').dataset.position === '1'")
    assert page.locator("#replay-canvas g.wheel-seg.is-chosen").get_attribute("data-key") == "t6342"
    assert page.locator("#replay-table-body tr.is-chosen").get_attribute("data-key") == "t6342"
    assert page.locator("#replay-text").inner_text() == "The capital of France is Paris"
    assert "Step 1 of 3" in page.locator("#replay-step").inner_text()

    page.click("#replay-next")
    page.wait_for_function("document.querySelector('#tzoo-wheel-replay').dataset.position === '2'")
    assert page.locator("#replay-canvas g.wheel-seg.is-chosen").get_attribute("data-key") == "t666"
    assert "temperature 0.7" in page.locator("#replay-facts").inner_text()
    assert page.locator("#replay-text .wheel-text-token").last.inner_text() == XSS

    page.locator("#replay-slider").fill("3")
    page.wait_for_function("document.querySelector('#tzoo-wheel-replay').dataset.position === '3'")
    assert page.locator("#replay-canvas g.wheel-seg.is-chosen").get_attribute("data-key") == "other"
    assert "drawn from Other" in page.locator("#replay-step").inner_text()
    assert page.locator("#replay-next").is_disabled()
    assert "#step=3" in page.url

    page.click("#replay-prev")
    page.wait_for_function("document.querySelector('#tzoo-wheel-replay').dataset.position === '2'")
    page.locator("#replay-slider").fill("0")
    page.click("#replay-play")
    assert page.locator("#replay-play").get_attribute("aria-pressed") == "true"
    page.wait_for_function(
        "document.querySelector('#tzoo-wheel-replay').dataset.position === '3'", timeout=10_000
    )
    page.wait_for_function("document.querySelector('#replay-play').textContent === 'Play'")
    assert page.locator("#tzoo-wheel-replay img").count() == 0
    assert page.evaluate("window.__pwned") is None
    # Pure client side: nothing but the page and its static files was asked for.
    assert not fake.requests
    assert all(u.startswith(ORIGIN + "/static/") or u == replay_url for u in page.requests)


def test_replay_animates_a_spin_onto_the_chosen_segment(
    page: Any, fake: FakeApi, replay_url: str
) -> None:
    page.goto(replay_url + "#step=1")
    page.wait_for_selector("#tzoo-wheel-replay[data-ready=true]")
    assert page.evaluate("document.querySelector('#tzoo-wheel-replay').dataset.position") == "1"
    page.click("#replay-next")
    page.wait_for_selector("#tzoo-wheel-replay[data-spinning=true]")
    page.wait_for_function(
        "document.querySelector('#tzoo-wheel-replay').dataset.position === '2'", timeout=5000
    )
    svg = page.locator("#replay-canvas svg")
    assert svg.get_attribute("data-landed") is None  # redrawn at rest, the choice pulled out
    assert page.locator("#replay-canvas g.wheel-seg.is-chosen").get_attribute("data-key") == "t666"


# -- against the live server ------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel_server(live_server: str) -> str:
    if httpx.get(live_server + "/wheel", timeout=10).status_code == 404:
        pytest.skip("the server has no /wheel page yet")
    return live_server


def test_live_wheel_session_spin_undo_save_and_replay(wheel_server: str, page: Any) -> None:
    page.emulate_media(reduced_motion="reduce")
    page.goto(wheel_server + "/wheel")
    page.wait_for_selector("#tzoo-wheel[data-ready=true]")
    page.select_option("#wheel-model", "tiny-gpt2")
    page.fill("#wheel-prompt", "Hello there, my friend")
    page.click("#wheel-start-button")
    page.wait_for_selector("#wheel-canvas svg[data-segments]", timeout=60_000)
    settle(page)
    # a random tiny model spreads its mass thin: a low threshold gives it segments
    page.fill("input[name=threshold]", "0.001")
    page.locator("input[name=threshold]").press("Tab")
    page.wait_for_function("document.querySelector('#wheel-table-body').rows.length > 1")
    settle(page)
    n = int(page.locator("#wheel-canvas svg").get_attribute("data-segments"))
    assert n == page.locator("#wheel-table-body tr").count() >= 1
    starts = segments(page)
    total = sum(s["end"] - s["start"] for s in starts)
    assert math.isclose(total, 360, abs_tol=1e-6)

    page.locator("#wheel-canvas g.wheel-seg").first.click(force=True)
    page.wait_for_function("document.querySelector('#tzoo-wheel').dataset.steps === '1'")
    settle(page)
    page.click("#wheel-spin")
    page.wait_for_function("document.querySelector('#tzoo-wheel').dataset.steps === '2'")
    settle(page)
    page.keyboard.press("Control+z")
    page.wait_for_function("document.querySelector('#tzoo-wheel').dataset.steps === '1'")
    settle(page)
    chosen = page.locator("#wheel-text .wheel-text-token").inner_text()

    page.click("#wheel-save")
    page.wait_for_selector("#wheel-saved:not([hidden])")
    link = page.locator("#wheel-saved-link").get_attribute("href")
    assert re.search(r"/wheel/replay/[^/]+$", link)
    page.goto(link)
    page.wait_for_selector("#tzoo-wheel-replay[data-ready=true]")
    page.click("#replay-next")
    page.wait_for_function("document.querySelector('#tzoo-wheel-replay').dataset.position === '1'")
    assert page.locator("#replay-text .wheel-text-token").inner_text() == chosen
    assert page.locator("#replay-canvas g.wheel-seg.is-chosen").count() == 1
    assert all(url.startswith(wheel_server) for url in page.requests)


def test_live_unknown_session_offers_a_new_one(wheel_server: str, page: Any) -> None:
    page.goto(wheel_server + "/wheel#session=no-such-session")
    page.wait_for_selector("#tzoo-wheel[data-ready=true]")
    assert page.locator("#wheel-alert").is_visible()
    assert page.locator("#wheel-alert-text").inner_text().strip()
    assert page.get_by_role("button", name="Start a new session").is_visible()
