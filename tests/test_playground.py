"""The playground page in a real browser: headless Chromium (Debian's `chromium`, driven by Playwright) types a
prompt, generates with the keyboard, sees text stream in with probability shading and alternatives, and compares two
models on the same prompt and seed."""

from __future__ import annotations

import shutil

import openai
import pytest

from live_server import live_server, scaled_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (Debian: apt-get install "
                                                         "chromium); Playwright cannot download its own browsers here")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("page")
    runs = [scaled_run(root / "story", scale=5.0),
            scaled_run(root / "mixer", "micromixer-100k", ("model.vocab_size=258",), scale=2.0)]
    with live_server(runs) as url:
        yield url


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(30_000)
        page.goto(server + "/")
        yield page
        browser.close()


def test_the_page_generates_compares_and_shades(page, server, tmp_path):
    page.wait_for_selector("#model-b option[value=mixer]", state="attached")
    assert page.locator("#model-a").input_value() == "story" and page.locator("#model-b").input_value() == "mixer"
    prompt = page.locator("#prompt")
    prompt.fill("")
    prompt.type("The cat")  # real key presses
    settings = {"temperature": "0.8", "max_tokens": "30", "seed": "7", "top_k": "0", "top_p": "1",
                "min_p": "0", "repetition_penalty": "1"}
    for name, value in settings.items():
        page.locator(f"#{name}").fill(value)
    assert page.locator("#max_tokens-out").inner_text() == "30"
    prompt.press("Control+Enter")  # the keyboard starts both models
    panes = page.locator(".pane")
    page.wait_for_function("document.querySelectorAll('.pane .stats').length == 2 && "
                           "[...document.querySelectorAll('.pane .stats')].every(s => s.textContent.includes('done'))")
    assert panes.count() == 2
    assert [panes.nth(i).locator("h2").inner_text() for i in range(2)] == ["story", "mixer"]
    client = openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0)
    for i, model in enumerate(["story", "mixer"]):
        pane = panes.nth(i)
        tokens = pane.locator(".tok")
        assert tokens.count() == 30 and "tokens/s" in pane.locator(".stats").inner_text()
        shown = pane.locator(".output").inner_text()
        expected = client.completions.create(model=model, prompt="The cat", max_tokens=30, temperature=0.8, seed=7,
                                             top_p=1, extra_body={"top_k": 0, "min_p": 0, "repetition_penalty": 1})
        # the page shows what the API gives for the same settings and seed
        assert shown == "The cat" + expected.choices[0].text
        shaded = tokens.evaluate_all("ts => ts.map(t => [+t.dataset.p, t.style.background])")
        assert len({shade for _, shade in shaded}) > 1 and all(s.startswith("rgba") for _, s in shaded)

        def greenness(shade: str) -> int:  # green minus red: the likelier the token, the greener
            red, green = map(int, shade[5:].split(",")[:2])
            return green - red

        least, most = min(shaded), max(shaded)
        assert least[0] < most[0] and greenness(least[1]) < greenness(most[1])
    # a token whose text is shown (a byte-level model's part of a character shows once the character is whole)
    shown = panes.nth(0).locator(".tok").evaluate_all("ts => ts.findIndex(t => t.getBoundingClientRect().width > 3)")
    panes.nth(0).locator(".tok").nth(shown).hover()
    tip = page.locator("#tip")
    assert tip.is_visible() and tip.locator(".alt").count() == 5 and "%" in tip.inner_text()
    page.mouse.move(0, 0)
    assert not tip.is_visible()
    panes.nth(1).locator(".output").focus()
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    assert tip.is_visible() and panes.nth(1).locator(".tok.sel").count() == 1
    page.keyboard.press("Escape")
    assert not tip.is_visible()
    page.screenshot(path=str(tmp_path / "playground.png"))
    assert (tmp_path / "playground.png").stat().st_size > 20_000
