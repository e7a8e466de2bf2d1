# finnstream container image: `docker build -t finnstream .`
#
# Two stages. `build` resolves nothing: it installs the pinned runtime set (requirements.lock)
# into /opt/venv, then the package itself with --no-deps, trims what never runs, and compiles
# the bytecode once (the root filesystem is read-only at run time). `runtime` copies only that
# virtualenv, which has no pip, no setuptools and none of the demo's moto and Flask.
# Python matches the lock's interpreter (3.11). PYTHON_IMAGE may name any Debian-based image
# with python (and venv) on PATH; `make test-container` uses one built from Debian packages.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

# pip gets a virtualenv of its own that stays in this stage; the runtime one never has pip.
RUN python -m venv /opt/pip \
 && python -m venv --without-pip /opt/venv

WORKDIR /src

# Behind a proxy with its own CA, pass the host's trusted CAs as the build secret `ca_bundle`
# (`--secret id=ca_bundle,src=/etc/ssl/certs/ca-certificates.crt`): it is mounted for these RUN
# steps only, so it is in no layer. Without it pip uses its own CA bundle.
# Dependencies first: this layer is rebuilt only when the lock changes, not on every code edit.
COPY requirements.lock ./
RUN --mount=type=secret,id=ca_bundle \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
 && /opt/pip/bin/pip --python /opt/venv/bin/python install --no-compile -r requirements.lock

COPY pyproject.toml README.md ./
COPY finnstream ./finnstream
RUN --mount=type=secret,id=ca_bundle \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
 && /opt/pip/bin/pip --python /opt/venv/bin/python install --no-compile --no-deps .

# What never runs: the packages' own test suites (pandas and numpy ship 60 MB of them), and
# botocore's models for the 400-odd AWS services finnstream never calls. Kept: the two it calls
# and the ones botocore's credential chain may call (assume-role and web identity: sts; SSO:
# sso, sso-oidc; `aws login`: signin). Then every module is compiled once, with hash-based pycs
# that are never re-validated: nothing can change the sources of a read-only image.
ARG BOTOCORE_SERVICES="kinesis secretsmanager sts sso sso-oidc signin"
RUN site="$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" \
 && find "$site" -type d -name tests -prune -exec rm -rf {} + \
 && for dir in "$site"/botocore/data/*/; do \
        service="$(basename "$dir")"; \
        case " $BOTOCORE_SERVICES " in *" $service "*) ;; *) rm -rf "$dir" ;; esac; \
    done \
 && /opt/venv/bin/python -m compileall -q -j 0 --invalidation-mode unchecked-hash /opt/venv


FROM ${PYTHON_IMAGE} AS runtime

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH \
    FINNSTREAM_CONFIG=/app/config/finnstream.yaml

RUN groupadd --system --gid 10001 finnstream \
 && useradd --system --uid 10001 --gid finnstream --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin finnstream \
 && mkdir -p /var/lib/finnstream/spool \
 && chown -R 10001:10001 /var/lib/finnstream

COPY --from=build /opt/venv /opt/venv

WORKDIR /app
COPY config/finnstream.yaml config/finnstream.yaml

USER 10001:10001

# The spool (undelivered records and the gap ledger) outlives the container, and is the only
# place finnstream writes: the image runs with a read-only root filesystem (ECS
# ReadonlyRootFilesystem). Declared after the chown so a fresh named volume, and Fargate's
# task-storage mount at this exact path, start out owned by the finnstream user.
VOLUME /var/lib/finnstream/spool

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
