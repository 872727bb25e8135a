#!/usr/bin/env bash
# Builds the local base image `kmsd-base:<release>` without any image registry:
# debootstraps a minimal Debian (the host's release) from the Debian mirror that
# apt already uses, and `docker import`s it.
#
#   tools/docker/build-base-image.sh            # idempotent: fast when the image exists
#   tools/docker/build-base-image.sh --rebuild  # throw away the cached rootfs and image
#
# Environment (all optional):
#   KMSD_RELEASE        Debian release to bootstrap (default: VERSION_CODENAME of the host)
#   KMSD_MIRROR         Debian mirror (default: the URI apt's sources use for <release>,
#                       i.e. the same mirror apt uses on this host)
#   KMSD_ROOTFS_CACHE   where rootfs trees are kept (default: /var/cache/kmsd)
#   KMSD_SECURITY_MIRROR  the security mirror written into the image's apt sources
#                       (default: apt's source for <release>-security)
#   KMSD_EXTRA_CA_DIR   directory of extra *.crt CA certificates to trust inside the image
#                       (default: /usr/local/share/ca-certificates, the host's locally added
#                       CAs, needed behind a TLS-intercepting proxy; set it empty to skip)
#   KMSD_NO_APT=1       never apt-get install the tools (fail instead)
#
# Needs root (debootstrap, docker). Starts dockerd with tools/docker/start-dockerd.sh
# (which installs docker.io and docker-compose with apt if missing) when none answers.
# The only network access is to the Debian mirror (debootstrap, and apt for the tools).
set -euo pipefail

log() { printf 'build-base-image: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

rebuild=0
for arg in "$@"; do
  case "$arg" in
    --rebuild) rebuild=1 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) die "unknown argument: $arg" ;;
  esac
done

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap and docker need it)"

# shellcheck disable=SC1091
release="${KMSD_RELEASE:-$(. /etc/os-release && echo "${VERSION_CODENAME:-}")}"
[ -n "$release" ] || die "cannot tell the Debian release: set KMSD_RELEASE"
image="kmsd-base:${release}"
cache_root="${KMSD_ROOTFS_CACHE:-/var/cache/kmsd}"
rootfs="${cache_root}/rootfs-${release}"
extra_ca_dir="${KMSD_EXTRA_CA_DIR-/usr/local/share/ca-certificates}"

# --- the mirror apt uses ---------------------------------------------------------------
find_mirror() {  # $1: the suite (bookworm, bookworm-security)
  local uri rel="$1"
  # deb822 sources (*.sources): "URIs: http://deb.debian.org/debian" next to a plain
  # "Suites: <release>" (not -security); one-line sources: "deb URI <release> main".
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    uri="$(awk -v rel="$rel" '
      BEGIN { RS=""; FS="\n" }
      {
        u=""; s=""; en=1
        for (i = 1; i <= NF; i++) {
          if ($i ~ /^URIs:/)    { u=$i; sub(/^URIs:[ \t]*/, "", u); sub(/[ \t].*/, "", u) }
          if ($i ~ /^Suites:/)  { s=" " $i " "; sub(/^ Suites:/, " ", s) }
          if ($i ~ /^Enabled:[ \t]*no/) { en=0 }
        }
        if (en && u != "" && s ~ (" " rel " ")) { print u; exit }
      }' "$f")"
    [ -n "$uri" ] && { echo "$uri"; return; }
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    uri="$(awk -v rel="$rel" '
      $1 == "deb" {
        i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
        if ($(i+1) == rel) { print $i; exit }
      }' "$f")"
    [ -n "$uri" ] && { echo "$uri"; return; }
  done
}
mirror="${KMSD_MIRROR:-$(find_mirror "$release")}"
[ -n "$mirror" ] || die "no Debian mirror for '$release' in apt's sources: set KMSD_MIRROR"

# --- tools -------------------------------------------------------------------------------
if ! command -v debootstrap >/dev/null 2>&1; then
  [ "${KMSD_NO_APT:-0}" = 1 ] && die "debootstrap is missing (and KMSD_NO_APT=1)"
  command -v apt-get >/dev/null 2>&1 || die "debootstrap is missing and there is no apt-get"
  log "installing debootstrap with apt"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    debootstrap >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
  "$(dirname "$0")/start-dockerd.sh"
