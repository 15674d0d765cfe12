"""dockpart-web's pages in a real (headless) Chromium, as a person's browser renders them."""

import http.client
import shutil
import subprocess
import tempfile

import pytest
import requests

from helpers import png_bytes, start_web

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def rendered_dom(url: str) -> str:
    """The page's DOM after Chromium has parsed it and run its scripts."""
    exe = shutil.which("chromium")
    assert exe, "chromium is not installed (apt-get install chromium)"
    with tempfile.TemporaryDirectory() as profile:
        out = subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def web(redis_server):
    daemon = start_web(redis_server.url)
    yield daemon
    daemon.stop()


def test_a_hostile_url_in_recent_stays_text(web, redis_db):
    conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=10)
    conn.request("GET", "/<script>document.title='pwned'</script>")
    conn.getresponse().read()
    conn.close()
    dom = rendered_dom(web.base + "/recent")
    assert "<title>Recently visited</title>" in dom
    assert "pwned</title>" not in dom
    assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;" in dom


def test_meow_shows_the_uploaded_image(web, redis_db):
    r = requests.post(web.base + "/upload", files={"image": ("cat.png", png_bytes())}, timeout=10)
    assert r.status_code == 201
    dom = rendered_dom(web.base + "/meow")
    assert '<img src="data:image/png;base64,iVBORw0KGgo' in dom
    assert "The image queue is empty" in rendered_dom(web.base + "/meow")
