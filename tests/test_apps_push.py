"""``git push`` to an app on real parts: a real git push over a local path to the app's
repository, its hook making a release (Procfile, process driver), dockpart-infra rolling the
app's instances over to it, dockpart-proxy routing by Host (real Redis, daemons, sockets)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest

from dashboardkit import managed
from dockpart import keys
from dockpart.apps_deploy import AppsDir
from helpers import ROOT, wait_for
from test_apps import Loop, apps_tier, dockpart_apps, get, serving

HELLO = ROOT / "examples" / "hello"


@pytest.fixture
def tier(own_redis, tmp_path):
    """An infra (process driver, a short health bound) and a proxy on a Redis of its own."""
    yield from apps_tier(own_redis, tmp_path, drain="0.5", spawn_timeout="4")


def git(cwd, *args, check=True) -> subprocess.CompletedProcess:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          check=check)


def source(tmp_path, says: str, procfile: str | None = None):
    """The app's working copy (examples/hello answering ``says``), committed."""
    work = tmp_path / "src"
    if not work.exists():
        work.mkdir()
        shutil.copy(HELLO / "app.py", work / "app.py")
        git(work, "init", "-q", "-b", "main")
    (work / "Procfile").write_text(procfile if procfile is not None
                                   else f"web: {sys.executable} app.py {says}\n")
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", says, "--allow-empty")
    return work


def push(work, remote) -> subprocess.CompletedProcess:
    return git(work, "push", str(remote), "main", check=False)


def create(redis, tmp_path, name: str, *args) -> str:
    apps_dir = tmp_path / "apps"
    assert dockpart_apps(redis.url, "create", name, "--apps-dir", str(apps_dir), *args) == 0
    return str(apps_dir / f"{name}.git")


def info(redis, tmp_path, name: str, capsys) -> dict:
    capsys.readouterr()
    assert dockpart_apps(redis.url, "info", name, "--json",
                         "--apps-dir", str(tmp_path / "apps")) == 0
    return json.loads(capsys.readouterr().out)


def releases_of(redis, tmp_path, name, capsys) -> list[dict]:
    capsys.readouterr()
    assert dockpart_apps(redis.url, "releases", name, "--json") == 0
    return json.loads(capsys.readouterr().out)


def test_push_scale_push_under_load_rollback_and_a_refused_push(tier, tmp_path, capsys):
    """Push v1; scale 2; push v2 under a request loop: no request fails and every answer is
    v2 afterwards, on exactly 2 instances; rollback brings v1 back the same way; a push whose
    app never answers is refused with one line, and v1 keeps serving, nothing of it left."""
    redis, infra, proxy, state = tier
    remote = create(redis, tmp_path, "shop", "--scale", "0")
    described = info(redis, tmp_path, "shop", capsys)
    assert described["remote"] == remote and described["release"] is None

    pushed = push(source(tmp_path, "v1"), remote)
    assert pushed.returncode == 0, pushed.stderr
    assert "shop serves v1" in pushed.stderr
    assert info(redis, tmp_path, "shop", capsys)["release"] == "v1"
    assert dockpart_apps(redis.url, "scale", "shop", "2") == 0
    wait_for(lambda: len(serving(redis, "shop")) == 2, 30, what="2 instances of v1")
    assert get(proxy, "shop.localhost").text.startswith("v1 on port")

    loop = Loop(proxy, "shop.localhost")
    try:
        wait_for(lambda: sum(loop.answers.values()) > 5, 10, what="answers before the push")
        pushed = push(source(tmp_path, "v2"), remote)
        assert pushed.returncode == 0, pushed.stderr
        # Once the push returns, every answer is v2's.
        seen = sum(loop.answers.values())
        wait_for(lambda: sum(loop.answers.values()) > seen + 20, 10, what="answers after")
        after = Loop(proxy, "shop.localhost")
        wait_for(lambda: sum(after.answers.values()) > 20, 10, what="answers of v2")
        after.stop()
    finally:
        loop.stop()
    assert loop.failed == [] and after.failed == []
    assert all(text.startswith("v2 ") for text in after.answers), after.answers
    assert {text.split()[0] for text in loop.answers} == {"v1", "v2"}
    assert len(serving(redis, "shop")) == 2
    for step in ("checking out", "Procfile: web:", "rolling shop over to v2",
                 "answers, and is in the rotation", "leaves the rotation"):
        assert step in pushed.stderr, step
    wait_for(lambda: len(managed(state / "apps" / "shop")) == 2, 20, what="v1 stopped")

    # Rollback: v1 again, rolled over the same way, no request failed.
    capsys.readouterr()
    loop = Loop(proxy, "shop.localhost")
    try:
        assert dockpart_apps(redis.url, "rollback", "shop", "--apps-dir",
                             str(tmp_path / "apps")) == 0
    finally:
        loop.stop()
    assert "shop serves v1" in capsys.readouterr().out
    assert loop.failed == [] and sum(loop.answers.values()) > 0
    assert {get(proxy, "shop.localhost").text.split()[0] for _ in range(6)} == {"v1"}
    listed = releases_of(redis, tmp_path, "shop", capsys)
    assert [(r["id"], r["live"]) for r in listed] == [("v2", False), ("v1", True)]

    # A release whose app never answers is refused; v1 keeps serving, nothing of it runs.
    loop = Loop(proxy, "shop.localhost")
    try:
        pushed = push(source(tmp_path, "v3", f"web: {sys.executable} -c 'import time; "
                                            f"time.sleep(60)'\n"), remote)
    finally:
        loop.stop()
    assert pushed.returncode != 0
    refusal = [line for line in pushed.stderr.splitlines() if "PUSH FAILED" in line]
    assert len(refusal) == 1 and "did not answer HTTP within 4 s" in refusal[0]
    assert "(log: " in refusal[0]
    assert loop.failed == [] and {t.split()[0] for t in loop.answers} == {"v1"}
    assert [r["id"] for r in releases_of(redis, tmp_path, "shop", capsys)] == ["v2", "v1"]
    assert not (tmp_path / "apps" / "shop" / "releases" / "v4").exists()
    wait_for(lambda: len(managed(state / "apps" / "shop")) == 2, 20,
             what="nothing of v3 left running")
    assert len(serving(redis, "shop")) == 2
    assert info(redis, tmp_path, "shop", capsys)["release"] == "v1"


