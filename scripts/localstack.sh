#!/usr/bin/env bash
# The LocalStack test tier (`make test-localstack`): LocalStack 4.14.0 from PyPI, no Docker.
#
#  1. creates .venv-localstack (Python 3.13) with LocalStack 4.14.0 if it is missing or stale;
#  2. starts LocalStack on 127.0.0.1:4566 in the background, with config/localstack/ as its
#     ready.d: LocalStack runs the init hook itself, exactly as the compose image does;
#  3. waits until the hook has finished (/_localstack/init/ready), then runs the SAME hook
#     again as a plain script (the re-run must be a no-op: the hook is idempotent);
#  4. runs `pytest -m localstack tests/localstack` with the main venv (extra args go to pytest);
#  5. stops LocalStack on exit, whatever happened.
# Sourced rather than run, it only defines its functions (scripts/container.sh starts the same
# LocalStack for the compose test that way).
#
# Environment: LOCALSTACK_PYTHON (a python3.13; found automatically otherwise),
# PYTHON (the project's interpreter; default .venv/bin/python), LOCALSTACK_START_TIMEOUT (s).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

LS_VENV="$ROOT/.venv-localstack"
LS_FS="$LS_VENV/filesystem"            # LocalStack's /etc/localstack, /var/lib/localstack, ...
LS_LOG="$LS_VENV/localstack.log"
LS_REQUIREMENTS=(
  "localstack-core[runtime]==4.14.0"
  # pins that keep 4.14.0 importable on today's PyPI
  "cbor2<6" "pyOpenSSL==24.3.0" "cryptography<45" "service_identity" "joserfc<1.3"
)
HOOK="$ROOT/config/localstack/init-finnstream.py"
ENDPOINT="http://127.0.0.1:4566"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
START_TIMEOUT="${LOCALSTACK_START_TIMEOUT:-180}"

