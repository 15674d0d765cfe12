// dockpart dashboard: swaps in the server-drawn tables each second, posts the buttons,
// and draws the last 15 minutes with uPlot.  Without this script the page still works.
"use strict";
(function () {
  var POLL_MS = 1000, WINDOW_S = 15 * 60;
  var csrf = document.querySelector('meta[name="dashboard-csrf"]').content;
  var live = document.getElementById("live");
  var notice = document.getElementById("notice");
  var hist = {time: [], rps: [], p95_ms: [], instances: [], per: {}, events: []};
  var charts = {};
  var since = 0;
  var stale = false;  // the notice says the last poll failed
  window.dashboard = {charts: charts, history: hist};

  function say(text, bad) {
    stale = false;
    notice.textContent = text;
    notice.className = bad ? "bad" : "ok";
  }

  function get(path, kind) {
    return fetch(path, {headers: {Accept: kind}, credentials: "same-origin"}).then(function (r) {
      if (r.status === 401) { location.reload(); throw new Error("logged out"); }
      if (!r.ok) { throw new Error(path + ": HTTP " + r.status); }
      return kind === "application/json" ? r.json() : r.text();
    });
  }

  function append(chunk) {
    var n = chunk.time.length, old = hist.time.length;
    if (!n) { return; }
    ["time", "rps", "p95_ms", "instances"].forEach(function (k) {
      Array.prototype.push.apply(hist[k], chunk[k]);
    });
    Object.keys(chunk.per_instance).forEach(function (url) {
      if (!hist.per[url]) { hist.per[url] = new Array(old).fill(null); }
    });
    Object.keys(hist.per).forEach(function (url) {
      var more = chunk.per_instance[url] || new Array(n).fill(null);
      Array.prototype.push.apply(hist.per[url], more);
    });
    Array.prototype.push.apply(hist.events, chunk.events);
    since = chunk.time[n - 1];
    var cut = 0, oldest = since - WINDOW_S;
    while (cut < hist.time.length && hist.time[cut] < oldest) { cut++; }
    if (cut) {
      ["time", "rps", "p95_ms", "instances"].forEach(function (k) { hist[k].splice(0, cut); });
      Object.keys(hist.per).forEach(function (url) { hist.per[url].splice(0, cut); });
      hist.events = hist.events.filter(function (e) { return e.time >= oldest; });
    }
  }

  function width(id) {
    return Math.max(300, document.getElementById(id).clientWidth - 10);
  }

  function marks(u) {
    var ctx = u.ctx, top = u.bbox.top, bottom = u.bbox.top + u.bbox.height;
    hist.events.forEach(function (e) {
      var x = u.valToPos(e.time, "x", true);
      if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) { return; }
      ctx.save();
      ctx.strokeStyle = ctx.fillStyle = e.kind === "spawn" ? "#2a8a2a" : "#c0392b";
      ctx.setLineDash([4, 4]);
      ctx.beginPath(); ctx.moveTo(x, top); ctx.lineTo(x, bottom); ctx.stroke();
      ctx.font = "12px sans-serif";
      ctx.fillText(e.kind === "spawn" ? "\u25B2" : "\u25BC", x - 5, top + 12);
      ctx.restore();
    });
  }

  var PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                 "#7f7f7f", "#bcbd22", "#17becf"];

  function make(id, series, axes, hooks) {
    var el = document.getElementById(id);
    var opts = {width: width(id), height: 180, series: [{}].concat(series),
                axes: [{}].concat(axes), scales: {x: {time: true}}, hooks: hooks || {}};
    return new uPlot(opts, null, el);
  }

  function draw() {
    if (!charts.tier) {
      charts.tier = make("chart-tier",
        [{label: "req/s", stroke: "#1f77b4", scale: "rps"},
         {label: "p95 ms", stroke: "#d62728", scale: "ms"}],
        [{scale: "rps", label: "req/s"}, {scale: "ms", side: 1, label: "ms",
          grid: {show: false}}]);
      charts.instances = make("chart-instances",
        [{label: "instances", stroke: "#2a8a2a", paths: uPlot.paths.stepped({align: 1})}],
        [{label: "in servers"}], {draw: [marks]});
    }
    charts.tier.setData([hist.time, hist.rps, hist.p95_ms]);
    charts.instances.setData([hist.time, hist.instances]);
    var urls = Object.keys(hist.per);
    if (!charts.per || charts.perKey !== urls.join(" ")) {
      if (charts.per) { charts.per.destroy(); }
      charts.per = make("chart-per-instance", urls.map(function (url, i) {
        return {label: url.replace(/^http:\/\//, ""), stroke: PALETTE[i % PALETTE.length]};
      }), [{label: "req/s"}]);
      charts.perKey = urls.join(" ");
    }
    charts.per.setData([hist.time].concat(urls.map(function (u) { return hist.per[u]; })));
  }

  // What a person typed in the page's inputs survives the swap of the tables each second.
  // A form's hidden fields (but its csrf) say what it acts on: each app's scale form is its own.
  var edits = {};
  function field(input) {
    var what = Array.prototype.map.call(
      input.form.querySelectorAll('input[type="hidden"]:not([name="csrf"])'),
      function (hidden) { return hidden.name + "=" + hidden.value; });
    return [input.form.className].concat(what, [input.name]).join(" ");
  }
  live.addEventListener("input", function (event) {
    if (event.target.form) { edits[field(event.target)] = event.target.value; }
  });

  function swap(html) {
    // The box a person is typing in keeps the keyboard: its new copy takes the focus.
    var active = document.activeElement;
    var typing = live.contains(active) && active.form && active.name ? field(active) : null;
    live.innerHTML = html;
    live.querySelectorAll("form input[name]").forEach(function (input) {
      var key = field(input);
      if (Object.prototype.hasOwnProperty.call(edits, key)) { input.value = edits[key]; }
      if (key === typing) { input.focus(); }
    });
  }

  var polling = null;  // one poll at a time: two would append the same history twice

  function poll() {
    if (document.hidden) { return Promise.resolve(); }  // a background tab costs nothing
    if (!polling) { polling = pollOnce().then(function () { polling = null; }); }
    return polling;
  }

  function pollOnce() {
    return Promise.all([
      get("live", "text/html").then(swap),
      get("api/history?since=" + since, "application/json").then(function (chunk) {
        append(chunk);
        draw();
      })
    ]).then(function () {
      if (stale) { say("", false); }
    }, function (e) { say("Not updated: " + e.message, true); stale = true; });
  }

  document.addEventListener("visibilitychange", poll);

  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (!form.classList.contains("action")) { return; }
    event.preventDefault();
    var body = new URLSearchParams(new FormData(form));
    form.querySelectorAll("input[name]").forEach(function (input) { delete edits[field(input)]; });
    fetch(form.getAttribute("action"), {
      method: "POST", body: body, credentials: "same-origin",
      headers: {Accept: "application/json", "X-CSRF-Token": csrf}
    }).then(function (r) {
      return r.json().then(function (answer) {
        if (r.ok) {
          say(answer.queued ? answer.queued + " queued: " + answer.url
              : answer.app ? answer.app + " scaled to " + answer.desired
              : "limits set: min " + answer.min + ", max " + answer.max, false);
        } else {
          say(answer.error || ("HTTP " + r.status), true);
        }
      });
    }).catch(function (e) { say(e.message, true); }).then(function () {
      return (polling || Promise.resolve()).then(poll);  // a poll begun after the action
    });
  });

  window.addEventListener("resize", function () {
    Object.keys(charts).forEach(function (k) {
      var c = charts[k];
      if (c && c.setSize) { c.setSize({width: width(c.root.parentNode.id), height: 180}); }
    });
  });

  poll();
  setInterval(poll, POLL_MS);
})();
