"""``dockpart apps``: the records it writes, its validation, its output (real Redis)."""

import json
import subprocess

import pytest

from dockpart import apps, keys
from dockpart.deploy import front
from dockpart.deploy.cli import main
from dockpart.redisconn import RedisAddress
from helpers import BIN


def dockpart(redis_server, capsys, *args):
    code = main(["apps", *args, "--redis", redis_server.url])
    out, err = capsys.readouterr()
    return code, out, err


def test_create_writes_the_record_and_announces_it(redis_db, redis_server, capsys):
    notices = redis_db.pubsub()
    notices.subscribe(keys.APPS_CHANNEL)
    notices.get_message(timeout=1)
    code, out, _ = dockpart(redis_server, capsys, "create", "shop", "--command", "python3 a.py",
                           "--domain", "Shop.Example.com")
    assert code == 0, out
    assert redis_db.smembers(keys.APPS) == {"shop"}
    record = redis_db.hgetall(keys.app_record("shop"))
    assert record["command"] == "python3 a.py"
    assert record["domains"] == "shop.example.com"
    assert record["desired"] == "1"
    assert notices.get_message(timeout=2)["data"] == "create shop"


def test_info_json_lists_instances_and_scale_changes(redis_db, redis_server, capsys):
    dockpart(redis_server, capsys, "create", "blog", "--image", "blog:1")
    redis_db.rpush(keys.app_tier("blog").servers, "http://127.0.0.1:20000")
    assert dockpart(redis_server, capsys, "scale", "blog", "3")[0] == 0
    code, out, _ = dockpart(redis_server, capsys, "info", "blog", "--json")
    info = json.loads(out)
    assert code == 0
    assert info["instances"] == ["http://127.0.0.1:20000"]
    assert info["desired"] == 3 and info["autoscale"] is None and info["image"] == "blog:1"
    assert dockpart(redis_server, capsys, "autoscale", "blog", "--min", "2", "--max", "5",
                    "--target", "8")[0] == 0
    info = json.loads(dockpart(redis_server, capsys, "info", "blog", "--json")[1])
    assert info["autoscale"] == {"min": 2, "max": 5, "target": 8.0}
    listed = json.loads(dockpart(redis_server, capsys, "list", "--json")[1])
    assert [a["name"] for a in listed] == ["blog"]
    assert "blog" in dockpart(redis_server, capsys, "list")[1]


@pytest.mark.parametrize("name", ["Shop", "shop-", "shop_1", "a" * 64, "shop.x", ""])
def test_a_name_that_is_no_dns_label_is_a_usage_error_that_changes_nothing(
        redis_db, redis_server, capsys, name):
    code, _, err = dockpart(redis_server, capsys, "create", name, "--command", "true")
    assert code == 2
    assert "DNS label" in err
    assert redis_db.keys("*") == []


@pytest.mark.parametrize("args, message", [
    (["create", "a", "--image", "x", "--command", "y"], "not both"),
    (["create", "a", "--command", "y", "--domain", "bad_host"], "not a host name"),
    (["scale", "a", "many"], "number of instances"),
])
def test_bad_arguments_are_usage_errors(redis_db, redis_server, capsys, args, message):
    code, _, err = dockpart(redis_server, capsys, *args)
    assert code == 2 and message in err
    assert redis_db.keys("*") == []


def test_taken_names_and_domains_and_unknown_apps_are_refused(redis_db, redis_server, capsys):
    dockpart(redis_server, capsys, "create", "a", "--command", "x", "--domain", "a.test")
    code, _, err = dockpart(redis_server, capsys, "create", "a", "--command", "x")
    assert code == 1 and "exists already" in err
    code, _, err = dockpart(redis_server, capsys, "create", "b", "--command", "x",
                            "--domain", "a.test")
    assert code == 1 and "belongs to app a" in err
    assert redis_db.smembers(keys.APPS) == {"a"}
    code, _, err = dockpart(redis_server, capsys, "scale", "nope", "2")
    assert code == 1 and "no app named nope" in err


def test_destroy_drops_the_route_at_once_and_leaves_the_instances_to_infra(
        redis_db, redis_server, capsys):
    dockpart(redis_server, capsys, "create", "a", "--command", "x")
    code, out, _ = dockpart(redis_server, capsys, "destroy", "a")
    assert code == 0 and "destroyed" in out
    assert redis_db.smembers(keys.APPS) == set()
    assert redis_db.smembers(keys.APPS_DESTROYED) == {"a"}
    assert redis_db.hget(keys.app_record("a"), "desired") == "0"
    # Its name is free again only once infra forgot it.
    assert dockpart(redis_server, capsys, "create", "a", "--command", "x")[0] == 1
    with front.connected(RedisAddress.parse(redis_server.url), 2) as client:
        apps.forget(front.Scripts(client), "a")
    assert redis_db.smembers(keys.APPS_DESTROYED) == set()
    assert dockpart(redis_server, capsys, "create", "a", "--command", "x")[0] == 0


