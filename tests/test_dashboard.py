"""dockpart-infra --dashboard over HTTP: its JSON API, its access rules and its buttons, against
a real tier (Redis, the first dockpart-web, dockpart-infra with the process driver, a proxy)."""

import http.client
import json
import socket
import subprocess
import sys
import zipfile
from urllib.parse import urlsplit

import pytest
import requests
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from dockpart import infra, keys
from dashboardkit import start_dashboard_infra, start_tier, stop_managed
from helpers import BIN, ROOT, free_port, wait_for

HTML = {"Accept": "text/html"}
JSON = {"Accept": "application/json"}


@pytest.fixture(scope="module")
def tier(tmp_path_factory):
    tier = start_tier(tmp_path_factory.mktemp("dash-state"))
    yield tier
    tier.stop()


@pytest.fixture
def rdb(tier):
    """The tier's Redis; what a test queued or dead-lettered is gone afterwards."""
    client = tier.redis.client()
    yield client
    for key in (keys.SPAWN_QUEUE, keys.DESTROY_QUEUE, keys.DEAD_LETTERS, keys.AUTOSCALE_LIMITS,
                keys.AUTOSCALE_DECISIONS, keys.AUTOSCALE_DESIRED, keys.DEPLOY_LIVE):
        client.delete(key)
    client.close()


def state(dash, headers: dict | None = None) -> dict:
    """GET /api/state as ``dash``'s logged-in client (a started dashboard infra)."""
    reply = dash.http.get(dash.base + "/api/state", headers={**JSON, **(headers or {})},
                          timeout=5)
    assert reply.status_code == 200, reply.text
    return reply.json()


def post(dash, path: str, csrf: str | None = None, headers: dict | None = None, **kw):
    headers = {**JSON, **(headers or {})}
    if csrf:
        headers["X-CSRF-Token"] = csrf
    return dash.http.post(dash.base + path, headers=headers, timeout=10, allow_redirects=False,
                          **kw)


def test_dashboard_is_off_by_default_and_token_falls_back_to_the_environment(monkeypatch):
    monkeypatch.delenv("DOCKPART_DASHBOARD_TOKEN", raising=False)
    options = infra.Options()
    options.parseOptions([])
    assert options["dashboard"] is None and options["dashboard-token"] is None
    monkeypatch.setenv("DOCKPART_DASHBOARD_TOKEN", "from-env")
    options = infra.Options()
    options.parseOptions(["--dashboard", "tcp:0"])
    assert options["dashboard-token"] == "from-env"
    options = infra.Options()
    options.parseOptions(["--dashboard-token", "from-option"])
    assert options["dashboard-token"] == "from-option"


def test_a_bad_dashboard_endpoint_is_a_usage_error(tmp_path):
    options = infra.Options()
    options.parseOptions(["--driver", "process", "--state-dir", str(tmp_path),
                          "--dashboard", "tcp:notaport", "--dashboard-token", "t"])
    with pytest.raises(usage.UsageError, match="--dashboard 'tcp:notaport'"):
        infra.makeService(options, MemoryReactorClock())


def test_state_lists_every_instance_with_the_proxies_figures(tier, rdb):
    first = tier.url(tier.first)

    def healthy_with_traffic():
        rows = {row["url"]: row for row in state(tier.infra)["instances"]}
        row = rows.get(first)
        return row if row and row["health"] == "healthy" and row["rps"] else None

    row = wait_for(healthy_with_traffic, 15, what="the first instance's figures")
    assert row["state"] == "external"  # started by hand, not by this infra
    assert row["p50_ms"] is not None and row["p95_ms"] >= row["p50_ms"]
    snapshot = state(tier.infra)
    assert snapshot["role"] == "active"
    assert snapshot["lease_holder"] == snapshot["infra"]["id"]
    assert snapshot["tier"]["proxies"] == 1  # the tier's one dockpart-proxy reports
    assert snapshot["queues"]["servers"] == rdb.lrange(keys.SERVERS, 0, -1)
    history = tier.infra.http.get(tier.infra.base + "/api/history", timeout=5).json()
    assert len(history["time"]) == len(history["rps"]) == len(history["instances"]) > 0
    assert any(history["per_instance"][first])


