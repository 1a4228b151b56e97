#!/usr/bin/env bash
# Build the base image peermesh-base:bookworm from Debian packages, without any
# container registry: debootstrap a minimal bookworm root filesystem into a temp
# folder and `docker import` it.
#
# Idempotent: the image is also tagged peermesh-base:<hash12>, where the hash
# covers the suite, the package list and RECIPE. If that tag exists the build
# is skipped and peermesh-base:bookworm is pointed at it.
#
# Usage: sudo docker/build-base.sh            (must run as root: debootstrap)
# Environment:
#   PEERMESH_DEBIAN_MIRROR  Debian mirror URL (default: the one apt uses here)
#   PEERMESH_FORCE_BASE=1   rebuild even if the tagged image exists (e.g. to pick
#                           up a Debian point release)
set -euo pipefail

SUITE=bookworm
IMAGE=peermesh-base
# Small on purpose. python3-venv brings ensurepip (pip + setuptools wheels) so
# the Dockerfile can create a venv; tini is PID 1 (signals, zombie reaping).
# Note: git depends on liberror-perl -> perl, which costs ~40 MB; agents need git.
PACKAGES=(python3 python3-venv ca-certificates procps git tini)
# Bump when changing how the root filesystem is made (options, trimming), so
# that existing base images are not reused. Comments and logging need no bump.
RECIPE=1

log() { printf '[build-base] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

hash=$(printf 'suite=%s variant=minbase recipe=%s packages=%s\n' \
    "$SUITE" "$RECIPE" "${PACKAGES[*]}" | sha256sum | cut -c1-64)
hash12=${hash:0:12}

# Docker images are machine-wide, so is this lock: one base build at a time.
exec 9>/tmp/peermesh-base.lock
if ! flock -n 9; then
    log "another base build is running, waiting for it"
    flock 9
fi

if [[ "${PEERMESH_FORCE_BASE:-0}" != 1 ]] \
    && docker image inspect "$IMAGE:$hash12" >/dev/null 2>&1; then
    docker tag "$IMAGE:$hash12" "$IMAGE:$SUITE"
    log "up to date: $IMAGE:$hash12 (tagged $IMAGE:$SUITE), nothing to do"
    exit 0
fi

[[ $EUID -eq 0 ]] || die "must run as root (debootstrap needs it)"
if ! command -v debootstrap >/dev/null; then
    command -v apt-get >/dev/null || die "debootstrap missing and no apt-get to install it"
    log "installing debootstrap from Debian's packages"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 \
             && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; } \
        || die "could not install debootstrap: apt-get install debootstrap"
fi

# Find the Debian mirror apt uses on this host, so we never depend on a mirror
# that may be unreachable from here. Reads both the one-line (*.list) and the
# deb822 (*.sources) formats; prefers an entry that carries the suite itself.
find_mirror() {
    local files=() f
    [[ -f /etc/apt/sources.list ]] && files+=(/etc/apt/sources.list)
    for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [[ -f "$f" ]] && files+=("$f")
    done
    ((${#files[@]})) || return 1
    # Emit "URI SUITE" pairs for every "deb" entry, then choose.
    awk '
        FNR == 1 { flush() }
        /^[[:space:]]*#/ { next }
        FILENAME ~ /\.list$/ && $1 == "deb" {
            i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
            print $i, $(i + 1); next
        }
        FILENAME ~ /\.sources$/ {
            if (NF == 0) { flush(); next }
            key = tolower($1)
            if (key == "types:")  { types = $0 }
            if (key == "uris:")   { uris = $2 }
            if (key == "suites:") { suites = ""; for (i = 2; i <= NF; i++) suites = suites " " $i }
            if (key == "enabled:" && tolower($2) == "no") { disabled = 1 }
        }
        END { flush() }
        function flush(   n, s, i) {
            if (uris != "" && types ~ /(^|[[:space:]])deb([[:space:]]|$)/ && !disabled) {
                n = split(suites, s, " ")
                for (i = 1; i <= n; i++) print uris, s[i]
            }
            types = ""; uris = ""; suites = ""; disabled = 0
        }
    ' "${files[@]}" | awk -v suite="$SUITE" '
        $2 == suite { print $1; found = 1; exit }
        $1 ~ /\/debian\/?$/ && fallback == "" { fallback = $1 }
        END { if (!found && fallback != "") print fallback }
    '
}

mirror=${PEERMESH_DEBIAN_MIRROR:-$(find_mirror || true)}
[[ -n "$mirror" ]] \
    || die "no Debian mirror found in apt sources; set PEERMESH_DEBIAN_MIRROR"

# Honour an apt proxy, if this host has one (debootstrap reads http_proxy).
apt_proxy=$(apt-config dump Acquire::http::Proxy 2>/dev/null \
    | sed -n 's/^Acquire::http::Proxy "\(.*\)";$/\1/p' || true)
if [[ -n "$apt_proxy" && -z "${http_proxy:-}" ]]; then
    export http_proxy=$apt_proxy
    log "using apt's proxy $apt_proxy"
fi

# /var/tmp, not /tmp: /tmp may be a tmpfs or mounted nodev/noexec.
workdir=$(mktemp -d /var/tmp/peermesh-base.XXXXXX)
rootfs=$workdir/rootfs
cleanup() {
    # debootstrap may leave /proc or /sys mounted inside the target if it fails:
    # unmount first, and never let rm cross into another file system.
    local m
    for m in $(findmnt -rn -o TARGET | grep -F "$rootfs" | sort -r); do
        umount -l "$m" || true
    done
    rm -rf --one-file-system "$workdir"
}
trap cleanup EXIT

log "debootstrap $SUITE (minbase) from $mirror"
log "extra packages: ${PACKAGES[*]}"
start=$SECONDS
# Full debootstrap output goes to a log; only the phase lines are shown.
if ! debootstrap --variant=minbase --components=main \
        --include="$(IFS=,; echo "${PACKAGES[*]}")" \
        "$SUITE" "$rootfs" "$mirror" >"$workdir/debootstrap.log" 2>&1 \
        < /dev/null; then
    tail -n 40 "$workdir/debootstrap.log" >&2
    die "debootstrap failed (log above)"
fi
grep -E '^(I: (Retrieving InRelease|Valid Release|Resolving|Base system)|W:)' \
    "$workdir/debootstrap.log" | cut -c1-99 >&2 || true
log "debootstrap done in $((SECONDS - start))s"

log "trimming the root filesystem"
# Downloaded .debs, apt lists, docs, man pages and locales are dead weight here.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin \
    "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/* "$rootfs"/tmp/* \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
    "$rootfs"/usr/share/locale/*
# Keep later `apt-get install`s in derived images equally lean.
cat >"$rootfs/etc/dpkg/dpkg.cfg.d/peermesh-nodoc" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EOF
# debootstrap copied the host's resolv.conf and hostname; Docker provides both.
rm -f "$rootfs/etc/resolv.conf" "$rootfs/etc/hostname"

size=$(du -sh --one-file-system "$rootfs" | cut -f1)
log "importing $size root filesystem as $IMAGE:$hash12"
tar --numeric-owner -C "$rootfs" -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change "LABEL peermesh.base.hash=$hash" \
    --change "LABEL peermesh.base.suite=$SUITE" \
    --change 'CMD ["/bin/bash"]' \
    - "$IMAGE:$hash12" >/dev/null
docker tag "$IMAGE:$hash12" "$IMAGE:$SUITE"
log "built $IMAGE:$SUITE ($IMAGE:$hash12) in $((SECONDS - start))s"
