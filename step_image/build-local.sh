#!/usr/bin/env bash
# Build the step image on a machine that reaches Debian's apt mirror and PyPI but no
# image registry: the base image is bootstrapped from Debian packages and imported
# into the container engine, then Dockerfile.step is built on top of it.
#
# Usage: step_image/build-local.sh [--tag TAG] [--engine podman|docker]
#                                  [--extra-requirements FILE] [--rebuild-base]
#
# Environment (each overridden by the matching option):
#   JOBRUNNER_STEP_TAG      image to build (default localhost/jobrunner-step:dev)
#   JOBRUNNER_BASE_TAG      base image (default localhost/jobrunner-base:bookworm)
#   JOBRUNNER_ENGINE        podman or docker (default: the first one that works)
#   JOBRUNNER_CACHE_DIR     where the base root filesystem tarball is kept
#   JOBRUNNER_CA_BUNDLE     CA bundle pip trusts during the build (default: the
#                           host's, from PIP_CERT, SSL_CERT_FILE or /etc/ssl/certs)
#   DEBIAN_MIRROR           apt mirror for debootstrap (default deb.debian.org)
#   DEBIAN_SECURITY_MIRROR  where the base takes security updates from
#   CONTAINERS_CONF         podman configuration; one is written if unset
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
step_tag="${JOBRUNNER_STEP_TAG:-localhost/jobrunner-step:dev}"
base_tag="${JOBRUNNER_BASE_TAG:-localhost/jobrunner-base:bookworm}"
engine="${JOBRUNNER_ENGINE:-}"
cache_dir="${JOBRUNNER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/jobrunner}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
security_mirror="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
suite=bookworm
ca_bundle="${JOBRUNNER_CA_BUNDLE:-${PIP_CERT:-${SSL_CERT_FILE:-}}}"
# The build reaches PyPI through this host's network, so it trusts what this host
# trusts (a proxy's own CA included); only the build stage sees the bundle.
if [[ -z "$ca_bundle" && -f /etc/ssl/certs/ca-certificates.crt ]]; then
    ca_bundle=/etc/ssl/certs/ca-certificates.crt
fi
extra_requirements=""
rebuild_base=0

temporary_dirs=()
# --one-file-system: a failed debootstrap can leave /proc or /sys mounted inside
# the root filesystem, and those must never be walked by rm.
trap 'rm -rf --one-file-system "${temporary_dirs[@]}"' EXIT

log() { printf 'build-local: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' \
    "${BASH_SOURCE[0]}"; }

while (($#)); do
    case "$1" in
        --tag) step_tag="$2"; shift 2 ;;
        --engine) engine="$2"; shift 2 ;;
        --extra-requirements) extra_requirements="$2"; shift 2 ;;
        --rebuild-base) rebuild_base=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

# podman on hosts with hybrid cgroups fails with crun and with the host's high
# ulimits; runc and explicit lower limits work everywhere, so use them unless the
# caller brings a configuration of their own.
configure_podman() {
    if [[ -n "${CONTAINERS_CONF:-}" ]]; then
        return
    fi
    local conf_dir
    conf_dir="$(mktemp -d)"
    temporary_dirs+=("$conf_dir")
    {
        echo '[containers]'
        echo 'default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]'
        if command -v runc >/dev/null; then
            echo '[engine]'
            echo 'runtime = "runc"'
        fi
    } >"$conf_dir/containers.conf"
    export CONTAINERS_CONF="$conf_dir/containers.conf"
}

engine_works() {
    command -v "$1" >/dev/null && timeout 60 "$1" info >/dev/null 2>&1
}

pick_engine() {
    if [[ -z "$engine" ]]; then
        for candidate in podman docker; do
            [[ "$candidate" == podman ]] && command -v podman >/dev/null \
                && configure_podman
            if engine_works "$candidate"; then
                engine="$candidate"
                break
            fi
        done
        [[ -n "$engine" ]] || die "no working podman or docker found"
    else
        [[ "$engine" == podman ]] && configure_podman
        engine_works "$engine" || die "$engine is not installed or cannot run"
    fi
    log "using $engine"
}

image_id() {
    "$engine" image inspect --format '{{.Id}}' "$1"
}

image_exists() {
    "$engine" image inspect "$1" >/dev/null 2>&1
}

