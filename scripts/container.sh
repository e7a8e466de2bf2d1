#!/usr/bin/env bash
# The container test tier (`make test-container`): the image built and run by a real engine.
#
#  1. installs the engine if it is missing: Debian's podman with runc, and mmdebstrap (apt, root);
#  2. points podman at .venv-container/containers.conf: what this sandbox's kernel allows
#     (explicit ulimits; runc, as crun refuses its cgroup mode), kept out of the Dockerfile;
#  3. builds the stand-in base once (cached): no registry is reachable, so the official python
#     image cannot be pulled; mmdebstrap builds one from Debian bookworm packages (python3 3.11,
#     as requirements.lock wants), passed to the Dockerfile as PYTHON_IMAGE;
#  4. builds the image (layer cache), with the host's CAs as the build secret `ca_bundle`;
#  5. starts LocalStack 4.14.0 on 127.0.0.1:4566 (scripts/localstack.sh) and podman's
#     Docker-compatible API socket, for Compose;
#  6. runs `pytest -m container tests/container` (extra arguments go to pytest);
#  7. stops LocalStack and the API service on exit, whatever happened.
#
# Environment: PYTHON_IMAGE (a python base to use instead of the stand-in, e.g. the official
# python:3.11.14-slim-bookworm where a registry is reachable), FINNSTREAM_BUILD_CA (the CA bundle
# passed as the build secret; default: the host's, when it exists), PYTHON (the project venv's
# interpreter), LOCALSTACK_PYTHON (see scripts/localstack.sh).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/localstack.sh
source "$ROOT/scripts/localstack.sh"   # ensure_venv, start_localstack, wait_ready, stop_localstack

STATE="$ROOT/.venv-container"          # engine config, API socket, logs
IMAGE="localhost/finnstream:local"     # the tag docker-compose.yml builds (finnstream:local)
STAND_IN="localhost/finnstream-python:3.11-bookworm"
SUITE=bookworm
BASE_PACKAGES="python3,python3-venv,python-is-python3,ca-certificates"
MIRRORS=(
  "deb http://deb.debian.org/debian $SUITE main"
  "deb http://deb.debian.org/debian $SUITE-updates main"
  "deb http://deb.debian.org/debian-security $SUITE-security main"
)
# Like the official slim images: no manuals, docs or translations.
DPKG_EXCLUDES=(
  "path-exclude=/usr/share/man/*" "path-exclude=/usr/share/doc/*"
  "path-include=/usr/share/doc/*/copyright" "path-exclude=/usr/share/locale/*"
  "path-exclude=/usr/share/info/*"
)
ULIMITS=("nofile=20000:20000" "nproc=32768:32768")
CA_BUNDLE="${FINNSTREAM_BUILD_CA:-/etc/ssl/certs/ca-certificates.crt}"

