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