def test_a_procfile_without_web_is_refused_before_anything_runs(tier, tmp_path):
    redis, infra, proxy, state = tier
    remote = create(redis, tmp_path, "blog", "--scale", "0")
    pushed = push(source(tmp_path, "v1", "worker: python3 app.py\n"), remote)
    assert pushed.returncode != 0
    assert ("PUSH FAILED, app blog keeps serving its current release: the Procfile has no "
            "'web: COMMAND' line") in pushed.stderr
    assert redis.client().hget(keys.app_record("blog"), "release") == ""
    assert redis.client().hlen(keys.app_releases("blog")) == 0


def test_an_app_that_exits_at_start_is_refused_without_waiting_for_the_bound(tier, tmp_path):
    redis, infra, proxy, state = tier
    remote = create(redis, tmp_path, "crash", "--scale", "1", "--command",
                    f"{sys.executable} {HELLO / 'app.py'} v0")
    wait_for(lambda: len(serving(redis, "crash")) == 1, 30, what="the first command serving")
    pushed = push(source(tmp_path, "v1", "web: exit 3\n"), remote)
    assert pushed.returncode != 0
    [refusal] = [line for line in pushed.stderr.splitlines() if "PUSH FAILED" in line]
    assert "exited before it answered HTTP; removed it (log: " in refusal
    assert get(proxy, "crash.localhost").text.startswith("v0 on port")
    assert redis.client().hget(keys.app_record("crash"), "release") == ""


def test_config_rolls_over_a_new_release_and_logs_show_the_instances_output(tier, tmp_path,
                                                                             capsys):
    """``config KEY=VALUE`` is a new release with that environment, rolled over; ``logs``
    prints what the instances printed, newest last."""
    redis, infra, proxy, state = tier
    remote = create(redis, tmp_path, "env", "--scale", "1")
    work = source(tmp_path, "v1", f"web: {sys.executable} app.py $GREETING\n")
    assert push(work, remote).returncode == 0
    capsys.readouterr()
    assert dockpart_apps(redis.url, "config", "env", "GREETING=hej", "--apps-dir",
                         str(tmp_path / "apps")) == 0
    assert "env serves v2" in capsys.readouterr().out
    assert get(proxy, "env.localhost").text.startswith("hej on port")
    assert dockpart_apps(redis.url, "config", "env") == 0
    assert capsys.readouterr().out == "GREETING=hej\n"
    [v2, v1] = releases_of(redis, tmp_path, "env", capsys)
    assert (v2["env"], v2["commit"], v2["dir"], v2["live"]) == (
        {"GREETING": "hej"}, v1["commit"], v1["dir"], True)

    port = serving(redis, "env")[0].rsplit(":", 1)[1]

    def logged():
        capsys.readouterr()
        assert dockpart_apps(redis.url, "logs", "env", "-n", "5") == 0
        return capsys.readouterr().out
    wait_for(lambda: f"[{port}] hej listening on 127.0.0.1:{port}" in logged(), 10,
             what="the instance's first line in its logs")
    assert logged().splitlines()[-1] == f"[{port}] hej listening on 127.0.0.1:{port}"