log() { printf 'container.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

ensure_engine() {
  local need=() tool
  for tool in podman runc; do
    command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
  done
  if [[ -z "${PYTHON_IMAGE:-}" ]] && ! command -v mmdebstrap >/dev/null 2>&1; then
    need+=(mmdebstrap)
  fi
  ((${#need[@]})) || return 0
  [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1 \
    || die "install ${need[*]} (Debian: apt-get install --no-install-recommends ${need[*]})"
  log "installing ${need[*]} with apt"
  local t0; t0="$(now)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  log "installed ${need[*]} in $(since "$t0")s"
}

configure_engine() {
  mkdir -p "$STATE"
  local quoted
  quoted="$(printf '"%s", ' "${ULIMITS[@]}")"
  cat > "$STATE/containers.conf" <<EOF
# Written by scripts/container.sh: what this machine's kernel allows (see DEVELOPERS.md).
[containers]
default_ulimits = [${quoted%, }]

[engine]
runtime = "runc"
EOF
  export CONTAINERS_CONF="$STATE/containers.conf"
}

ensure_base() {
  if [[ -n "${PYTHON_IMAGE:-}" ]]; then
    log "base: $PYTHON_IMAGE (PYTHON_IMAGE)"
    return 0
  fi
  export PYTHON_IMAGE="$STAND_IN"
  local recipe have
  recipe="$(printf '%s\n' "$SUITE" "$BASE_PACKAGES" "${MIRRORS[@]}" "${DPKG_EXCLUDES[@]}" \
    | sha256sum | cut -c1-16)"
  have="$(podman image inspect --format '{{ index .Labels "finnstream.base-recipe" }}' \
    "$STAND_IN" 2>/dev/null || true)"
  if [[ "$have" == "$recipe" ]]; then
    log "base: $STAND_IN (cached)"
    return 0
  fi
  log "base: building $STAND_IN from Debian $SUITE packages with mmdebstrap"
  local t0 dpkgopts=() opt; t0="$(now)"
  for opt in "${DPKG_EXCLUDES[@]}"; do dpkgopts+=(--dpkgopt="$opt"); done
  # merged-usr by hook: the usrmerge package would pull in perl (50 MB).
  mmdebstrap --quiet --variant=minbase --mode=root --format=tar \
      --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
      --include="$BASE_PACKAGES" --aptopt='Acquire::Languages "none"' "${dpkgopts[@]}" \
      "$SUITE" - "${MIRRORS[@]}" \
    | podman import --quiet --change "LABEL finnstream.base-recipe=$recipe" \
        --change 'CMD ["python3"]' - "$STAND_IN" >/dev/null
  log "base: built in $(since "$t0")s"
}

build_image() {
  local secret=() t0
  # The host's CAs for pip behind a TLS-inspecting proxy: mounted for the build's RUN steps only.
  [[ -s "$CA_BUNDLE" ]] && secret=(--secret "id=ca_bundle,src=$CA_BUNDLE")
  log "building $IMAGE on $PYTHON_IMAGE"
  t0="$(now)"
  podman build --quiet --format docker --network host "${secret[@]}" \
    --build-arg "PYTHON_IMAGE=$PYTHON_IMAGE" --tag "$IMAGE" "$ROOT" >/dev/null
  log "image built in $(since "$t0")s: $(podman image inspect --format '{{.Size}}' "$IMAGE" \
    | awk '{ printf "%.0f MB", $1 / 1e6 }')"
}

API_PID=""
start_api() {
  local socket="$STATE/podman.sock"
  rm -f "$socket"
  setsid podman system service --time=0 "unix://$socket" >"$STATE/api.log" 2>&1 &
  API_PID=$!
  for _ in $(seq 1 100); do
    [[ -S "$socket" ]] && break
    sleep 0.1
  done
  [[ -S "$socket" ]] || die "podman system service did not open $socket (log: $STATE/api.log)"
  export DOCKER_HOST="unix://$socket"
}

stop_api() {
  [[ -n "$API_PID" ]] || return 0
  kill -TERM "$API_PID" 2>/dev/null || true
  wait "$API_PID" 2>/dev/null || true
  API_PID=""
}

cleanup() {
  stop_api
  stop_localstack
}

main() {
  trap cleanup EXIT
  trap 'exit 130' INT TERM
  [[ -x "$PYTHON" ]] || die "$PYTHON not found: create the project venv first (make venv)"
  local t0; t0="$(now)"
  ensure_engine
  configure_engine
  ensure_base
  build_image
  ensure_venv
  start_localstack
  wait_ready
  start_api
  log "ready for the tests after $(since "$t0")s; running pytest -m container tests/container $*"
  set +e
  FINNSTREAM_IMAGE="$IMAGE" LOCALSTACK_ENDPOINT="$ENDPOINT" FINNSTREAM_BUILD_CA="$CA_BUNDLE" \
    "$PYTHON" -m pytest -m container tests/container "$@"
  local rc=$?
  set -e
  log "container tier done in $(since "$t0")s"
  exit "$rc"
}

main "$@"
