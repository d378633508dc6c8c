# mirrord as a container: the same `mirrord run` as under systemd.
#
# Configuration: environment variables MIRRORD_<SECTION>__<KEY> (lists and tables as JSON), and/or a
# TOML file mounted at /etc/mirrord/mirrord.toml (or wherever MIRRORD_CONFIG points). Secrets come from
# files (`*_file` keys pointing at mounted secrets, e.g. /run/secrets/...) or the environment.
# State (database, Fragalysis mirror, PDIS spool, token cache) lives on the volume /var/lib/mirrord.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MIRRORD_DAEMON__STATE_DIR=/var/lib/mirrord \
    MIRRORD_WEB__LISTEN=0.0.0.0 \
    MIRRORD_WEB__PORT=8787 \
    MIRRORD_LOG__FORMAT=json

# A fixed, unprivileged uid, so volume permissions can be prepared on the host. The mirror directory
# exists in the image so a volume mounted there (to share the mirror) starts out owned by mirrord.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/mirrord --shell /usr/sbin/nologin mirrord \
    && mkdir -p /var/lib/mirrord/mirror /etc/mirrord \
    && chown -R mirrord:mirrord /var/lib/mirrord

WORKDIR /src
COPY pyproject.toml README.md ./
COPY mirrord ./mirrord
COPY migrations ./migrations
# The postgres extra lets replicas share one PostgreSQL; SQLite on the volume needs nothing more.
RUN pip install --no-cache-dir ".[postgres]" \
    && rm -rf /src
WORKDIR /var/lib/mirrord

VOLUME ["/var/lib/mirrord"]
EXPOSE 8787
USER mirrord

# No curl in the slim image: ask /healthz (never behind the bearer token) with Python itself.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('MIRRORD_WEB__PORT', '8787'), timeout=4)"]

# Exec form: mirrord is PID 1 and receives SIGTERM itself, so it drains running jobs before exiting.
STOPSIGNAL SIGTERM
CMD ["mirrord", "run"]
