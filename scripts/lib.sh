# Shared set-up steps for scripts/up, scripts/test and .ci/run.  Each step is idempotent
# and quick when already done; slow results are cached outside the checkout.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${DOCKPART_CACHE:-/var/cache/dockpart}
VENV=${DOCKPART_VENV:-$ROOT/.venv}
DEBIAN_PACKAGES=(redis-server socat netcat-openbsd docker.io git debootstrap curl docker-registry chromium openssh-server openssh-client)

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

ensure_packages() {
    local missing=()
    for p in "${DEBIAN_PACKAGES[@]}" "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    say "installing Debian packages: ${missing[*]}"
    [ "$(id -u)" = 0 ] || { echo "need root to apt-get install ${missing[*]}" >&2; return 1; }
    DEBIAN_FRONTEND=noninteractive apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}

ensure_venv() {
    mkdir -p "$CACHE/pip"
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating the virtualenv $VENV"
        python3 -m venv "$VENV"
    fi
    local stamp="$VENV/.dockpart-installed"
    if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
        say "installing dockpart and its test extras into $VENV"
        PIP_CACHE_DIR="$CACHE/pip" "$VENV/bin/pip" install -q --upgrade pip
        # compat mode: twistd only finds twisted/plugins of a flat layout this way.
        PIP_CACHE_DIR="$CACHE/pip" "$VENV/bin/pip" install -q -e "$ROOT[test]" \
            --config-settings editable_mode=compat
        touch "$stamp"
    fi
}

# dockpart-proxy on PyPy (Debian's pypy3, Python 3.9) runs about twice as fast as on CPython
# (bench/bench_proxy.py).  Its virtualenv holds what the proxy and its tests import, not the
# package: dockpart needs 3.11 as a whole, so a .pth file puts this checkout on the path.
PYPY_VENV=${DOCKPART_PYPY_VENV:-$ROOT/.venv-pypy}
# PyPy's GC settings for the proxy (and every PyPy process these scripts start: CPython ignores
# them).  A 16M nursery instead of PyPy's few MiB makes minor collections rarer, which costs
# about 80 MiB under load and buys a lower p99 and less CPU per request; a 1M increment step
# makes each step of a major collection's marking short, which halves the p99 again for no
# more memory (docs/proxy.md, bench_pypy_gc.py).  Every PYPY_GC_* set here is what ships: the
# proxy image sets the same (Dockerfiles/proxy.Dockerfile) and the tests read them from here;
# yours win.
export PYPY_GC_NURSERY=${PYPY_GC_NURSERY:-16M}
export PYPY_GC_INCREMENT_STEP=${PYPY_GC_INCREMENT_STEP:-1M}
# PYPY_PROXY_REQUIREMENTS is what the proxy runs with (the proxy image's PyPy wheelhouse too).
PYPY_PROXY_REQUIREMENTS=("twisted>=23.10,<27")
PYPY_REQUIREMENTS=("${PYPY_PROXY_REQUIREMENTS[@]}" "pytest>=8" "pytest-twisted>=1.14"
                   "hypothesis>=6.100" "requests>=2.31" "redis>=5" "docker>=7.0")

ensure_pypy_venv() {
    ensure_packages pypy3 pypy3-venv || return 1
    mkdir -p "$CACHE/pip"
    if [ ! -x "$PYPY_VENV/bin/python" ]; then
        say "creating the PyPy virtualenv $PYPY_VENV"
        pypy3 -m venv "$PYPY_VENV" || return 1
    fi
    local stamp="$PYPY_VENV/.dockpart-installed"
    if [ ! -f "$stamp" ] || [ "${BASH_SOURCE[0]}" -nt "$stamp" ]; then
        say "installing the proxy's dependencies into $PYPY_VENV"
        PIP_CACHE_DIR="$CACHE/pip" "$PYPY_VENV/bin/pip" install -q "${PYPY_REQUIREMENTS[@]}" \
            || return 1
        local site
        site=$("$PYPY_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        echo "$ROOT" >"$site/dockpart-checkout.pth"  # dockpart and twisted/plugins, for twistd
        touch "$stamp"
    fi
}

# The twistd that runs dockpart-proxy: PyPy's unless DOCKPART_PROXY_PYTHON=cpython or PyPy
# cannot be set up here (then CPython's, and the output says so).
proxy_twistd() {
    if [ "${DOCKPART_PROXY_PYTHON:-pypy}" != cpython ] && ensure_pypy_venv >&2; then
        say "dockpart-proxy runs on PyPy ($PYPY_VENV)"
        echo "$PYPY_VENV/bin/twistd"
    else
        say "dockpart-proxy runs on CPython ($VENV): PyPy is $( [ "${DOCKPART_PROXY_PYTHON:-}" = cpython ] && echo "turned off by DOCKPART_PROXY_PYTHON=cpython" || echo "not available here")"
        echo "$VENV/bin/twistd"
    fi
}

docker_up() { timeout 5 docker info >/dev/null 2>&1; }

ensure_dockerd() {
    docker_up && return 0
    command -v dockerd >/dev/null || { echo "dockerd is not installed" >&2; return 1; }
    say "starting dockerd (log: /var/log/dockpart-dockerd.log)"
    # No iptables here (see shared/MACHINE.md); every container uses host networking.
    nohup dockerd --iptables=false >/var/log/dockpart-dockerd.log 2>&1 &
    for _ in $(seq 60); do docker_up && return 0; sleep 1; done
    echo "dockerd did not answer within 60 s; its log:" >&2
    tail -20 /var/log/dockpart-dockerd.log >&2
    return 1
}
