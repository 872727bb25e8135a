#!/bin/sh
# Runs `buf lint` (and a `buf format` check) on protos/ with the rules in protos/buf.yaml.
#
# Uses `buf` from PATH if there is one; otherwise installs the npm package
# @bufbuild/buf once into a cache outside the repository (BUF_PREFIX, default
# ${XDG_CACHE_HOME:-$HOME/.cache}/kmsd-buf) and runs it from there. buf needs no
# network for lint: it carries the well-known types itself.
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)

if command -v buf >/dev/null 2>&1; then
    BUF=buf
else
    PREFIX=${BUF_PREFIX:-${XDG_CACHE_HOME:-$HOME/.cache}/kmsd-buf}
    BUF="$PREFIX/node_modules/.bin/buf"
    if [ ! -x "$BUF" ]; then
        npm install --silent --no-audit --no-fund --prefix "$PREFIX" @bufbuild/buf >&2
    fi
fi

cd "$ROOT/protos"
"$BUF" lint
"$BUF" format --diff --exit-code
echo "buf lint: OK ($("$BUF" --version))"