def test_destroy_without_infra_keeps_the_releases_which_the_next_create_removes(
        redis_db, redis_server, capsys, apps_dir):
    """The repository goes at once; with no infra to remove the instances, the directory
    they may run from stays, said so, until the name is created again (once infra forgot
    the app)."""
    dockpart(redis_server, capsys, "create", "a", "--command", "x")
    (apps_dir / "a" / "releases" / "v1").mkdir(parents=True)  # as a push leaves it
    code, out, _ = dockpart(redis_server, capsys, "destroy", "a")
    assert code == 0
    assert out.splitlines()[1:] == [
        f"removed its repository {apps_dir / 'a.git'}",
        f"no dockpart-infra works app a now: {apps_dir / 'a'} stays until one has removed its "
        f"instances; 'dockpart apps create a' then removes it"]
    assert sorted(p.name for p in apps_dir.iterdir()) == ["a"]
    with front.connected(RedisAddress.parse(redis_server.url), 2) as client:
        apps.forget(front.Scripts(client), "a")
    assert dockpart(redis_server, capsys, "create", "a", "--command", "x")[0] == 0
    assert sorted(p.name for p in apps_dir.iterdir()) == ["a.git"]


def test_ports_are_allocated_once_across_apps(redis_db, redis_server):
    with front.connected(RedisAddress.parse(redis_server.url), 2) as client:
        scripts = front.Scripts(client)
        first = apps.allocate(scripts, "a", 20000, 20003, "127.0.0.1", 2)
        second = apps.allocate(scripts, "b", 20000, 20003, "127.0.0.1", 3)
        assert first == ["http://127.0.0.1:20000", "http://127.0.0.1:20001"]
        assert second == ["http://127.0.0.1:20002", "http://127.0.0.1:20003"]  # range full
        apps.release_ports(scripts, "b", [20000, 20002])  # 20000 is a's: kept
    assert redis_db.hgetall(keys.APP_PORTS) == {"20000": "a", "20001": "a", "20003": "b"}
    assert redis_db.lrange(keys.app_tier("a").spawn_queue, 0, -1) == first[::-1]


def test_the_console_script_runs_apps(redis_db, redis_server):
    result = subprocess.run([str(BIN / "dockpart"), "apps", "list", "--redis", redis_server.url],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "no apps" in result.stdout


def test_a_record_that_does_not_parse_keeps_defaults():
    app = apps.App.decode("x", ["desired", "many", "max", "-3", "target", "2.5", "domains", "a b"])
    assert (app.desired, app.max, app.target, app.domains) == (1, apps.DEFAULT_MAX, 2.5,
                                                               ("a", "b"))


def test_info_of_an_app_that_waits_for_its_first_push_says_so(redis_db, redis_server, capsys):
    dockpart(redis_server, capsys, "create", "shop")
    code, out, _ = dockpart(redis_server, capsys, "info", "shop")
    assert code == 0
    assert "runs      its pushed releases (git push)\n" in out


def test_following_the_logs_ends_quietly_on_ctrl_c(redis_db, redis_server, capsys):
    import signal
    dockpart(redis_server, capsys, "create", "shop", "--command", "python3 a.py")
    redis_db.xadd(keys.app_log("shop"), {"port": 20000, "line": "shop listening"})
    follow = subprocess.Popen([str(BIN / "dockpart"), "apps", "logs", "shop", "-f", "--redis",
                               redis_server.url], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert follow.stdout.readline() == "[20000] shop listening\n"
        follow.send_signal(signal.SIGINT)
        out, err = follow.communicate(timeout=20)
    finally:
        follow.kill()
    assert (follow.returncode, err) == (0, "")


def test_autoscale_to_zero_is_written_shown_and_needs_min_0(redis_db, redis_server, capsys):
    dockpart(redis_server, capsys, "create", "nap", "--command", "true")
    code, _, err = dockpart(redis_server, capsys, "autoscale", "nap", "--min", "1",
                            "--scale-to-zero-after", "30")
    assert code == 1 and "--scale-to-zero-after needs --min 0" in err
    assert redis_db.hget(keys.app_record("nap"), "autoscale") == "0"  # nothing changed
    code, out, _ = dockpart(redis_server, capsys, "autoscale", "nap", "--min", "0", "--max", "3",
                            "--scale-to-zero-after", "30")
    assert code == 0 and "to zero after 30 s without a request" in out
    info = json.loads(dockpart(redis_server, capsys, "info", "nap", "--json")[1])
    assert info["autoscale"] == {"min": 0, "max": 3, "target": 4.0, "scale_to_zero_after": 30.0}
    assert info["desired"] == 1  # running instances stay until the idle window passes
    assert "scale     autoscaled 0-3 at 4 in flight each, to zero after 30 s idle (now 1)\n" \
        in dockpart(redis_server, capsys, "info", "nap")[1]
