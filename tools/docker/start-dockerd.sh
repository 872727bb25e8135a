#!/usr/bin/env bash
# Starts a Docker daemon in the background for building and running kmsd's images,
# WITHOUT Docker's default networking: no docker0 bridge, no iptables rules, no IP
# forwarding or masquerading. Containers get host networking (`network_mode: host`,
# `docker build --network host`) or none.
#
#   tools/docker/start-dockerd.sh     # idempotent: returns at once if `docker info` works
#
# Installs docker.io and docker-compose with apt when dockerd or docker-compose is
# missing (set KMSD_NO_APT=1 to fail instead). Waits, with a deadline, until the daemon
# answers. The daemon outlives this script; its log is $KMSD_DOCKERD_LOG
# (default /var/log/kmsd-dockerd.log), its pid in /var/run/kmsd-dockerd.pid.
# Stop it with: kill "$(cat /var/run/kmsd-dockerd.pid)"
set -euo pipefail

log() { printf 'start-dockerd: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

timeout_s="${KMSD_DOCKERD_TIMEOUT:-60}"
daemon_log="${KMSD_DOCKERD_LOG:-/var/log/kmsd-dockerd.log}"
pidfile=/var/run/kmsd-dockerd.pid

need_pkgs=()
command -v dockerd >/dev/null 2>&1 || need_pkgs+=(docker.io)
command -v docker-compose >/dev/null 2>&1 || need_pkgs+=(docker-compose)
if [ "${#need_pkgs[@]}" -gt 0 ]; then
  [ "${KMSD_NO_APT:-0}" = 1 ] && die "missing: ${need_pkgs[*]} (and KMSD_NO_APT=1)"
  [ "$(id -u)" = 0 ] || die "missing ${need_pkgs[*]}; installing them needs root"
  command -v apt-get >/dev/null 2>&1 || die "missing ${need_pkgs[*]} and there is no apt-get"
  log "installing ${need_pkgs[*]} with apt"
  # The packages' maintainer scripts would start docker.service / containerd.service
  # with Docker's default networking (docker0 bridge, iptables rules). A policy-rc.d
  # that answers 101 ("action forbidden") stops that for the install, so that the only
  # daemon is the one started below; an existing policy-rc.d is left as it is.
  policy=/usr/sbin/policy-rc.d
  placed_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# tools/docker/start-dockerd.sh: no service starts during its apt install\nexit 101\n' >"$policy"
    chmod 0755 "$policy"
    placed_policy=1
    trap 'if [ "$placed_policy" = 1 ]; then rm -f "$policy"; fi' EXIT
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${need_pkgs[@]}" >/dev/null
  if [ "$placed_policy" = 1 ]; then
    rm -f "$policy"
    placed_policy=0
  fi
fi

if docker info >/dev/null 2>&1; then
  log "docker is already usable"
  exit 0
fi

[ "$(id -u)" = 0 ] || die "dockerd is not running and starting it needs root"

# A dockerd of ours that is still starting: wait for it rather than start another.
running=""
if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null \
   && grep -q dockerd "/proc/$(cat "$pidfile")/cmdline" 2>/dev/null; then
  running="$(cat "$pidfile")"
  log "dockerd (pid $running) is starting; waiting for it"
elif [ -S /var/run/docker.sock ] && [ -f /var/run/docker.pid ] \
   && kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
  die "a dockerd (pid $(cat /var/run/docker.pid)) runs but does not answer; see its log"
else
  log "starting dockerd (no bridge, no iptables); log: $daemon_log"
  mkdir -p "$(dirname "$daemon_log")"
  setsid dockerd \
    --bridge=none \
    --iptables=false \
    --ip6tables=false \
    --ip-forward=false \
    --ip-masq=false \
    --userland-proxy=false \
    --pidfile=/var/run/docker.pid \
    </dev/null >>"$daemon_log" 2>&1 &
  running=$!
  echo "$running" >"$pidfile"
fi

deadline=$((SECONDS + timeout_s))
until docker info >/dev/null 2>&1; do
  if ! kill -0 "$running" 2>/dev/null; then
    tail -n 20 "$daemon_log" >&2 || true
    die "dockerd exited; see $daemon_log"
  fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    tail -n 20 "$daemon_log" >&2 || true
    die "dockerd did not answer within ${timeout_s}s; see $daemon_log"
  fi
  sleep 0.2
done
log "dockerd (pid $running) is ready: $(docker version -f 'server {{.Server.Version}}, client {{.Client.Version}}')"