fi

if [ "$rebuild" = 1 ]; then
  log "--rebuild: removing $image and $rootfs"
  docker image rm -f "$image" >/dev/null 2>&1 || true
  rm -rf -- "$rootfs" "$rootfs.partial"
fi

if docker image inspect "$image" >/dev/null 2>&1; then
  log "$image already exists (use --rebuild to make it again)"
  exit 0
fi

# --- rootfs (cached) ---------------------------------------------------------------------
if [ ! -f "$rootfs/.kmsd-rootfs-complete" ]; then
  log "debootstrap $release from $mirror into $rootfs (takes a minute or two)"
  mkdir -p "$cache_root"
  rm -rf -- "$rootfs.partial"
  debootstrap --variant=minbase --include=ca-certificates \
    "$release" "$rootfs.partial" "$mirror" >"$cache_root/debootstrap-$release.log" 2>&1 \
    || die "debootstrap failed; see $cache_root/debootstrap-$release.log"

  # apt inside the image uses the same mirror, with the release's updates and security.
  security="${KMSD_SECURITY_MIRROR:-$(find_mirror "$release-security")}"
  security="${security:-${mirror%/debian}/debian-security}"
  cat >"$rootfs.partial/etc/apt/sources.list" <<EOF
deb $mirror $release main
deb $mirror $release-updates main
deb $security $release-security main
EOF
  # A small image: no docs, man pages or locales from later apt installs, no apt caches.
  cat >"$rootfs.partial/etc/dpkg/dpkg.cfg.d/01-kmsd-nodoc" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EOF
  cat >"$rootfs.partial/etc/apt/apt.conf.d/01-kmsd-slim" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
EOF
  chroot "$rootfs.partial" apt-get clean
  rm -rf "$rootfs.partial"/var/lib/apt/lists/* "$rootfs.partial"/var/cache/apt/*.bin \
    "$rootfs.partial"/usr/share/doc/* "$rootfs.partial"/usr/share/man/* \
    "$rootfs.partial"/usr/share/locale/* "$rootfs.partial"/var/log/*.log \
    "$rootfs.partial"/tmp/* "$rootfs.partial"/var/tmp/*
  # Nothing of this host: Docker provides resolv.conf, hostname and hosts at run time.
  : >"$rootfs.partial/etc/machine-id"
  rm -f "$rootfs.partial/etc/resolv.conf" "$rootfs.partial/etc/hostname"
  touch "$rootfs.partial/.kmsd-rootfs-complete"
  mv "$rootfs.partial" "$rootfs"
else
  log "reusing cached rootfs $rootfs"
fi

# --- extra CAs (a TLS-intercepting proxy in front of PyPI, for example) -----------------
# Added to a throw-away copy that is imported: the cached rootfs keeps only Debian's CAs.
import_dir="$rootfs"
staging=""
cleanup() { [ -n "$staging" ] && rm -rf -- "$staging"; return 0; }
trap cleanup EXIT
shopt -s nullglob
extra_cas=()
if [ -n "$extra_ca_dir" ] && [ -d "$extra_ca_dir" ]; then
  extra_cas=("$extra_ca_dir"/*.crt)
fi
if [ "${#extra_cas[@]}" -gt 0 ]; then
  log "trusting ${#extra_cas[@]} extra CA certificate(s) from $extra_ca_dir in the image"
  staging="$(mktemp -d "$cache_root/import-$release.XXXXXX")"
  cp -a "$rootfs/." "$staging/"
  mkdir -p "$staging/usr/local/share/ca-certificates"
  cp "${extra_cas[@]}" "$staging/usr/local/share/ca-certificates/"
  chroot "$staging" update-ca-certificates >/dev/null 2>&1
  import_dir="$staging"
fi

log "docker import -> $image"
tar -C "$import_dir" --exclude=./.kmsd-rootfs-complete -c . \
  | docker import \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV LANG=C.UTF-8' \
      --change 'CMD ["/bin/bash"]' \
      --message "debootstrap --variant=minbase $release from $mirror" \
      - "$image" >/dev/null
log "built $image ($(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}'))"
