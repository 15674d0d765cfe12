"""The dashboard's HTML, drawn on the server: every table works without JavaScript.

The page's script only fetches :func:`live_html` again each second and swaps it in, and
draws the charts; the tables have this one renderer.
"""

import time
from html import escape

STATES_OK = {"running", "external", "listed"}


def _text(value) -> str:
    return "–" if value is None else escape(str(value))


def _when(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "–"
    return time.strftime("%H:%M:%S", time.localtime(seconds))


def _table(cls: str, headers: list[str], rows: list[str], empty: str) -> str:
    if not rows:
        return f'<p class="empty {cls}">{escape(empty)}</p>'
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    return (f'<table class="{cls}"><thead><tr>{head}</tr></thead>\n<tbody>\n'
            + "\n".join(rows) + "\n</tbody></table>")


def _form(action: str, csrf: str, label: str, fields: str = "", cls: str = "") -> str:
    return (f'<form class="action {cls}" method="post" action="{action}">'
            f'<input type="hidden" name="csrf" value="{escape(csrf)}">{fields}'
            f'<button type="submit">{escape(label)}</button></form>')


def _release_html(app: dict) -> str:
    """The live release (and the one being rolled over to), its history folded below."""
    if not app.get("releases"):
        return "–"
    live = escape(app.get("release") or "–")
    rolling = f' → <b>{escape(app["rollover"])}</b>' if app.get("rollover") else ""
    rows = "".join(f'<li{" class=live" if r["live"] else ""}>{escape(r["id"])} '
                   f'{escape(r["commit"] or "")} {_when(r["when"])} {escape(r["note"])}</li>'
                   for r in app["releases"])
    return (f'<details class="releases"><summary>{live}{rolling}</summary>'
            f'<ol>{rows}</ol></details>')


def _apps_html(found: list[dict], csrf: str, writable: bool) -> str:
    """The apps (dockpart apps): scale, figures, instances, and a scale form each."""
    rows = []
    for app in found:
        auto = app["autoscale"]
        scale = (f'autoscaled {auto["min"]}-{auto["max"]} at {auto["target"]:g} in flight'
                 if auto else "fixed")
        if auto and auto.get("scale_to_zero_after"):
            scale += f', to zero after {auto["scale_to_zero_after"]:g} s idle'
            if not app["instances"]:
                scale += ' <strong class="zero">at zero</strong>'
        if app.get("held"):
            scale += f', {app["held"]} held'
        if app.get("activations"):
            scale += ", started from zero in " + " ".join(
                f"{s:.2f}" for s in app["activations"]) + " s"
        form = ""
        if writable:
            form = _form("api/apps/scale", csrf, "scale",
                         f'<input type="hidden" name="name" value="{escape(app["name"])}">'
                         f'<input name="count" type="number" min="0" size="3" '
                         f'value="{app["desired"]}" aria-label="instances of '
                         f'{escape(app["name"])}"> ', "scale")
        instances = " ".join(f'{escape(i["url"])} ({_text(i["rps"])} req/s, {i["health"]})'
                             for i in app["instances"]) or "–"
        rows.append(f'<tr data-app="{escape(app["name"])}"><td>{escape(app["name"])}</td>'
                    f'<td>{escape(" ".join(app["domains"])) or "–"}</td>'
                    f'<td>{len(app["instances"])} / {app["desired"]}</td><td>{scale}</td>'
                    f'<td>{_release_html(app)}</td>'
                    f'<td>{_text(app["rps"])}</td><td>{_text(app["p95_ms"])}</td>'
                    f'<td class="instances">{instances}</td><td>{form}</td></tr>')
    return "<h2>Apps</h2>" + _table(
        "apps", ["app", "domains", "instances / desired", "scale", "release", "req/s", "p95 ms",
                 "instances", ""], rows, "No app (dockpart apps create NAME ...).")


def _instance_row(row: dict, csrf: str, writable: bool) -> str:
    url = row["url"]
    destroy = ""
    if writable and row["in_servers"] and not row["first"] and row["state"] != "draining":
        destroy = _form("api/destroy", csrf, "destroy",
                        f'<input type="hidden" name="url" value="{escape(url)}">', "destroy")
    state_cls = "ok" if row["state"] in STATES_OK else "busy"
    health_cls = {"healthy": "ok", "down": "bad"}.get(row["health"], "")
    return (f'<tr data-url="{escape(url)}"><td class="url">{escape(url)}</td>'
            f'<td class="state {state_cls}">{escape(row["state"])}</td>'
            f'<td>{_text(row["id"])}{" on " + escape(row["node"]) if row.get("node") else ""}</td>'
            f'<td class="health {health_cls}">{escape(row["health"])}</td>'
            f'<td class="num">{_text(row["rps"])}</td><td class="num">{_text(row["p50_ms"])}</td>'
            f'<td class="num">{_text(row["p95_ms"])}</td><td class="num">{_text(row["errors"])}</td>'
            f'<td class="num">{_text(row["inflight"])}</td><td>{destroy}</td></tr>')


def live_html(snapshot: dict, csrf: str) -> str:
    """Everything on the page that changes: the status line, the tables and the buttons."""
    if snapshot.get("time") is None:
        return f'<p class="error">{escape(snapshot.get("error") or "")}</p>'
    writable = snapshot.get("role") == "active"
    parts = []
    if snapshot.get("error"):
        parts.append(f'<p class="error" role="alert">{escape(snapshot["error"])} '
                     f'(figures of {_when(snapshot["time"])})</p>')
    infra = snapshot["infra"]
    if writable:
        parts.append(f'<p class="role active">This infra ({escape(infra["id"])}, driver '
                     f'{escape(infra["driver"])}) holds the lease and works the queues.</p>')
    else:
        parts.append(f'<p class="role standby">This is the <b>standby</b> infra '
                     f'({escape(infra["id"])}): read-only. The lease holder '
                     f'<b>{_text(snapshot["lease_holder"])}</b> works the queues.</p>')
    if infra.get("driver_error"):
        parts.append(f'<p class="error">The driver did not answer: '
                     f'{escape(infra["driver_error"])}</p>')
    tier = snapshot["tier"]
    parts.append(f'<p class="summary"><span id="tier-instances">{tier["instances"]}</span> '
                 f'instance(s) in servers · {_text(tier["rps"])} req/s · '
                 f'p95 {_text(tier["p95_ms"])} ms · {_text(tier["errors"])} errors/s · '
                 f'{tier["proxies"]} proxy report(s) · updated {_when(snapshot["time"])}</p>')

    rows = [_instance_row(row, csrf, writable)
            for row in snapshot["instances"]]
    buttons = ""
    if writable:
        buttons = _form("api/spawn", csrf, "spawn one", cls="spawn")
    parts.append('<h2>Instances</h2>' + buttons + _table(
        "instances", ["URL", "state", "id", "health (proxies)", "req/s", "p50 ms", "p95 ms",
                      "errors/s", "in flight", ""], rows, "No instance is known."))

    parts.append(_apps_html(snapshot.get("apps", []), csrf, writable))

    queues = snapshot["queues"]
    queue_rows = [f'<tr><td>{escape(name)}</td><td>{escape(" ".join(queues[name])) or "–"}</td></tr>'
                  for name in ("spawn_queue", "spawning", "destroy_queue", "destroying")]
    parts.append("<h2>Queues</h2>" + _table("queues", ["list", "URLs"], queue_rows, ""))

    letters = [f'<tr><td>{_when(l.get("time"))}</td><td>{_text(l.get("queue"))}</td>'
               f'<td>{_text(l.get("entry"))}</td><td class="reason">{_text(l.get("reason"))}</td></tr>'
               for l in snapshot["dead_letters"]]
    parts.append("<h2>Dead letters</h2>" + _table(
        "dead-letters", ["time", "queue", "entry", "reason"], letters, "No dead letter."))

    auto = snapshot["autoscale"]
    limits = auto["limits"]
    decisions = [f'<tr><td>{_when(d.get("time"))}</td><td>{_text(d.get("action"))}</td>'
                 f'<td>{_text(d.get("current"))} → {_text(d.get("desired"))}</td>'
                 f'<td>{_text(d.get("inflight"))}</td><td>{_text(d.get("reason"))}</td></tr>'
                 for d in auto["decisions"]]  # decoded by dockpart.records: well-formed
    limit_form = ""
    if writable:
        limit_form = _form(
            "api/limits", csrf, "set min/max",
            f'<label>min <input name="min" type="number" min="1" size="4" '
            f'value="{_text(limits.get("min", ""))}"></label> '
            f'<label>max <input name="max" type="number" min="1" size="4" '
            f'value="{_text(limits.get("max", ""))}"></label> ', "limits")
    parts.append(f'<h2>Autoscaling</h2><p>desired: {_text(auto["desired"])} · '
                 f'min {_text(limits.get("min"))} · max {_text(limits.get("max"))} '
                 f'(unset: the autoscaler\'s options)</p>' + limit_form + _table(
                     "decisions", ["time", "action", "instances", "in flight", "reason"],
                     decisions, "No autoscaling decision yet."))

    live = snapshot["deploy"]["live"]
    parts.append("<h2>Deploy</h2>" + (
        f'<p class="deploy">Live slice: <b>{escape(" ".join(live))}</b></p>' if live
        else '<p class="deploy empty">No <code>dockpart deploy</code> route in this Redis.</p>'))
    return "\n".join(parts)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="dashboard-csrf" content="{csrf}">
<link rel="icon" href="data:,">
<title>dockpart dashboard</title>
<link rel="stylesheet" href="static/uPlot.min.css">
<link rel="stylesheet" href="static/dashboard.css">
</head><body>
<h1>dockpart tier</h1>
{logout}<p id="notice" role="status"></p>
<section id="charts">
<div class="chart" id="chart-tier"><h2>Requests/s and p95 (tier)</h2></div>
<div class="chart" id="chart-instances"><h2>Instances (▲ spawn, ▼ destroy)</h2></div>
<div class="chart" id="chart-per-instance"><h2>Requests/s per instance</h2></div>
<noscript><p>The charts need JavaScript; the tables below do not
(reload the page for new figures).</p></noscript>
</section>
<main id="live">
{live}
</main>
<script src="static/uPlot.iife.min.js"></script>
<script src="static/dashboard.js"></script>
</body></html>
"""


def page_html(snapshot: dict, csrf: str, logout: bool = False) -> str:
    """The whole page; with ``logout``, a button that ends the session (a token is set)."""
    button = (f'<form class="logout" method="post" action="logout">'
              f'<input type="hidden" name="csrf" value="{escape(csrf)}">'
              f'<button type="submit">log out</button></form>\n' if logout else "")
    return PAGE.format(csrf=escape(csrf), live=live_html(snapshot, csrf), logout=button)


def message_html(title: str, text: str) -> str:
    """A page for a person whose browser posted a form (no JavaScript) and got an error."""
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<title>{escape(title)}</title></head>\n<body><h1>{escape(title)}</h1>\n'
            f'<p>{escape(text)}</p>\n<p><a href="./">Back to the dashboard</a></p></body></html>\n')


def login_html(error: str = "") -> str:
    said = f'<p class="error">{escape(error)}</p>' if error else ""
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<link rel="icon" href="data:,"><title>dockpart dashboard: token</title></head>\n<body><h1>dockpart dashboard</h1>\n'
            f'{said}<form method="post" action="login"><label>Token '
            f'<input name="token" type="password" autofocus></label> '
            f'<button type="submit">open</button></form>\n'
            f'<p>Started with <code>--dashboard-token</code>; <code>scripts/up</code> keeps it in '
            f'<code>dashboard.env</code> beside the Redis password.</p>'
            f'</body></html>\n')
