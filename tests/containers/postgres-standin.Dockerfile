# A stand-in for the CPU overlay's `postgres:16.4-bookworm` where no registry is reachable (this
# machine, CI): Debian bookworm's PostgreSQL 15 with the official image's contract as the overlay
# uses it: user postgres with uid/gid 999, POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB / PGDATA
# honoured at first start, pg_isready on PATH, the server in the foreground on 0.0.0.0:5432.
# Built by `scripts/build-images.sh --postgres-standin` (context: this folder) and put in place of
# the registry image by tests/podman_kube.py; never part of a deployment.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
# uid/gid 999 first, so the package's postgres user takes them (the manifest runs as 999).
RUN groupadd --gid 999 postgres \
 && useradd --uid 999 --gid 999 --home-dir /var/lib/postgresql --shell /bin/bash postgres \
 && apt-get update \
 && apt-get install -y --no-install-recommends postgresql-15 \
 && rm -rf /var/lib/apt/lists/*
ENV PATH=/usr/lib/postgresql/15/bin:$PATH
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
USER 999:999
EXPOSE 5432
ENTRYPOINT ["sh", "/usr/local/bin/postgres-entrypoint.sh"]
