# dockpart-web, the course's web app.  Build it with scripts/images, which puts the wheelhouse
# (dockpart and its dependencies, built on the host) into .build/wheelhouse.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
RUN command -v curl >/dev/null || (apt-get update \
    && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/*)
RUN useradd --system --home-dir /nonexistent --shell /usr/sbin/nologin dockpart \
    && python3 -m venv /opt/dockpart
ENV PATH=/opt/dockpart/bin:$PATH
# Dependencies first: a code change rebuilds only the layers from the dockpart wheel on.
COPY .build/wheelhouse/deps /wheels/deps
RUN pip install --no-cache-dir --no-index /wheels/deps/*.whl
COPY .build/wheelhouse/dockpart /wheels/dockpart
# Listing the plugins writes twisted/plugins/dropin.cache now, as root, once.
RUN pip install --no-cache-dir --no-index --no-deps /wheels/dockpart/*.whl \
    && python -c "from twisted.plugin import IPlugin, getPlugins; from twisted import plugins; list(getPlugins(IPlugin, plugins))"
USER dockpart
# As in the seed: the instance's port, set at build time or per container (-e start_port=3001).
ARG start_port=3000
ENV start_port=$start_port
EXPOSE $start_port
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s CMD curl -fsS -o /dev/null "http://127.0.0.1:$start_port/"
# Arguments after the image name are dockpart-web's options (docker run ... dockpart-web --help).
ENTRYPOINT ["twistd", "-n", "--pidfile=", "--logfile=-", "dockpart-web"]
