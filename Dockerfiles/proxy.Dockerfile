# dockpart-proxy, the round-robin proxy in front of the instances.  Built like web.Dockerfile
# (same layers up to the last few, so the two images share them).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
RUN command -v curl >/dev/null || (apt-get update \
    && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/*)
RUN useradd --system --home-dir /nonexistent --shell /usr/sbin/nologin dockpart \
    && python3 -m venv /opt/dockpart
ENV PATH=/opt/dockpart/bin:$PATH
COPY .build/wheelhouse/deps /wheels/deps
RUN pip install --no-cache-dir --no-index /wheels/deps/*.whl
COPY .build/wheelhouse/dockpart /wheels/dockpart
RUN pip install --no-cache-dir --no-index --no-deps /wheels/dockpart/*.whl \
    && python -c "from twisted.plugin import IPlugin, getPlugins; from twisted import plugins; list(getPlugins(IPlugin, plugins))"
USER dockpart
EXPOSE 3456
# Arguments after the image name replace the default options (docker run ... dockpart-proxy --help).
# By default it listens on loopback only: opening it to a network is a deliberate
# --listen tcp:3456:interface=0.0.0.0 (compose: DOCKPART_PROXY_INTERFACE).
ENTRYPOINT ["twistd", "-n", "--pidfile=", "--logfile=-", "dockpart-proxy"]
CMD ["--listen", "tcp:3456:interface=127.0.0.1", "--health-path", "/", "--health-interval", "1", "--try-timeout", "1", "--retry-safe", "/,/get*,/recent,/listservers,/work"]
