# dockpart-infra, the daemon that starts and removes web app containers through the Docker
# socket (compose's `infra` profile mounts it).  Whoever reaches that socket controls the host,
# so this image holds only what infra needs: Python, dockpart and its dependencies from the
# wheelhouse (built on the host by scripts/images); no curl, git or compilers are added.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
RUN useradd --system --home-dir /nonexistent --shell /usr/sbin/nologin dockpart \
    && python3 -m venv /opt/dockpart
ENV PATH=/opt/dockpart/bin:$PATH
COPY .build/wheelhouse/deps /wheels/deps
RUN pip install --no-cache-dir --no-index /wheels/deps/*.whl
COPY .build/wheelhouse/dockpart /wheels/dockpart
RUN pip install --no-cache-dir --no-index --no-deps /wheels/dockpart/*.whl \
    && python -c "from twisted.plugin import IPlugin, getPlugins; from twisted import plugins; list(getPlugins(IPlugin, plugins))"
# Non-root unless the socket's owner is needed: compose runs it as root, for the socket.
USER dockpart
# Arguments after the image name are dockpart-infra's options (docker run ... dockpart-infra --help).
ENTRYPOINT ["twistd", "-n", "--pidfile=", "--logfile=-", "dockpart-infra"]
CMD ["--driver", "docker", "--image", "dockpart-web:latest"]