def test_a_second_push_to_the_same_app_waits_for_the_first_with_a_message(tier, tmp_path):
    redis, infra, proxy, state = tier
    remote = create(redis, tmp_path, "queue", "--scale", "0")
    work = source(tmp_path, "v1")
    output = tmp_path / "push.out"
    with AppsDir(tmp_path / "apps").lock("queue", lambda line: None, "a rollback"):
        with open(output, "w") as out:
            second = subprocess.Popen(["git", "push", remote, "main"], cwd=work, stdout=out,
                                      stderr=subprocess.STDOUT)
        wait_for(lambda: "waiting for the push to app queue in progress (a rollback, pid"
                 in output.read_text(), 30, what="the second push to wait")
        assert second.poll() is None
    assert second.wait(60) == 0
    text = output.read_text()
    assert "the previous push to app queue is done; going on" in text
    assert "queue serves v1" in text


def interrupted_push(work, remote, output, env=None) -> int:
    """``git push`` stopped by Ctrl-C once the roll-over has begun: SIGINT to the push's
    process group, as a terminal sends it (git, its transport, and a local push's hook);
    git's exit status."""
    with open(output, "w") as out:
        pusher = subprocess.Popen(["git", "push", str(remote), "main"], cwd=work, stdout=out,
                                  stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_for(lambda: "beside the others" in output.read_text(), 60,
                 what="the roll-over's first new instance")
        os.killpg(pusher.pid, signal.SIGINT)
        return pusher.wait(30)
    finally:
        if pusher.poll() is None:
            os.killpg(pusher.pid, signal.SIGKILL)
            pusher.wait(10)


def finished_after_the_pusher_left(redis, tmp_path, name: str, release: str, capsys) -> None:
    """The roll-over the pusher left went on to its end: ``release`` is live and kept, with
    its directory, on the app's scale, and the hook recorded it in the push's log."""
    record = keys.app_record(name)
    wait_for(lambda: redis.client().hget(record, "release") == release
             and redis.client().hget(record, "rollover") == "", 60,
             what=f"{release} live after the pusher left")
    log = tmp_path / "apps" / name / "push.log"
    wait_for(lambda: f"{name} serves {release}" in log.read_text(), 30,
             what="the hook to see the roll-over's end")
    wait_for(lambda: (tmp_path / "apps" / name / "push.lock").read_text() == "", 30,
             what="the hook to finish")
    listed = releases_of(redis, tmp_path, name, capsys)
    assert [(r["id"], r["live"]) for r in listed][:1] == [(release, True)]
    assert os.path.isdir(listed[0]["dir"])


def test_ctrl_c_during_the_rollover_leaves_it_to_finish_on_the_new_release(tier, tmp_path,
                                                                          capsys):
    """A pusher who presses Ctrl-C once the roll-over has begun does not stop it: infra
    finishes it and the hook (which the terminal's SIGINT reaches too) still records the new
    release, so the app ends wholly on it, with no failed request."""
    redis, infra, proxy, state = tier
    remote = create(redis, tmp_path, "shop", "--scale", "2")
    assert push(source(tmp_path, "v1"), remote).returncode == 0
    wait_for(lambda: len(serving(redis, "shop")) == 2, 30, what="2 instances of v1")
    # A start that takes a second: the Ctrl-C lands while v2's first instance starts.
    work = source(tmp_path, "v2", f"web: sleep 1; exec {sys.executable} app.py v2\n")
    loop = Loop(proxy, "shop.localhost")
    try:
        assert interrupted_push(work, remote, tmp_path / "push.out") != 0
        finished_after_the_pusher_left(redis, tmp_path, "shop", "v2", capsys)
    finally:
        loop.stop()
    assert loop.failed == []
    assert len(serving(redis, "shop")) == 2
    assert {get(proxy, "shop.localhost").text.split()[0] for _ in range(6)} == {"v2"}
    assert "the roll-over goes on" in (tmp_path / "apps" / "shop" / "push.log").read_text()


def test_a_push_to_an_app_at_zero_runs_one_instance_of_it_which_idles_back(tier, tmp_path):
    """A release pushed to an app scaled to zero is proven on one instance (a release that
    cannot serve is refused at the push, not at the next request), and the app goes back to
    zero after its idle window; a request then starts the live release."""
    redis, infra, proxy, state = tier
    remote = create(redis, tmp_path, "nap", "--scale", "0")
    assert dockpart_apps(redis.url, "autoscale", "nap", "--min", "0", "--max", "2",
                         "--scale-to-zero-after", "2") == 0
    pushed = push(source(tmp_path, "v1"), remote)
    assert pushed.returncode == 0, pushed.stderr
    assert "nap is at zero: one instance of v1 starts" in pushed.stderr
    assert "nap serves v1 on 1 instance(s)" in pushed.stderr

    def at_zero():
        return serving(redis, "nap") == [] and managed(state / "apps" / "nap") == {}
    wait_for(at_zero, 30, what="back to zero after the push")
    assert get(proxy, "nap.localhost").text.startswith("v1 on port")  # held, then answered
    wait_for(at_zero, 30, what="back to zero after the request")

    pushed = push(source(tmp_path, "v2", "web: exit 3\n"), remote)
    assert pushed.returncode != 0
    assert "exited before it answered HTTP" in pushed.stderr
    assert redis.client().hget(keys.app_record("nap"), "release") == "v1"
    wait_for(at_zero, 30, what="back to zero after the refused push")
    assert get(proxy, "nap.localhost").text.startswith("v1 on port")


def remote_refs(remote) -> str:
    return subprocess.run(["git", "ls-remote", str(remote)], capture_output=True, text=True,
                          check=True).stdout


def test_destroy_removes_the_repository_and_releases_and_the_name_starts_fresh(
        tier, tmp_path, capsys):
    """Destroy after a push: the repository goes at once, the release directories once infra
    removed the instances that ran from them; a new app of the same name has an empty
    repository, and its first push is its v1, serving the new code."""
    redis, infra, proxy, state = tier
    apps_dir = tmp_path / "apps"
    remote = create(redis, tmp_path, "shop", "--scale", "2")
    assert push(source(tmp_path, "old"), remote).returncode == 0
    wait_for(lambda: len(serving(redis, "shop")) == 2, 30, what="2 instances of the old code")
    capsys.readouterr()
    assert dockpart_apps(redis.url, "destroy", "shop", "--apps-dir", str(apps_dir)) == 0
    said = capsys.readouterr().out.splitlines()
    assert said == [
        "app shop destroyed: its routes are gone; dockpart-infra drains and removes its "
        "instances",
        f"removed its repository {remote}",
        f"waiting for dockpart-infra to drain and remove its instances before removing "
        f"{apps_dir / 'shop'} (the process driver runs them from their release's directory "
        f"there)",
        f"removed {apps_dir / 'shop'} (its releases and push log); the name shop is free again"]
    assert managed(state / "apps" / "shop") == {}
    assert sorted(p.name for p in apps_dir.iterdir()) == []

    assert create(redis, tmp_path, "shop", "--scale", "1") == remote
    assert remote_refs(remote) == ""
    wait_for(lambda: redis.client().exists(keys.app_tier("shop").lease), 10,
             what="infra working the new app")
    pushed = push(source(tmp_path, "new"), remote)
    assert pushed.returncode == 0, pushed.stderr
    assert "rolling shop over to v1" in pushed.stderr
    assert get(proxy, "shop.localhost").text.startswith("new on port")
    assert [(r["id"], r["live"]) for r in releases_of(redis, tmp_path, "shop", capsys)] == [
        ("v1", True)]
    assert sorted(p.name for p in (apps_dir / "shop" / "releases").iterdir()) == ["v1"]


def test_a_push_waiting_when_its_app_is_destroyed_fails_and_leaves_nothing(tier, tmp_path,
                                                                           capsys):
    """A push whose hook waits for the app's lock (here held by the test) while the app is
    destroyed is refused, whichever of the two goes first once the lock is free, and no
    repository, release or record of it is left."""
    redis, infra, proxy, state = tier
    apps_dir = AppsDir(tmp_path / "apps")
    remote = create(redis, tmp_path, "shop", "--scale", "0")
    output = tmp_path / "push.out"
    with apps_dir.lock("shop", lambda line: None, "a rollback"):
        with open(output, "w") as out:
            pusher = subprocess.Popen(["git", "push", remote, "main"],
                                      cwd=source(tmp_path, "v1"), stdout=out,
                                      stderr=subprocess.STDOUT)
        wait_for(lambda: "waiting for the push to app shop in progress" in output.read_text(),
                 30, what="the push to wait")
        destroyer = threading.Thread(target=lambda: dockpart_apps(
            redis.url, "destroy", "shop", "--apps-dir", str(apps_dir.path)))
        destroyer.start()
        wait_for(lambda: not redis.client().sismember(keys.APPS, "shop"), 10,
                 what="the app destroyed")
    destroyer.join(60)
    assert pusher.wait(60) != 0
    [refusal] = [line for line in output.read_text().splitlines() if "PUSH FAILED" in line]
    assert "app shop was destroyed while this push waited" in refusal or (
        "no app named shop" in refusal), refusal
    assert not destroyer.is_alive()
    assert "the name shop is free again" in capsys.readouterr().out
    assert sorted(p.name for p in apps_dir.path.iterdir()) == []
    assert redis.client().keys("dockpart:app:shop*") == []
