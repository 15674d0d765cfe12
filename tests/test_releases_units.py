"""Releases and pushes in memory: the Procfile's web command, which release a rollback
finds, the environment's words, what an SSH key may run, the hook script."""

import shlex
import sys

import pytest

from dockpart import apps_deploy, releases
from dockpart.apps import BadApp
from dockpart.apps_deploy import AppsDir
from dockpart.releases import BadRelease, Release


@pytest.mark.parametrize("text, command", [
    ("web: python3 app.py\n", "python3 app.py"),
    ("worker: x\nweb:   gunicorn -b :$PORT app  \n", "gunicorn -b :$PORT app"),
    ("web:python3 -c 'print(1)'", "python3 -c 'print(1)'"),
])
def test_the_web_line_of_a_procfile_is_the_command(text, command):
    assert releases.web_command(text) == command


@pytest.mark.parametrize("text", ["", "worker: x\n", "web:\n", "# web: x\n", "webx: y\n"])
def test_a_procfile_without_a_web_command_is_no_release(text):
    with pytest.raises(BadRelease, match="no 'web: COMMAND' line"):
        releases.web_command(text)


FOUND = [Release("v3", commit="c" * 40), Release("v2", commit="b" * 40),
         Release("v1", commit="abcdef" + "0" * 34)]


def test_rollback_finds_the_release_before_the_live_one_or_the_one_named():
    assert releases.find(FOUND, None, "v3").id == "v2"
    assert releases.find(FOUND, None, "v2").id == "v1"
    assert releases.find(FOUND, "1", "v3").id == "v1"
    assert releases.find(FOUND, "abcd", "v3").id == "v1"
    with pytest.raises(BadApp, match="no release before the live one"):
        releases.find(FOUND, None, "v1")
    with pytest.raises(BadApp, match=r"no release 'abc' \(kept: v3, v2, v1\)"):
        releases.find(FOUND, "abc", "v3")  # a commit prefix needs 4 letters


def test_a_release_reads_back_as_written_and_a_bad_record_is_skipped():
    release = Release("v2", "b" * 40, 12.5, command="run", dir="/d", env={"A": "1"},
                      note="push bbbbbbb")
    assert Release.decode(release.encode()) == release
    assert Release.decode("{not json") is None
    assert Release.decode('{"id": "v1", "env": []}') is None
    assert [r.id for r in releases._decode_all(["v1", FOUND[2].encode(), "v9", "junk",
                                                "v3", FOUND[0].encode()])] == ["v3", "v1"]


def test_config_words_are_checked():
    assert releases.parse_env(["A=1", "B=x=y", "C="], ["D"]) == (
        {"A": "1", "B": "x=y", "C": ""}, ["D"])
    for bad in (["A"], ["1A=x"], ["A-B=x"], ["=x"]):
        with pytest.raises(BadApp):
            releases.parse_env(bad)
    with pytest.raises(BadApp):
        releases.parse_env([], ["BAD NAME"])


@pytest.fixture
def repos(tmp_path):
    found = AppsDir(tmp_path)
    found.create("shop", "redis://:secret@127.0.0.1:6379/0")
    return found


@pytest.mark.parametrize("original, argv", [
    ("git-receive-pack '/shop'", ["git-receive-pack", "shop.git"]),
    ("git-receive-pack 'shop.git'", ["git-receive-pack", "shop.git"]),
    ("git-upload-pack '/shop.git'", ["git-upload-pack", "shop.git"]),
])
def test_an_ssh_key_runs_git_on_an_apps_repository(repos, original, argv):
    assert apps_deploy.serve_git(repos, original) == [argv[0],
                                                         str(repos.path / argv[1])]


@pytest.mark.parametrize("original, message", [
    (None, "can only git push"),
    ("", "can only git push"),
    ("sh", "can only git push"),
    ("id; git-receive-pack '/shop'", "can only git push"),
    ("git-receive-pack '/shop' extra", "can only git push"),
    ("git-receive-pack 'unclosed", "can only git push"),
    ("git-upload-archive '/shop'", "can only git push"),
    ("git-receive-pack '/../../etc'", "not a DNS label"),
    ("git-receive-pack '/shop/../blog'", "not a DNS label"),
    ("git-receive-pack '/SHOP;id'", "not a DNS label"),
    ("git-receive-pack '/blog'", "no app named blog"),
])
def test_anything_else_an_ssh_key_asks_is_refused(repos, original, message):
    with pytest.raises(BadApp, match=message):
        apps_deploy.serve_git(repos, original)


