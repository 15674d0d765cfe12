# dockpart-fileio, the seed's File IO pair in one image: `dockpart-writer` (the default: rewrites
# /data/random and serves it on port 7000 with our listener, or with the real socat when
# DOCKPART_SERVE=socat) and `dockpart-fileweb` (port 8000).  Built like web.Dockerfile (same
# layers up to the dockpart wheel, so the images share them).
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
# The real socat, for DOCKPART_SERVE=socat (the local base image has it already).
RUN command -v socat >/dev/null || (apt-get update \
    && apt-get install -y --no-install-recommends socat \
    && rm -rf /var/lib/apt/lists/*)
RUN mkdir /data && chown dockpart /data
WORKDIR /data
USER dockpart
EXPOSE 7000 8000
# The plugin and its options follow the image name: docker run ... dockpart-fileio dockpart-fileweb
# --source tcp:127.0.0.1:7000.  Alone, it runs the writer with the seed's file, port and pace,
# listening on loopback only (host networking; --listen tcp:7000 opens it).
ENTRYPOINT ["twistd", "-n", "--pidfile=", "--logfile=-"]
CMD ["dockpart-writer", "--listen", "tcp:7000:interface=127.0.0.1"]
