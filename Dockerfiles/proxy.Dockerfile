# dockpart-proxy, the round-robin proxy in front of the instances, run by PyPy (Debian's pypy3,
# Python 3.9), on which it answers about twice the requests of CPython (docs/proxy.md).
# scripts/images puts the wheels of its dependencies, built by the host's pypy3 (the same
# Debian package), into .build/wheelhouse/pypy-deps; so the base is Debian bookworm, whose
# pypy3 that is.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl pypy3 pypy3-venv \
    && apt-get clean && rm -rf /var/lib/apt/lists/*
RUN useradd --system --home-dir /nonexistent --shell /usr/sbin/nologin dockpart \
    && pypy3 -m venv /opt/dockpart
ENV PATH=/opt/dockpart/bin:$PATH
# PyPy's GC settings, as scripts/lib.sh sets them for the host's proxy (docs/proxy.md: a lower
# p99 and less CPU per request for about 80 MiB more under load); `-e PYPY_GC_...=` overrides them.
ENV PYPY_GC_NURSERY=16M PYPY_GC_INCREMENT_STEP=1M
COPY .build/wheelhouse/pypy-deps /wheels/deps
RUN pip install --no-cache-dir --no-index /wheels/deps/*.whl
COPY .build/wheelhouse/dockpart /wheels/dockpart
# The package asks for Python 3.11 as a whole; the modules the proxy imports run on 3.9.
# Listing the plugins writes twisted/plugins/dropin.cache now, as root, once.
RUN pip install --no-cache-dir --no-index --no-deps --ignore-requires-python /wheels/dockpart/*.whl \
    && python -c "from twisted.plugin import IPlugin, getPlugins; from twisted import plugins; list(getPlugins(IPlugin, plugins))"
USER dockpart
EXPOSE 3456
# Arguments after the image name replace the default options (docker run ... dockpart-proxy --help).
# By default it listens on loopback only: opening it to a network is a deliberate
# --listen tcp:3456:interface=0.0.0.0 (compose: DOCKPART_PROXY_INTERFACE).
ENTRYPOINT ["twistd", "-n", "--pidfile=", "--logfile=-", "dockpart-proxy"]
CMD ["--listen", "tcp:3456:interface=127.0.0.1", "--health-path", "/", "--health-interval", "1", "--try-timeout", "1", "--retry-safe", "/,/get*,/recent,/listservers,/work"]