def test_a_key_is_added_once_with_a_forced_command_and_no_forwarding(repos):
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIexample you@laptop"
    assert apps_deploy.add_key(repos, key) is True
    assert apps_deploy.add_key(repos, key.replace("you@laptop", "again")) is False
    path = apps_deploy.authorized_keys(repos)
    [line] = path.read_text().splitlines()
    options, rest = line.split('",restrict ', 1)
    assert options.startswith('command="') and rest == key
    command = shlex.split(options[len('command="'):])
    assert command == [sys.executable, "-m", "dockpart", "apps", "serve-git", "--apps-dir",
                       str(repos.path)]
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(BadApp, match="not an OpenSSH public key"):
        apps_deploy.add_key(repos, "-----BEGIN OPENSSH PRIVATE KEY-----")


def test_the_hook_is_private_and_runs_dockpart_apps_hook(repos):
    hook = repos.git_dir("shop") / "hooks" / "pre-receive"
    assert hook.stat().st_mode & 0o777 == 0o700  # it holds the Redis password
    text = hook.read_text()
    assert "export DOCKPART_REDIS=redis://:secret@127.0.0.1:6379/0\n" in text
    assert text.endswith(shlex.join([sys.executable, "-m", "dockpart", "apps", "hook", "shop",
                                     "--apps-dir", str(repos.path)]) + "\n")


def test_removing_an_app_never_reaches_outside_the_apps_directory(tmp_path):
    """Only NAME.git and NAME right in the apps directory go; a symlink is removed, never
    followed, whether it is the app's entry or inside it."""
    found = AppsDir(tmp_path / "apps")
    found.create("shop", "redis://127.0.0.1:6379/0")
    outside = tmp_path / "outside"
    (outside / "keep").mkdir(parents=True)
    (outside / "keep" / "file").write_text("mine")
    release = found.release_dir("shop", "v1")
    release.mkdir(parents=True)
    (release / "link").symlink_to(outside / "keep")
    (found.path / "blog").symlink_to(outside)
    for path in (found.path / ".." / "outside", found.path / "x" / "shop", found.path / "..",
                 outside / "keep", found.path / "Shop_1", found.path / "shop.tar"):
        with pytest.raises(BadApp):
            found.remove(path)
    assert found.remove(found.git_dir("shop")) and found.remove(found.home("shop"))
    assert found.remove(found.path / "blog")
    assert not found.remove(found.home("shop"))
    assert sorted(p.name for p in found.path.iterdir()) == []
    assert (outside / "keep" / "file").read_text() == "mine"


def test_creating_a_name_again_starts_fresh_but_keeps_a_repository_that_is_there(tmp_path):
    """What a destroy could not remove yet goes when the name is created again; an app's
    repository (with its HEAD) stays as it is."""
    found = AppsDir(tmp_path)
    found.release_dir("shop", "v1").mkdir(parents=True)
    (found.git_dir("shop") / "refs" / "heads").mkdir(parents=True)  # a half-removed repository
    (found.git_dir("shop") / "refs" / "heads" / "main").write_text("0" * 40 + "\n")
    found.create("shop", "redis://127.0.0.1:6379/0")
    assert not found.home("shop").exists()
    assert not (found.git_dir("shop") / "refs" / "heads" / "main").exists()
    found.release_dir("shop", "v1").mkdir(parents=True)
    found.create("shop", "redis://127.0.0.1:6379/0")
    assert found.release_dir("shop", "v1").is_dir()


