# finnstream container image: `docker build -t finnstream .`
#
# Two stages: `build` resolves nothing, it installs the pinned set (requirements.lock, generated
# from the package's runtime dependencies) into a virtualenv, then the package itself with
# --no-deps; `runtime` copies only that virtualenv. Python matches the lock's interpreter (3.11).

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

WORKDIR /src

# Dependencies first: this layer is rebuilt only when the lock changes, not on every code edit.
COPY requirements.lock ./
RUN pip install --no-cache-dir -r requirements.lock

COPY pyproject.toml README.md ./
COPY finnstream ./finnstream
RUN pip install --no-cache-dir --no-deps .


FROM ${PYTHON_IMAGE} AS runtime

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH \
    FINNSTREAM_CONFIG=/app/config/finnstream.yaml

RUN groupadd --system --gid 10001 finnstream \
 && useradd --system --uid 10001 --gid finnstream --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin finnstream \
 && mkdir -p /var/lib/finnstream/spool \
 && chown -R 10001:10001 /var/lib/finnstream \
 && chown 10001:10001 /tmp

COPY --from=build /opt/venv /opt/venv

WORKDIR /app
COPY config/finnstream.yaml config/finnstream.yaml

USER 10001:10001

# The spool (undelivered records and the gap ledger) outlives the container. Declared after the
# chown so a fresh named volume, and Fargate's task-storage mount at this exact path, start out
# owned by the finnstream user. /tmp too (sqlite's and Python's temporary files): on ECS the root
# file system is read-only, and Fargate gives a mount the owner of the image's VOLUME path (root
# and 0755 otherwise), so the daemon can write there. On EFS (deploy/cloudformation.yaml) the
# spool's owner comes from the access point instead.
VOLUME ["/var/lib/finnstream/spool", "/tmp"]

# Health endpoint (health.port). A container run with FINNSTREAM_HEALTH__PORT=0 has no endpoint:
# run it with --no-healthcheck (compose: `healthcheck: {disable: true}`).
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4).status == 200 else 1)"]

# The daemon drains and flushes on SIGTERM; give it the grace (compose stop_grace_period,
# ECS stopTimeout) to do so.
STOPSIGNAL SIGTERM
ENTRYPOINT ["finnstream"]
CMD ["run"]