log() { printf 'localstack.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

find_python313() {
  local candidates=()
  [[ -n "${LOCALSTACK_PYTHON:-}" ]] && candidates+=("$LOCALSTACK_PYTHON")
  candidates+=(python3.13 /usr/bin/python3.13 /usr/local/bin/python3.13)
  if command -v pyenv >/dev/null 2>&1; then
    candidates+=("$(pyenv root)"/versions/3.13*/bin/python3.13)
  fi
  local c
  for c in "${candidates[@]}"; do
    if "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 13))' >/dev/null 2>&1; then
      printf '%s\n' "$c"
      return 0
    fi
  done
  return 1
}

ensure_venv() {
  local stamp="$LS_VENV/.requirements" wanted
  wanted="$(printf '%s\n' "${LS_REQUIREMENTS[@]}")"
  if [[ -x "$LS_VENV/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$wanted" ]]; then
    return 0
  fi
  local py
  py="$(find_python313)" || die "LocalStack 4.14.0 needs Python 3.13: set LOCALSTACK_PYTHON"
  log "creating $LS_VENV with $py"
  local t0; t0="$(now)"
  "$py" -m venv "$LS_VENV"
  "$LS_VENV/bin/python" -m pip install --quiet "${LS_REQUIREMENTS[@]}"
  printf '%s\n' "$wanted" > "$stamp"
  log "installed LocalStack in $(since "$t0")s"
}

LS_PID=""
stop_localstack() {
  [[ -n "$LS_PID" ]] || return 0
  if kill -0 "$LS_PID" 2>/dev/null; then
    log "stopping LocalStack (pid $LS_PID)"
    kill -TERM "$LS_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do
      kill -0 "$LS_PID" 2>/dev/null || break
      sleep 0.2
    done
  fi
  # LocalStack runs in its own process group (setsid): end what is left of it, e.g. kinesis-mock.
  kill -KILL -- "-$LS_PID" 2>/dev/null || true
  wait "$LS_PID" 2>/dev/null || true
  LS_PID=""
}
start_localstack() {
  if curl -fsS -o /dev/null "$ENDPOINT/_localstack/health" 2>/dev/null; then
    die "something already answers on $ENDPOINT; stop it first"
  fi
  command -v node >/dev/null 2>&1 || die "kinesis-mock runs on Node.js: install nodejs"
  # Host mode with a private filesystem root: LocalStack's /etc/localstack/init/ready.d is our
  # hook folder, exactly as docker-compose.yml mounts it.
  # kinesis-mock persists streams and records under tmp/: start every run from an empty account.
  rm -rf "$LS_FS/tmp"
  mkdir -p "$LS_FS/etc/localstack/init"
  ln -sfn "$ROOT/config/localstack" "$LS_FS/etc/localstack/init/ready.d"
  log "starting LocalStack 4.14.0 on $ENDPOINT (log: $LS_LOG)"
  T_START="$(now)"
  env GATEWAY_LISTEN=127.0.0.1:4566 \
      SERVICES=kinesis,secretsmanager \
      KINESIS_MOCK_PROVIDER_ENGINE=node \
      KINESIS_LATENCY=0 \
      DNS_ADDRESS=0 \
      OVERRIDE_IN_DOCKER=0 \
      FILESYSTEM_ROOT="$LS_FS" \
      LOCALSTACK_AUTH_TOKEN="${LOCALSTACK_AUTH_TOKEN:-}" \
    setsid "$LS_VENV/bin/python" -m localstack.runtime.main >"$LS_LOG" 2>&1 &
  LS_PID=$!
}

# Prints the init-hook state: "ok", "pending" or "error <details>".
init_state() {
  curl -fsS --max-time 3 "$ENDPOINT/_localstack/init/ready" 2>/dev/null | "$LS_VENV/bin/python" -c '
import json, sys
try:
    init = json.load(sys.stdin)
except ValueError:
    print("pending"); sys.exit()
failed = [s["name"] for s in init["scripts"] if s["state"] == "ERROR"]
if failed:
    print("error", *failed)
elif init["completed"] and init["scripts"] and all(s["state"] == "SUCCESSFUL" for s in init["scripts"]):
    print("ok")
else:
    print("pending")
' || echo pending
}

wait_ready() {
  local deadline state healthy_at=""
  deadline=$(( $(date +%s) + START_TIMEOUT ))
  while :; do
    kill -0 "$LS_PID" 2>/dev/null || { tail -n 40 "$LS_LOG" >&2; die "LocalStack exited during startup"; }
    if [[ -z "$healthy_at" ]] && curl -fsS -o /dev/null --max-time 3 "$ENDPOINT/_localstack/health" 2>/dev/null; then
      healthy_at="$(since "$T_START")"
      log "healthy after ${healthy_at}s"
    fi
    state="$(init_state)"
    case "$state" in
      ok) log "ready.d hook done after $(since "$T_START")s (start to hook completed)"; return 0 ;;
      error*) tail -n 40 "$LS_LOG" >&2; die "init hook failed: ${state#error }" ;;
    esac
    (( $(date +%s) < deadline )) || { tail -n 40 "$LS_LOG" >&2; die "not ready after ${START_TIMEOUT}s"; }
    sleep 0.25
  done
}

rerun_hook() {
  local t0; t0="$(now)"
  AWS_ENDPOINT_URL="$ENDPOINT" AWS_REGION=us-east-1 "$LS_VENV/bin/python" "$HOOK" >&2 \
    || die "the init hook failed when re-run as a script"
  log "hook re-run as a script in $(since "$t0")s"
}

main() {
  trap stop_localstack EXIT
  trap 'exit 130' INT TERM
  [[ -x "$PYTHON" ]] || die "$PYTHON not found: create the project venv first (make install)"
  ensure_venv
  start_localstack
  wait_ready
  rerun_hook

  log "running pytest -m localstack tests/localstack $*"
  set +e
  LOCALSTACK_ENDPOINT="$ENDPOINT" "$PYTHON" -m pytest -m localstack tests/localstack "$@"
  rc=$?
  set -e
  exit "$rc"
}

# Sourced (scripts/container.sh does), it only defines the functions above.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