def test_the_page_is_drawn_on_the_server(tier, rdb):
    page = tier.infra.http.get(tier.infra.base + "/", headers=HTML, timeout=5)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert f'<td class="url">{tier.url(tier.first)}</td>' in page.text
    assert "holds the lease" in page.text
    assert '<button type="submit">spawn one</button>' in page.text
    for name in ("uPlot.iife.min.js", "uPlot.min.css", "dashboard.js"):
        asset = tier.infra.http.get(f"{tier.infra.base}/static/{name}", timeout=5)
        assert asset.status_code == 200 and len(asset.content) > 500, name
    # Sent as is: requests would remove the "..", and ask for /dashboard.py instead.
    connection = http.client.HTTPConnection(urlsplit(tier.infra.base).netloc, timeout=5)
    connection.request("GET", "/static/../dashboard.py",
                       headers={"Authorization": f"Bearer {tier.infra.token}"})
    assert connection.getresponse().status == 404
    connection.close()


def test_a_form_posted_without_javascript_queues_and_redirects(tier, rdb):
    csrf = state(tier.infra)["csrf"]
    reply = tier.infra.http.post(tier.infra.base + "/api/spawn", data={"csrf": csrf}, headers=HTML,
                          allow_redirects=False, timeout=10)
    assert reply.status_code == 303 and reply.headers["location"] == "../"
    url = tier.url(tier.first + 1)
    wait_for(lambda: url in rdb.lrange(keys.SERVERS, 0, -1), 20, what=f"{url} in servers")
    row = wait_for(lambda: [r for r in state(tier.infra)["instances"] if r["url"] == url
                            and r["state"] == "running"], 10, what="the new row running")[0]
    assert row["id"].startswith("pid ")
    reply = post(tier.infra, "/api/destroy", csrf, data={"url": url})
    assert reply.status_code == 202, reply.text
    wait_for(lambda: url not in {r["url"] for r in state(tier.infra)["instances"]}, 20,
             what=f"{url} gone from the dashboard")


@pytest.mark.parametrize("path, body, code, message", [
    ("/api/destroy", {"url": "http://127.0.0.1:1"}, 404, "is not in servers"),
    ("/api/destroy", {}, 400, "say which instance"),
    ("/api/destroy", {"url": "ftp://x"}, 400, "http://HOST:PORT"),
    ("/api/limits", {"min": "5", "max": "2"}, 400, "1 <= min <= max"),
    ("/api/limits", {"min": "0", "max": "2"}, 400, "1 <= min <= max"),
    ("/api/limits", {"min": "one", "max": "2"}, 400, "whole number"),
    ("/api/nothing", {}, 404, "no page"),
])
def test_bad_input_is_a_4xx_with_a_reason_and_changes_nothing(tier, rdb, path, body, code,
                                                              message):
    before = {key: rdb.lrange(key, 0, -1) for key in (keys.SERVERS, keys.DESTROY_QUEUE)}
    reply = post(tier.infra, path, state(tier.infra)["csrf"], data=body)
    assert reply.status_code == code, reply.text
    assert message in reply.json()["error"]
    assert {key: rdb.lrange(key, 0, -1) for key in before} == before
    assert rdb.hgetall(keys.AUTOSCALE_LIMITS) == {}


def test_the_first_instance_cannot_be_destroyed(tier, rdb):
    reply = post(tier.infra, "/api/destroy", state(tier.infra)["csrf"],
                 json={"url": tier.url(tier.first)})
    assert reply.status_code == 409 and "never destroyed" in reply.json()["error"]
    assert rdb.lrange(keys.DESTROY_QUEUE, 0, -1) == []


def test_a_malformed_json_body_is_refused(tier, rdb):
    reply = post(tier.infra, "/api/limits", state(tier.infra)["csrf"],
                 headers={"Content-Type": "application/json"}, data=b'{"min": 1, "max":')
    assert reply.status_code == 400 and "not JSON" in reply.json()["error"]
    assert rdb.hgetall(keys.AUTOSCALE_LIMITS) == {}