def test_the_default_apps_directory(monkeypatch):
    monkeypatch.delenv("DOCKPART_APPS_DIR")
    monkeypatch.setattr(apps_deploy.os, "geteuid", lambda: 0)
    assert str(apps_deploy.default_apps_dir()) == "/var/lib/dockpart/apps"
    monkeypatch.setattr(apps_deploy.os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_DATA_HOME", "/home/u/.data")
    assert str(apps_deploy.default_apps_dir()) == "/home/u/.data/dockpart/apps"
    monkeypatch.setenv("DOCKPART_APPS_DIR", "/srv/apps")
    assert str(apps_deploy.default_apps_dir()) == "/srv/apps"


def test_old_releases_are_forgotten_with_their_directories_unless_a_kept_one_runs_there(
        redis_db, tmp_path):
    """The live release and the KEEP before it stay; a config release shares its push's
    directory, which stays while either is kept."""
    from dockpart import apps
    from dockpart.deploy.front import Scripts
    client = Scripts(redis_db)
    repos = AppsDir(tmp_path)
    apps.create(client, apps.App("shop"))
    dirs = {}
    for n in range(1, 9):
        rid = releases.next_id(client, "shop")
        shared = n == 3  # v3 is a config change of v2: v2's directory
        path = repos.release_dir("shop", "v2" if shared else rid)
        path.mkdir(parents=True, exist_ok=True)
        dirs[rid] = path
        releases.keep(client, "shop", Release(rid, dir=str(path)))
    apps_deploy._prune(client, "shop", "v2", print)  # rolled back to v2
    kept = [r.id for r in releases.read(client, "shop")]
    assert kept == ["v8", "v7", "v6", "v5", "v4", "v2"]
    assert not dirs["v1"].exists() and dirs["v2"].exists()  # v3's went, v2 still runs there
    assert all(dirs[k].exists() for k in kept)


class LosesSight:
    """A redis-py client whose reads of the roll-over's news fail, as when Redis goes away
    while a push waits."""

    def __init__(self, client):
        self.client = client

    def __getattr__(self, name):
        return getattr(self.client, name)

    def rpop(self, key):
        import redis
        raise redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:6379")


def test_a_wait_that_breaks_once_infra_rolls_over_keeps_the_release(redis_db, tmp_path):
    """Infra rolls over to the release whatever happens to the one waiting: its record stays
    (a forgotten one would leave infra rolling over to, or serving, a release it cannot
    read), and the waiter says the roll-over goes on."""
    from dockpart import apps, keys
    from dockpart.deploy.front import Scripts
    apps.create(Scripts(redis_db), apps.App("shop", command="python3 app.py"))
    redis_db.set(keys.app_tier("shop").lease, "infra")
    said = []
    with pytest.raises(apps_deploy.StillRolling, match="lost sight of the roll-over to v1 "
                       r"\(Error 111.*\); dockpart-infra goes on with it"):
        apps_deploy.configure(AppsDir(tmp_path), LosesSight(redis_db), "shop", {"A": "1"}, [],
                              said.append)
    assert said == ["-----> rolling shop over to v1 (python3 app.py)"]
    assert redis_db.hget(keys.app_record("shop"), "rollover") == "v1"
    assert [r.env for r in releases.read(Scripts(redis_db), "shop")] == [{"A": "1"}]


def test_a_push_that_loses_sight_of_its_rollover_says_it_goes_on_not_that_it_failed(
        redis_db, tmp_path):
    """The pusher's last line: the app may end on either release, so not 'PUSH FAILED, ...
    keeps serving its current release'."""
    from dockpart import apps, keys
    from dockpart.deploy.front import Scripts
    from dockpart.deploy.hook import run_logged
    apps.create(Scripts(redis_db), apps.App("shop", command="python3 app.py"))
    redis_db.set(keys.app_tier("shop").lease, "infra")
    app = apps.read_one(Scripts(redis_db), "shop")
    said = []
    log = tmp_path / "push.log"
    status = run_logged(log, "push to app shop", apps_deploy.FAILED.format(name="shop"),
                        lambda tell: apps_deploy.roll(LosesSight(redis_db), app,
                                                      Release("v1", command="python3 app.py"),
                                                      tell),
                        said.append, expected=apps_deploy.EXPECTED)
    assert status == 1
    assert said[-1] == ("PUSH UNFINISHED, app shop is still rolling over to v1: lost sight of "
                        "the roll-over to v1 (Error 111 connecting to 127.0.0.1:6379); "
                        f"dockpart-infra goes on with it (dockpart apps info shop) (log: {log})")
