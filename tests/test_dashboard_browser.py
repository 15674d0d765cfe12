"""The dashboard in a real headless Chromium (Debian's, driven by Playwright), on a real tier.

Never ``playwright install``: the browser is /usr/bin/chromium.
"""

import shutil

import pytest
from playwright.sync_api import expect, sync_playwright

from dockpart import keys
from dashboardkit import managed, start_tier
from helpers import wait_for

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def tier(tmp_path_factory):
    tier = start_tier(tmp_path_factory.mktemp("dash-browser-state"))
    yield tier
    tier.stop()


@pytest.fixture(scope="module")
def browser():
    assert shutil.which(CHROMIUM), "chromium is not installed (apt-get install chromium)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, tier):
    """A fresh page, logged in with the dashboard's token through its login form, whose console
    errors and uncaught exceptions the test can assert on."""
    context = browser.new_context(viewport={"width": 1400, "height": 1100})
    page = context.new_page()
    page.problems = []
    page.on("console", lambda m: m.type == "error" and page.problems.append(m.text))
    page.on("pageerror", lambda e: page.problems.append(str(e)))
    page.set_default_timeout(20_000)
    page.goto(tier.infra.base + "/login")
    page.fill('input[name="token"]', tier.infra.token)
    page.get_by_role("button", name="open").click()
    expect(page.locator("h1")).to_have_text("dockpart tier")
    yield page
    context.close()


@pytest.fixture
def rdb(tier):
    client = tier.redis.client()
    yield client
    for key in (keys.SPAWN_QUEUE, keys.DEAD_LETTERS):
        client.delete(key)
    client.close()


def row(page, url: str):
    return page.locator(f'tr[data-url="{url}"]')


def servers(rdb) -> list[str]:
    return rdb.lrange(keys.SERVERS, 0, -1)


def test_the_page_shows_every_instance_and_draws_its_charts(tier, rdb, page, tmp_path):
    page.goto(tier.infra.base + "/")
    for url in servers(rdb):
        expect(row(page, url)).to_be_visible()
    first = row(page, tier.url(tier.first))
    expect(first.locator("td.health")).to_have_text("healthy")
    # Charts have drawn data: the tier's requests/s has figures, and the canvases exist.
    page.wait_for_function(
        "() => { const c = window.dashboard?.charts.tier;"
        "  return c && c.data[0].length > 2 && c.data[1].some(v => v > 0); }")
    page.wait_for_function(
        "() => window.dashboard?.charts.per?.series.length > 1")
    assert page.locator("#charts canvas").count() >= 3
    page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
    assert page.problems == []


def test_spawn_adds_a_row_that_turns_healthy_without_a_reload(tier, rdb, page):
    page.goto(tier.infra.base + "/")
    page.evaluate("window.notReloaded = true")
    before = set(servers(rdb))
    page.get_by_role("button", name="spawn one").click()
    expect(page.locator("#notice")).to_contain_text("spawn queued")
    new = wait_for(lambda: set(servers(rdb)) - before, 20, what="a spawned instance")
    (url,) = new
    expect(row(page, url).locator("td.state")).to_have_text("running")
    expect(row(page, url).locator("td.health")).to_have_text("healthy")
    assert page.evaluate("window.notReloaded") is True
    assert page.problems == []


def test_destroy_drains_and_removes_exactly_the_named_instance(tier, rdb, page):
    top = max(int(u.rsplit(":", 1)[1]) for u in servers(rdb))
    ports = [top + 1, top + 2]
    urls = [tier.url(p) for p in ports]
    rdb.lpush(keys.SPAWN_QUEUE, *urls)
    wait_for(lambda: set(urls) <= set(servers(rdb)), 20, what=f"{urls} in servers")
    page.goto(tier.infra.base + "/")
    victim, keeper = urls
    row(page, victim).get_by_role("button", name="destroy").click()
    expect(page.locator("#notice")).to_contain_text(f"destroy queued: {victim}")
    expect(row(page, victim).locator("td.state")).to_have_text("draining")
    expect(row(page, victim)).to_have_count(0)
    assert victim not in servers(rdb) and keeper in servers(rdb)
    expect(row(page, keeper).locator("td.state")).to_have_text("running")
    wait_for(lambda: ports[0] not in managed(tier.state_dir), 10,
             what=f"the process on {ports[0]} to stop")
    assert ports[1] in managed(tier.state_dir)
    assert page.problems == []


def test_a_dead_letter_appears_with_its_reason_as_text(tier, rdb, page):
    page.goto(tier.infra.base + "/")
    hostile = "<img src=x onerror=\"document.title='pwned'\">"
    rdb.lpush(keys.SPAWN_QUEUE, "http://127.0.0.1:1", hostile)
    letter = page.locator("table.dead-letters tr", has_text="http://127.0.0.1:1")
    expect(letter.locator("td.reason")).to_contain_text("outside the allowed range")
    expect(page.locator("table.dead-letters td", has_text=hostile)).to_have_count(1)
    assert page.title() == "dockpart dashboard"
    assert page.problems == []


def test_setting_limits_with_min_above_max_says_why_and_changes_nothing(tier, rdb, page):
    page.goto(tier.infra.base + "/")
    page.fill('form.limits input[name="min"]', "5")
    page.fill('form.limits input[name="max"]', "2")
    page.get_by_role("button", name="set min/max").click()
    expect(page.locator("#notice")).to_contain_text("1 <= min <= max")
    assert rdb.hgetall(keys.AUTOSCALE_LIMITS) == {}


def test_without_the_token_the_browser_gets_the_login_form(browser, tmp_path):
    tier = start_tier(tmp_path / "state", token="browser-token")
    context = browser.new_context()
    try:
        page = context.new_page()
        problems = []
        page.on("pageerror", lambda e: problems.append(str(e)))
        reply = page.goto(tier.infra.base + "/")
        assert reply.status == 401
        expect(page.locator("h2", has_text="Instances")).to_have_count(0)
        page.fill('input[name="token"]', "wrong")
        page.get_by_role("button", name="open").click()
        expect(page.locator("p.error")).to_have_text("That is not the token.")
        page.fill('input[name="token"]', "browser-token")
        page.get_by_role("button", name="open").click()
        expect(row(page, tier.url(tier.first))).to_be_visible()
        # The script may not have run yet: a predicate that throws ends the wait at once.
        page.wait_for_function("() => window.dashboard?.history.time.length > 1")
        # Logging out ends the session: the page is the login form again, and stays it.
        page.get_by_role("button", name="log out").click()
        expect(page.locator('input[name="token"]')).to_be_visible()
        assert page.goto(tier.infra.base + "/").status == 401
        assert problems == []
    finally:
        context.close()
        tier.stop()