def test_limits_are_written_for_the_autoscaler(tier, rdb):
    reply = post(tier.infra, "/api/limits", state(tier.infra)["csrf"],
                 json={"min": 2, "max": 4})
    assert reply.status_code == 200 and reply.json() == {"min": 2, "max": 4}
    assert rdb.hgetall(keys.AUTOSCALE_LIMITS) == {"min": "2", "max": "4"}
    assert state(tier.infra)["autoscale"]["limits"] == {"min": 2, "max": 4}


@pytest.mark.parametrize("headers, why", [
    ({}, "CSRF token"),
    ({"X-CSRF-Token": "guessed"}, "CSRF token"),
    ({"Origin": "http://evil.example"}, "cross-site"),
    ({"Sec-Fetch-Site": "cross-site"}, "cross-site"),
])
def test_a_post_from_elsewhere_is_refused(tier, rdb, headers, why):
    csrf = state(tier.infra)["csrf"] if "Origin" in headers or "Sec-Fetch-Site" in headers \
        else None
    reply = post(tier.infra, "/api/spawn", csrf, headers=headers)
    assert reply.status_code == 403 and why in reply.json()["error"]
    assert rdb.lrange(keys.SPAWN_QUEUE, 0, -1) == []


def test_an_announced_8_MiB_body_is_413_at_once_before_any_check(tier, rdb):
    """The dashboard read 8 MiB to the end (stalling infra's reactor 1.7-3.4 s) before its
    401/403; now the head alone gets 413, and nothing is queued."""
    host, port = urlsplit(tier.infra.base).netloc.split(":")
    with socket.create_connection((host, int(port)), timeout=3) as s:
        s.sendall(b"POST /api/spawn HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % (8 * 1024 * 1024))
        assert s.recv(4096).startswith(b"HTTP/1.1 413 ")
    assert rdb.llen(keys.SPAWN_QUEUE) == 0
    assert state(tier.infra)["role"] == "active"


def test_a_dead_letter_shows_with_its_reason(tier, rdb):
    rdb.lpush(keys.SPAWN_QUEUE, "http://127.0.0.1:1")
    letters = wait_for(lambda: state(tier.infra)["dead_letters"], 10, what="a dead letter")
    assert letters[0]["entry"] == "http://127.0.0.1:1"
    assert "outside the allowed range" in letters[0]["reason"]


def test_with_a_token_everything_needs_it(tier, rdb):
    base, token = tier.infra.base, tier.infra.token
    page = requests.get(base + "/", headers=HTML, timeout=5)
    assert page.status_code == 401 and 'name="token"' in page.text
    for path in ("/api/state", "/api/history", "/live", "/static/dashboard.js"):
        assert requests.get(base + path, timeout=5).status_code == 401, path
    assert requests.get(base + "/api/state", timeout=5,
                        headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert requests.post(base + "/api/spawn", headers=JSON, timeout=5).status_code == 401
    assert rdb.lrange(keys.SPAWN_QUEUE, 0, -1) == []
    # The header, the query and the login form each let a person in.
    assert requests.get(base + "/api/state", headers={"Authorization": f"Bearer {token}"},
                        timeout=5).json()["role"] == "active"
    assert requests.get(base + f"/api/state?token={token}", timeout=5).status_code == 200
    with requests.Session() as browser:
        bad = browser.post(base + "/login", data={"token": "nope"}, headers=HTML, timeout=5)
        assert bad.status_code == 401 and "not the token" in bad.text
        good = browser.post(base + "/login", data={"token": token}, headers=HTML, timeout=5)
        assert good.status_code == 200 and "holds the lease" in good.text
        csrf = browser.get(base + "/api/state", timeout=5).json()["csrf"]
        reply = browser.post(base + "/api/spawn", headers={**JSON, "X-CSRF-Token": csrf},
                             timeout=10)
        assert reply.status_code == 202, reply.text
    # A script with the token in a header needs no CSRF token: no browser adds it.
    reply = requests.post(base + "/api/limits", headers={"Authorization": f"Bearer {token}"},
                          json={"min": 1, "max": 3}, timeout=10)
    assert reply.status_code == 200, reply.text


def test_a_standby_infra_serves_the_dashboard_read_only(tier, rdb, tmp_path):
    standby = start_dashboard_infra(tier.redis.url, tmp_path / "standby", tier.first,
                                    free_port())
    try:
        snapshot = wait_for(lambda: state(standby).get("role") == "standby"
                            and state(standby), 10, what="the standby's first look")
        assert snapshot["lease_holder"] == state(tier.infra)["infra"]["id"]
        assert tier.url(tier.first) in {row["url"] for row in snapshot["instances"]}
        page = standby.http.get(standby.base + "/", headers=HTML, timeout=5).text
        assert "<b>standby</b>" in page and "spawn one" not in page
        reply = post(standby, "/api/spawn", snapshot["csrf"])
        assert reply.status_code == 409 and "standby" in reply.json()["error"]
        assert rdb.lrange(keys.SPAWN_QUEUE, 0, -1) == []
    finally:
        standby.stop()


def test_the_json_api_is_json(tier, rdb):
    reply = tier.infra.http.get(tier.infra.base + "/api/history?since=nonsense", timeout=5)
    assert reply.status_code == 400 and "since" in reply.json()["error"]
    assert json.loads(tier.infra.http.get(tier.infra.base + "/api/state", timeout=5).text)["csrf"]


def test_the_autoscalers_decisions_and_the_live_deploy_slice_are_shown(tier, rdb):
    decision = {"time": 1700000000.0, "current": 1, "spawning": 0, "inflight": 12,
                "per_instance": 4, "target": 4, "desired": 3, "action": "up",
                "reason": "12 in flight over 1 instance(s), above the target of 4"}
    rdb.lpush(keys.AUTOSCALE_DECISIONS, json.dumps(decision))
    rdb.set(keys.AUTOSCALE_DESIRED, 3)
    rdb.rpush(keys.DEPLOY_LIVE, "http://127.0.0.1:8001")
    auto = wait_for(lambda: state(tier.infra)["autoscale"]["decisions"]
                    and state(tier.infra)["autoscale"], 10, what="the decision")
    assert auto["decisions"] == [decision] and auto["desired"] == 3
    assert state(tier.infra)["deploy"]["live"] == ["http://127.0.0.1:8001"]
    page = tier.infra.http.get(tier.infra.base + "/", headers=HTML, timeout=5).text
    assert "above the target of 4" in page and "http://127.0.0.1:8001" in page


def test_a_built_wheel_ships_the_page_assets_and_uplots_licence(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path),
                    str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("dockpart-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("uPlot.iife.min.js", "uPlot.min.css", "uPlot.LICENSE", "dashboard.js",
                 "dashboard.css"):
        assert f"dockpart/dashboard_static/{name}" in names


def test_while_redis_is_away_the_dashboard_says_so_and_buttons_answer_503(tmp_path):
    tier = start_tier(tmp_path / "state")
    try:
        wait_for(lambda: state(tier.infra)["tier"]["proxies"], 10, what="a first look")
        csrf = state(tier.infra)["csrf"]
        tier.traffic.stop()
        tier.redis.stop()
        snapshot = wait_for(lambda: (s := state(tier.infra))["error"] and s, 15,
                            what="the dashboard to notice")
        assert snapshot["error"].startswith("Redis is unreachable")
        assert tier.url(tier.first) in {row["url"] for row in snapshot["instances"]}
        page = tier.infra.http.get(tier.infra.base + "/", headers=HTML, timeout=5)
        assert page.status_code == 200 and "Redis is unreachable" in page.text
        reply = post(tier.infra, "/api/spawn", csrf)
        assert reply.status_code == 503 and "Redis is unreachable" in reply.json()["error"]
    finally:
        tier.stop()


def test_rows_that_no_daemon_wrote_never_make_the_page_or_the_api_a_500(tier, rdb):
    """Anyone with the Redis password can write them: a dead letter with a NaN time and
    decisions of the wrong shape are shown as not letters, or left out, and said in the log."""
    nan_letter = '{"queue": "spawn", "entry": "http://h:1", "reason": "r", "time": NaN}'
    rdb.lpush(keys.DEAD_LETTERS, nan_letter)
    good = {"time": 1700000000.0, "current": 1, "spawning": 0, "inflight": 12,
            "per_instance": 4, "target": 4, "desired": 3, "action": "up", "reason": "the good one"}
    rdb.lpush(keys.AUTOSCALE_DECISIONS, json.dumps(good), "[1, 2]",
              json.dumps({**good, "time": 1e300, "reason": "far"}),
              json.dumps({**good, "action": {"up": 1}, "reason": "odd"}))
    auto = wait_for(lambda: state(tier.infra)["autoscale"]["decisions"]
                    and state(tier.infra), 10, what="the decisions")
    assert auto["autoscale"]["decisions"] == [good]
    [letter] = auto["dead_letters"]
    assert letter["time"] is None and letter["reason"] == "(not a dead letter infra wrote)"
    page = tier.infra.http.get(tier.infra.base + "/", headers=HTML, timeout=5)
    assert page.status_code == 200 and "the good one" in page.text and "far" not in page.text
    assert "skipping a bad autoscaling decision" in tier.infra.output()


def test_the_dashboard_does_not_start_without_a_token_unless_told_to(tmp_path, monkeypatch):
    """It started open: any local process (a deployed app too) could spawn and destroy."""
    monkeypatch.delenv("DOCKPART_DASHBOARD_TOKEN", raising=False)
    out = subprocess.run([str(BIN / "twistd"), "-n", "--pidfile=", "dockpart-infra",
                          "--driver", "process", "--state-dir", str(tmp_path),
                          "--redis", f"redis://127.0.0.1:{free_port()}/0",
                          "--dashboard", f"tcp:{free_port()}:interface=127.0.0.1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "--dashboard needs a token" in out.stdout + out.stderr
    options = infra.Options()
    options.parseOptions(["--dashboard", "tcp:0", "--dashboard-no-token"])
    assert options["dashboard-token"] is None


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.2:{port}",
                                  "localhost.evil.example:{port}"])
def test_a_foreign_host_header_is_refused_before_anything_else(tier, rdb, host):
    """DNS rebinding: a page of evil.example, its name resolved to 127.0.0.1, got the CSRF
    token (and so the buttons) from a logged-in browser."""
    host = host.format(port=tier.infra.port)
    dash = tier.infra
    # requests sends no cookie once Host is set by hand: the session goes as a header.
    cookie = "; ".join(f"{c.name}={c.value}" for c in dash.http.cookies)
    reply = requests.get(dash.base + "/api/state", headers={**JSON, "Host": host,
                                                            "Cookie": cookie}, timeout=5)
    assert reply.status_code == 403 and "is not this dashboard's" in reply.json()["error"]
    assert "csrf" not in reply.text
    csrf = state(dash)["csrf"]
    reply = requests.post(dash.base + "/api/spawn", timeout=5, headers={
        **JSON, "Host": host, "Cookie": cookie, "X-CSRF-Token": csrf})
    assert reply.status_code == 403
    assert rdb.lrange(keys.SPAWN_QUEUE, 0, -1) == []
    for own in (f"localhost:{dash.port}", f"127.0.0.1:{dash.port}", "localhost",
                f"dashboard.localhost:{dash.port}", f"[::1]:{dash.port}"):
        reply = requests.get(dash.base + "/api/state", timeout=5,
                             headers={**JSON, "Host": own, "Cookie": cookie})
        assert reply.json()["csrf"] == csrf


def test_a_configured_host_name_is_allowed(tier, tmp_path):
    dash = start_dashboard_infra(tier.redis.url, tmp_path / "named", tier.first, free_port(),
                                 "--dashboard-host", "Dash.Example")
    try:
        bearer = {"Authorization": f"Bearer {dash.token}"}
        reply = requests.get(dash.base + "/api/state", timeout=5,
                             headers={**bearer, "Host": f"dash.example:{dash.port}"})
        assert reply.status_code == 200, reply.text
        reply = requests.get(dash.base + "/", headers={**bearer, "Host": "other.example"},
                             timeout=5)
        assert reply.status_code == 403
    finally:
        dash.stop()


def test_each_login_is_its_own_session_and_logout_revokes_it(tier, rdb):
    """The cookie was the same for every login (derived from the token), never expired, and
    worked from any port of the host: an app on another loopback port replayed it."""
    dash = tier.infra
    name = f"dockpart_dashboard_{dash.port}"
    replies = [requests.post(dash.base + "/login", data={"token": dash.token},
                             allow_redirects=False, timeout=5) for _ in range(2)]
    cookies = [r.headers["set-cookie"] for r in replies]
    for cookie in cookies:
        assert cookie.startswith(f"{name}=")
        attributes = {a.strip().partition("=")[0].lower() for a in cookie.split(";")[1:]}
        assert {"httponly", "samesite", "max-age", "path"} <= attributes, cookie
        assert "SameSite=Strict" in cookie
    first, second = (c.split(";")[0].partition("=")[2] for c in cookies)
    assert first != second and len(first) >= 32

    def as_cookie(value, cookie_name=name):
        return requests.get(dash.base + "/api/state", headers={"Cookie": f"{cookie_name}={value}"},
                            timeout=5).status_code
    assert as_cookie(first) == as_cookie(second) == 200
    assert as_cookie(first, "dockpart_dashboard") == 401  # the old name, the port's missing
    assert as_cookie(first, f"dockpart_dashboard_{dash.port + 1}") == 401
    csrf = state(dash)["csrf"]
    out = requests.post(dash.base + "/logout", headers={**JSON, "X-CSRF-Token": csrf,
                                                         "Cookie": f"{name}={first}"}, timeout=5)
    assert out.status_code == 200 and out.json() == {"logged_out": True}
    assert "Max-Age=0" in out.headers["set-cookie"]
    assert as_cookie(first) == 401  # replayed after logout: refused
    assert as_cookie(second) == 200  # the other login is its own


def test_several_tokens_in_one_request_are_a_400(tier, rdb):
    dash = tier.infra
    for path, headers in ((f"/api/state?token=x&token={dash.token}", {}),
                          (f"/api/state?token=x;%74oken={dash.token}", {}),
                          (f"/api/state?token={dash.token}",
                           {"Authorization": f"Bearer {dash.token}"})):
        reply = requests.get(dash.base + path, headers=headers, timeout=5)
        assert reply.status_code == 400 and "one token" in reply.json()["error"], path


def test_spawn_one_and_limits_honour_infras_max_instances(own_redis, tmp_path):
    """With --max-instances 2, the dashboard stored a max of 1000 and spawned past 2."""
    first = free_port()
    dash = start_dashboard_infra(own_redis.url, tmp_path / "state", first, free_port(),
                                 "--autoscale", "--max-instances", "2")
    rdb = own_redis.client()
    try:
        csrf = state(dash)["csrf"]
        wait_for(lambda: state(dash)["role"] == "active", 10, what="the lease")
        reply = post(dash, "/api/limits", csrf, json={"min": 1, "max": 1000})
        assert reply.status_code == 400 and "--max-instances" in reply.json()["error"]
        assert rdb.hgetall(keys.AUTOSCALE_LIMITS) == {}
        codes = [post(dash, "/api/spawn", csrf).status_code for _ in range(3)]
        assert codes == [202, 202, 429], codes
    finally:
        dash.stop()
        stop_managed(tmp_path / "state")


def test_an_apps_scale_button_sets_its_count_and_bad_input_changes_nothing(tier, rdb):
    from dockpart.deploy.cli import main
    url = f"redis://127.0.0.1:{tier.redis.port}/0"
    assert main(["apps", "create", "dash", "--command", "true", "--scale", "0",
                 "--redis", url]) == 0
    try:
        assert main(["apps", "autoscale", "dash", "--min", "0", "--max", "2",
                     "--redis", url]) == 0
        csrf = state(tier.infra)["csrf"]
        for body, code in [({"name": "nope", "count": "1"}, 404),
                           ({"name": "dash", "count": "-1"}, 400),
                           ({"name": "dash", "count": "x"}, 400)]:
            assert post(tier.infra, "/api/apps/scale", csrf, data=body).status_code == code
        assert rdb.hget(keys.app_record("dash"), "autoscale") == "1"
        reply = post(tier.infra, "/api/apps/scale", csrf, data={"name": "dash", "count": "0"})
        assert reply.status_code == 200, reply.text
        assert rdb.hget(keys.app_record("dash"), "autoscale") == "0"
        assert [a["name"] for a in state(tier.infra)["apps"]] == ["dash"]
    finally:
        assert main(["apps", "destroy", "dash", "--redis", url]) == 0
        wait_for(lambda: not rdb.keys("dockpart:app*"), 10, what="dash forgotten")