# The rootfs keeps apt so that derived images can add system libraries, but drops
# documentation the way the official slim images do, now and for later installs.
bootstrap_rootfs() {
    local rootfs="$1"
    command -v debootstrap >/dev/null \
        || die "debootstrap is missing (apt-get install debootstrap)"
    [[ "$(id -u)" == 0 ]] || die "debootstrap needs root"

    log "debootstrap $suite minbase into $rootfs (about a minute)"
    # python3-venv brings ensurepip, which the Dockerfile needs to create its venv;
    # ca-certificates lets s3fs verify TLS against real S3 endpoints.
    debootstrap --variant=minbase \
        --include=python3,python3-venv,python-is-python3,ca-certificates \
        "$suite" "$rootfs" "$mirror" >&2

    cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $mirror $suite main
deb $mirror $suite-updates main
deb $security_mirror $suite-security main
EOF
    cat >"$rootfs/etc/dpkg/dpkg.cfg.d/excludes" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EOF
    # debootstrap installs only the release's packages; take the security and
    # point-release fixes too.
    cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
    chroot "$rootfs" /bin/sh -c \
        'apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get -y -q upgrade' >&2
    chroot "$rootfs" apt-get clean
    : >"$rootfs/etc/resolv.conf"

    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
        "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
        "$rootfs"/usr/share/locale/* "$rootfs"/var/log/*.log \
        "$rootfs"/var/log/apt/* "$rootfs"/tmp/*
    find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright \
        -not -type d -delete
}

ensure_base_image() {
    local tarball="$cache_dir/jobrunner-base-$suite.tar"
    if ((rebuild_base)); then
        rm -f "$tarball"
    elif image_exists "$base_tag"; then
        log "reusing base image $base_tag"
        return
    fi

    if [[ ! -f "$tarball" ]]; then
        local work started
        started=$SECONDS
        work="$(mktemp -d)"
        temporary_dirs+=("$work")
        bootstrap_rootfs "$work/rootfs"
        mkdir -p "$cache_dir"
        tar --numeric-owner -C "$work/rootfs" -cf "$tarball.partial" .
        mv "$tarball.partial" "$tarball"
        log "base root filesystem built in $((SECONDS - started)) s: $tarball"
    fi

    log "importing $tarball as $base_tag"
    local path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    "$engine" import \
        --change "ENV PATH=$path" \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' \
        "$tarball" "$base_tag" >/dev/null
}

# Without a .dockerignore the engine would send the whole work tree (.git, virtual
# environments, checkpoints) as the build context, so only what Dockerfile.step
# copies is staged.
stage_context() {
    local context="$1"
    mkdir -p "$context/step_image"
    cp "$repo_root/Dockerfile.step" "$repo_root/pyproject.toml" "$context/"
    cp "$repo_root/step_image/requirements.txt" "$context/step_image/"
    tar -C "$repo_root" --exclude=__pycache__ --exclude='*.pyc' -cf - jobrunner \
        | tar -C "$context" -xf -

    if [[ -f "$repo_root/README.md" ]]; then
        cp "$repo_root/README.md" "$context/"
    else
        # Only the package's long description comes from it.
        log "warning: README.md is missing; building with an empty one"
        : >"$context/README.md"
    fi

    if [[ -n "$ca_bundle" ]]; then
        cp "$ca_bundle" "$context/step_image/pip-cert.pem"
    fi

    if [[ -n "$extra_requirements" ]]; then
        cp "$extra_requirements" "$context/step_image/requirements-user.txt"
    else
        cp "$repo_root/step_image/requirements-user.txt" "$context/step_image/"
    fi
}

build_step_image() {
    local context started previous
    previous="$(image_id "$step_tag" 2>/dev/null || true)"
    context="$(mktemp -d)"
    temporary_dirs+=("$context")
    stage_context "$context"

    started=$SECONDS
    log "building $step_tag from $base_tag"
    # Host networking: the build only needs PyPI, and it spares the engine a
    # network setup (bridge, CNI plugins) that minimal hosts may lack.
    "$engine" build --network host \
        --build-arg "BASE_IMAGE=$base_tag" \
        -f "$context/Dockerfile.step" -t "$step_tag" "$context" >&2
    log "step image built in $((SECONDS - started)) s"

    # Each rebuild after a code change would otherwise leave the previous image and
    # build stage behind, untagged. The newest build stage stays as the layer
    # cache, and layers shared with what stays are kept.
    if [[ -n "$previous" && "$previous" != "$(image_id "$step_tag")" ]]; then
        "$engine" rmi "$previous" >/dev/null 2>&1 || true
    fi
    "$engine" images --quiet --filter dangling=true \
        --filter label=org.jobrunner.stage=build | tail -n +2 \
        | xargs --no-run-if-empty "$engine" rmi >/dev/null 2>&1 || true
}

report_size() {
    local bytes
    bytes="$("$engine" image inspect --format '{{.Size}}' "$step_tag")"
    log "$step_tag: $((bytes / 1000000)) MB"
}

pick_engine
ensure_base_image
build_step_image
report_size
