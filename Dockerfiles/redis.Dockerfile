# Redis for dockpart, built like the seed's: a base image with redis-server installed.
# The official image works as well: `image: redis:7` in docker-compose.yml (see README, Images).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
# The local base image has redis-server already; a public base gets it over apt.
RUN command -v redis-server >/dev/null || (apt-get update \
    && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/*)
WORKDIR /var/lib/redis
USER redis
# Host networking: Redis listens on loopback only; a cache, so nothing is written to disk.
ENTRYPOINT ["redis-server", "--bind", "127.0.0.1", "--protected-mode", "no", "--save", "", "--appendonly", "no"]
CMD ["--port", "6379"]
