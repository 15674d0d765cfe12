# Redis for dockpart, built like the seed's: a base image with redis-server installed.
# The official image works as well: `image: redis:7` in docker-compose.yml (see docs/running.md, Images).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
# The local base image has redis-server already; a public base gets it over apt.
RUN command -v redis-server >/dev/null || (apt-get update \
    && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/*)
# The tier's state (servers, the spawn/destroy queues, dead letters, the lease) lives here:
# mount a volume on it (compose does) so that it outlives the container.
RUN mkdir -p /data && chown redis:redis /data
VOLUME /data
WORKDIR /data
USER redis
# Host networking: Redis listens on loopback only.  Persistence: an append-only file, fsynced
# every second (a crash loses at most the last second of writes); no RDB snapshots besides.
# A password is required: REDISCLI_AUTH (the variable redis-cli reads too, so the healthcheck
# needs nothing more; compose sets it from DOCKPART_REDIS_PASSWORD).  It reaches redis-server
# as configuration on stdin, not as an argument that `ps` would show.
ENTRYPOINT ["sh", "-c", "[ -n \"$REDISCLI_AUTH\" ] || { echo 'dockpart-redis: set a password in REDISCLI_AUTH (compose: DOCKPART_REDIS_PASSWORD); refusing to run without one' >&2; exit 64; }\nexec redis-server - --bind 127.0.0.1 --dir /data --save '' --appendonly yes --appendfsync everysec \"$@\" <<EOF\nrequirepass $REDISCLI_AUTH\nEOF", "dockpart-redis"]
CMD ["--port", "6379"]
