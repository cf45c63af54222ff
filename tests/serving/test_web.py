"""The web page end to end in headless Chromium (Debian's chromium driven by Playwright): pick a
user, see their history and recommendations with sources, click a recommendation, and see the
click in the history and the recommendations update. The screenshot is kept in artifacts/test/."""

from __future__ import annotations

from pathlib import Path

from playwright.sync_api import sync_playwright

from tests.conftest import REPO, system_program
from tests.serving.fixtures import Artifacts, running
from tests.serving.test_service import AUTH, KEY, settings_for

SCREENSHOTS = REPO / "artifacts" / "test"


def test_page_shows_recommendations_and_a_click_updates_them(artifacts: Artifacts,
                                                              tmp_path: Path) -> None:
    browser_path = system_program("chromium", "chromium", "chromium-browser")
    with running(settings_for(artifacts, tmp_path, public_history=False)) as (url, client), \
            sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path,
                                    args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1100, "height": 700})
        page.goto(f"{url}/?user=3")
        # the first load had no key: recommendations shown, the protected history refused
        page.wait_for_selector("#recs li.item")
        page.wait_for_selector("#history li.error")
        page.fill("#key", KEY)
        page.click("#load")
        page.wait_for_selector("#history li span")
        history_before = client.get("/users/3/history", params={"n": 200},
                                    headers=AUTH).json()["behaviours"]
        shown = page.locator("#history li").count()
        assert shown == min(20, len(history_before)) > 0
        first = page.locator("#recs li.item").first
        clicked = first.get_attribute("data-item")
        assert clicked is not None
        assert first.locator(".src").count() >= 1  # each recommendation names its source(s)
        sources = first.locator(".src").all_text_contents()
        assert set(sources) <= {"two_tower", "item_cf", "popular", "category", "cold_start"}

        first.click()
        # the click lands in the store and the page shows it as the newest behaviour
        page.wait_for_function(
            "item => document.querySelector('#history li span').textContent === item", arg=clicked)
        after = client.get("/users/3/history", params={"n": 1}, headers=AUTH).json()["behaviours"]
        assert str(after[0]["item_id"]) == clicked
        # ... and the recommendations no longer offer what was just clicked (seen filter)
        page.wait_for_function(
            "item => ![...document.querySelectorAll('#recs li.item')]"
            ".some(li => li.dataset.item === item)", arg=clicked)
        assert "error" not in (page.text_content("#status") or "")
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "web_page.png"), full_page=True)
        browser.close()
    assert (SCREENSHOTS / "web_page.png").stat().st_size > 5_000
