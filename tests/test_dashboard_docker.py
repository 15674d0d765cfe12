"""The dashboard with the Docker driver, in a real headless Chromium, against the real engine."""

import shutil

import pytest
from playwright.sync_api import expect, sync_playwright

from dashboardkit import start_tier
from dockerkit import docker_client
from dockpart import keys
from dockpart.drivers.docker import LABEL_PORT, LABEL_TIER
from helpers import ROOT, wait_for

pytestmark = pytest.mark.docker


def containers(engine, redis_url: str) -> dict[int, object]:
    """This tier's instance containers by port."""
    found = engine.containers.list(all=True, filters={"label": f"{LABEL_TIER}={redis_url}"})
    return {int(c.labels[LABEL_PORT]): c for c in found}


def test_spawn_and_destroy_containers_from_the_dashboard(docker_images, tmp_path):
    engine = docker_client()
    tier = start_tier(tmp_path / "state", "--driver", "docker",
                      "--image", docker_images["web"], "--build-context", str(ROOT))
    try:
        rdb = tier.redis.client()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium")
                                        or "/usr/bin/chromium", args=["--no-sandbox"])
            page = browser.new_page()
            problems = []
            page.on("console", lambda m: m.type == "error" and problems.append(m.text))
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.set_default_timeout(30_000)
            page.goto(f"{tier.infra.base}/?token={tier.infra.token}")  # a link logs in
            page.get_by_role("button", name="spawn one").click()
            url = tier.url(tier.first + 1)
            row = page.locator(f'tr[data-url="{url}"]')
            expect(row.locator("td.state")).to_have_text("running")
            expect(row.locator("td.health")).to_have_text("healthy")
            container = containers(engine, tier.redis.url)[tier.first + 1]
            assert row.locator("td").nth(2).inner_text() == container.short_id
            row.get_by_role("button", name="destroy").click()
            expect(row.locator("td.state")).to_have_text("draining")
            expect(row).to_have_count(0)
            assert url not in rdb.lrange(keys.SERVERS, 0, -1)
            wait_for(lambda: tier.first + 1 not in containers(engine, tier.redis.url), 20,
                     what="the container to be removed")
            page.screenshot(path=str(tmp_path / "dashboard-docker.png"), full_page=True)
            browser.close()
            assert problems == []
        rdb.close()
    finally:
        tier.stop()
        for container in containers(engine, tier.redis.url).values():
            container.remove(force=True)
        engine.close()
