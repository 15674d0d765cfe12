"""The dashboard's routes in memory (treq's StubTreq against the Dashboard resource): access,
CSRF and Origin checks, dispatch, assets and bad input, none of which needs Redis or a daemon.
The buttons' effects on a real tier are in test_dashboard.py."""

import json
from types import SimpleNamespace

import pytest
from treq.testing import StubTreq
from twisted.internet.task import Clock

from dockpart.dashboard import COOKIE, MAX_BODY, STATIC, Dashboard
from dockpart.dashboard_state import TierWatch

TOKEN = "s3cret-token"
BASE = "http://127.0.0.1:8080/"


def dashboard(token=None, role="standby"):
    """A Dashboard whose watch has not looked at Redis; ``role`` as its last look said."""
    worker = SimpleNamespace(driver=SimpleNamespace(name="process"), id="me",
                             rules=SimpleNamespace(host="127.0.0.1", first_port=3000))
    watch = TierWatch(None, worker, interval=1.0, reactor=Clock())
    watch.snapshot = {**watch.snapshot, "role": role, "lease_holder": "other"}
    return Dashboard(watch, token)


def fetch(resource, method, path, **kwargs):
    """(response, body) of one request, all in memory."""
    client = StubTreq(resource)
    answers = []
    client.request(method, BASE + path, allow_redirects=False, **kwargs).addBoth(answers.append)
    client.flush()
    [response] = answers
    body = []
    client.content(response).addBoth(body.append)
    client.flush()
    return response, body[0]


def header(response, name):
    values = response.headers.getRawHeaders(name)
    return values[0] if values else None


def test_every_answer_forbids_framing_sniffing_and_caching():
    response, _ = fetch(dashboard(), "GET", "api/state")
    assert header(response, "x-frame-options") == "DENY"
    assert header(response, "x-content-type-options") == "nosniff"
    assert header(response, "cache-control") == "no-store"


def test_state_is_the_last_look_and_the_csrf_token():
    resource = dashboard()
    response, body = fetch(resource, "GET", "api/state")
    state = json.loads(body)
    assert response.code == 200 and header(response, "content-type") == "application/json"
    assert state["csrf"] == resource.csrf
    assert state["role"] == "standby" and state["instances"] == []


def test_an_unknown_path_is_404_and_a_known_one_with_another_method_405():
    response, body = fetch(dashboard(), "GET", "api/nothing")
    assert response.code == 404 and json.loads(body) == {"error": "no page at /api/nothing"}
    response, body = fetch(dashboard(), "GET", "api/spawn")
    assert response.code == 405 and "POST" in json.loads(body)["error"]


def test_head_is_answered_as_get_without_a_body():
    response, body = fetch(dashboard(), "HEAD", "api/state")
    assert response.code == 200 and body == b""


def test_static_assets_are_served_with_their_type_and_unknown_ones_are_404():
    response, body = fetch(dashboard(), "GET", "static/dashboard.js")
    assert response.code == 200 and body == (STATIC / "dashboard.js").read_bytes()
    assert header(response, "content-type") == "text/javascript; charset=utf-8"
    assert header(response, "cache-control") == "max-age=3600"
    response, _ = fetch(dashboard(), "GET", "static/../dashboard.py")
    assert response.code == 404


def test_history_with_a_since_that_is_not_a_number_is_400():
    response, body = fetch(dashboard(), "GET", "api/history?since=yesterday")
    assert response.code == 400 and "since" in json.loads(body)["error"]


@pytest.mark.parametrize("headers", [
    {},                                                # a program without the CSRF token
    {"Origin": ["http://evil.example"]},               # another site's page
    {"Origin": ["null"]},                              # a sandboxed frame or a file
    {"Sec-Fetch-Site": ["cross-site"]},                # the browser says so
])
def test_a_post_without_the_csrf_token_or_from_another_site_is_refused(headers):
    response, body = fetch(dashboard(role="active"), "POST", "api/spawn", headers=headers)
    assert response.code == 403, body


def test_a_post_with_the_csrf_token_passes_the_check():
    """Past the check, a standby refuses the button itself (409): nothing reached Redis."""
    resource = dashboard()
    response, body = fetch(resource, "POST", "api/spawn",
                           headers={"X-CSRF-Token": [resource.csrf],
                                    "Origin": ["http://127.0.0.1:8080"]})
    assert response.code == 409 and "standby" in json.loads(body)["error"]


@pytest.mark.parametrize("body, code", [
    (b"[1, 2]", 400),                  # JSON, but not an object
    (b"{not json", 400),
    (b"{" + b" " * MAX_BODY + b"}", 413),
])
def test_a_bad_json_body_is_refused_before_anything_is_done(body, code):
    resource = dashboard(role="active")
    response, answer = fetch(resource, "POST", "api/limits", data=body,
                             headers={"Content-Type": ["application/json"],
                                      "X-CSRF-Token": [resource.csrf]})
    assert response.code == code, answer
    assert "error" in json.loads(answer)


def test_with_a_token_a_program_needs_it_and_a_browser_gets_the_login_form():
    response, body = fetch(dashboard(TOKEN), "GET", "api/state")
    assert response.code == 401 and "token" in json.loads(body)["error"]
    response, body = fetch(dashboard(TOKEN), "GET", "", headers={"Accept": ["text/html"]})
    assert response.code == 401 and b'<form method="post" action="login">' in body
    response, _ = fetch(dashboard(TOKEN), "GET", "static/dashboard.css")
    assert response.code == 401  # assets too
    response, _ = fetch(dashboard(TOKEN), "GET", "api/state",
                        headers={"Authorization": ["Bearer wrong"]})
    assert response.code == 401


def test_the_token_in_a_header_or_the_query_lets_in_and_the_query_sets_the_cookie():
    resource = dashboard(TOKEN)
    response, _ = fetch(resource, "GET", "api/state",
                        headers={"Authorization": [f"Bearer {TOKEN}"]})
    assert response.code == 200 and header(response, "set-cookie") is None
    response, _ = fetch(resource, "GET", f"api/state?token={TOKEN}")
    cookie = header(response, "set-cookie")
    assert response.code == 200
    assert cookie.startswith(f"{COOKIE}8080=")  # named after the dashboard's port
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    session = cookie.split(";")[0]
    response, _ = fetch(resource, "GET", "api/state", headers={"Cookie": [session]})
    assert response.code == 200
    assert TOKEN not in session  # a random session, not the token


def test_login_sets_the_cookie_for_the_right_token_only():
    resource = dashboard(TOKEN)
    form = {"Content-Type": ["application/x-www-form-urlencoded"]}
    response, body = fetch(resource, "POST", "login", data=b"token=wrong", headers=form)
    assert response.code == 401 and b"That is not the token." in body
    response, _ = fetch(resource, "POST", "login", data=f"token={TOKEN}".encode(), headers=form)
    assert response.code == 303 and header(response, "location") == "./"
    assert header(response, "set-cookie").startswith(f"{COOKIE}8080=")
    response, _ = fetch(resource, "POST", "login", data=f"token={TOKEN}".encode(),
                        headers={**form, "Origin": ["http://evil.example"]})
    assert response.code == 403  # no login forced on from another site


def test_without_a_token_login_sends_to_the_page():
    response, _ = fetch(dashboard(), "GET", "login")
    assert response.code == 303 and header(response, "location") == "./"
