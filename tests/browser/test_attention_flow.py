"""The attention explorer end to end on a live server, as people use it: sign up, create
from the home form, switch views, comment, share the link with someone else, keep a
private one private, and never run script that a user typed."""

from __future__ import annotations

import secrets
from typing import Any

import pytest

pytestmark = pytest.mark.browser
XSS = "<img src=x onerror=window.__pwned=1><script>window.__pwned=2</script>"
PASSWORD = "correct horse battery"


def sign_up(page: Any, base: str) -> str:
    username = "u" + secrets.token_hex(4)
    page.goto(base + "/signup")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.fill("input[name=password_confirm]", PASSWORD)
    page.get_by_role("button", name="Sign up").click()
    page.wait_for_load_state()
    return username


def create_from_home(
    page: Any, base: str, text: str, *, model: str = "tiny-gpt2", visibility: str = "public"
) -> str:
    page.goto(base + "/")
    page.select_option("#model_name", model)
    page.fill("#text", text)
    page.select_option("#visibility", visibility)
    page.get_by_role("button", name="Visualize").click()
    page.wait_for_url("**/viz/**")
    page.wait_for_selector("#tzoo-attention[data-ready=true]")
    return page.url.split("#")[0]


def wait_for_comment(page: Any) -> None:
    page.wait_for_function(
        "document.querySelector('#tzv-notes-list').innerText.includes('previous token')"
    )


def assert_inert(page: Any) -> None:
    assert page.evaluate("window.__pwned") is None


def test_create_view_switch_comment_and_share(browser: Any, live_server: str) -> None:
    owner = browser.new_context()
    page = owner.new_page()
    sign_up(page, live_server)
    url = create_from_home(page, live_server, "The cat sat on the mat. " + XSS)
    assert (
        "The cat sat on the mat. <img"
        in page.locator(".tzv-text, #tzoo-attention").first.inner_text()
    )
    assert int(page.locator("svg.tzv-headsvg").get_attribute("data-lines")) > 0

    for tab, view in (
        ("Model", "model"),
        ("Neuron", "neuron"),
        ("Head statistics", "stats"),
        ("Head", "head"),
    ):
        page.get_by_role("tab", name=tab, exact=True).click()
        page.wait_for_function(f"location.hash.includes('view={view}')")
        assert page.locator(f"#tzv-panel-{view}").is_visible()

    page.locator("#tzv-notes-toggle").click()
    page.get_by_placeholder("What do you see here?").fill("Head 2 copies the previous token " + XSS)
    page.get_by_role("button", name="Post").click()
    wait_for_comment(page)
    assert "copies the previous token <img" in page.locator("#tzv-notes-list").inner_text()
    assert_inert(page)

    visitor = browser.new_context()  # someone who got the link, not logged in
    other = visitor.new_page()
    other.goto(url)
    other.wait_for_selector("#tzoo-attention[data-ready=true]")
    other.locator("#tzv-notes-toggle").click()
    wait_for_comment(other)
    assert "copies the previous token" in other.locator("#tzv-notes-list").inner_text()
    assert "Log in to comment" in other.locator("#tzv-notes").inner_text()
    assert_inert(other)
    owner.close()
    visitor.close()


def test_private_visualization_is_404_for_another_user(browser: Any, live_server: str) -> None:
    owner, stranger = browser.new_context(), browser.new_context()
    page = owner.new_page()
    sign_up(page, live_server)
    url = create_from_home(page, live_server, "my private notes", visibility="private")
    other = stranger.new_page()
    sign_up(other, live_server)
    response = other.goto(url)
    assert response.status == 404
    assert "my private notes" not in other.content()
    owner.close()
    stranger.close()


def test_script_in_the_model_name_is_shown_as_text(browser: Any, live_server: str) -> None:
    context = browser.new_context()
    page = context.new_page()
    page.goto(live_server + "/")
    # A hand-made form post: the select only offers real models.
    page.evaluate(
        """xss => { const o = document.createElement('option'); o.value = xss; o.text = 'x';
                    document.querySelector('#model_name').append(o);
                    document.querySelector('#model_name').value = xss; }""",
        XSS,
    )
    page.get_by_role("button", name="Visualize").click()
    page.wait_for_selector("#form-error")
    assert "Unknown model '<img" in page.locator("#form-error").inner_text()
    assert_inert(page)
    context.close()


def test_t5_neuron_view_fetches_the_position_bias_and_matches(page: Any, live_server: str) -> None:
    url = create_from_home(page, live_server, "Hello there, world.", model="tiny-t5")
    page.goto(url + "#view=neuron&stack=encoder&layer=1&head=2&token=3")
    page.wait_for_selector(".tzv-verify[data-matches]")
    summary = page.locator(".tzv-verify")
    assert summary.get_attribute("data-matches") == "true", summary.inner_text()
    assert float(summary.get_attribute("data-max-diff")) < 1e-3
    assert any("/position_bias?stack=encoder" in u for u in page.requests)
