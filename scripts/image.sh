#!/usr/bin/env bash
# Build distillery's container image: `scripts/image.sh cpu|gpu` (what `make image` / `make image-gpu` run).
#
# With a Docker daemon that answers, `docker build`. Otherwise Debian's buildah (installed with apt-get when run as
# root), rootless-friendly: vfs storage and chroot isolation, which work in a plain unprivileged sandbox.
# When the upstream Python base cannot be pulled, a Debian bookworm base (python3 is 3.11) is made once with
# mmdebstrap from this machine's apt sources and imported as localhost/distillery-base:bookworm (cached).
# pip's find-links folders (local wheel folders, e.g. torch+cpu) are read from pip's own configuration and handed
# to the build as read-only volumes; nothing about this machine is written into the image or the repository.
#
# Environment: IMAGE_NAME (default distillery), IMAGE_TAG (default 0.1.0-<variant>), PYTHON_IMAGE (skip the probe),
# STORAGE_DRIVER (buildah, default vfs), IMAGE_LOG (a file that also receives the build output).
set -euo pipefail

variant=${1:-cpu}
case "$variant" in cpu | gpu) ;; *)
    echo "usage: $0 cpu|gpu" >&2
    exit 2
    ;;
esac
root=$(cd "$(dirname "$0")/.." && pwd)
name=${IMAGE_NAME:-distillery}
version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$root/pyproject.toml" | head -1)
tag=${IMAGE_TAG:-$version-$variant}
upstream_python=docker.io/library/python:3.11-slim-bookworm
local_base=localhost/distillery-base:bookworm
export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}

say() { printf '[image] %s\n' "$*" >&2; }

# ------------------------------------------------------------------------------------------------ the engine
engine=buildah
if command -v docker >/dev/null 2>&1 && timeout 10 docker info >/dev/null 2>&1; then
    engine=docker
elif ! command -v buildah >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "no Docker daemon and no buildah: installing Debian's buildah and mmdebstrap"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends buildah mmdebstrap >/dev/null
    else
        say "no Docker daemon answers and buildah is missing: run 'sudo apt-get install buildah mmdebstrap'" \
            "(or start Docker), then run this again"
        exit 1
    fi
fi
say "engine: $engine"

# ----------------------------------------------------------------------------- pip's local wheel folders
# PIP_FIND_LINKS wins over pip's configuration files, as in pip itself. Only local folders can be handed in.
# The same for pip's CA bundle: where HTTPS goes through an intercepting proxy, its CA is only in that bundle.
pip_cmd=$(command -v pip3 || command -v pip || true)
pip_config() { [ -n "$pip_cmd" ] && "$pip_cmd" config list 2>/dev/null | sed -n "s/^[a-z:]*\.$1='\(.*\)'$/\1/p" | tail -1; }
find_links=${PIP_FIND_LINKS:-$(pip_config find-links || true)}
pip_cert=${PIP_CERT:-$(pip_config cert || true)}
volumes=()
in_image_links=()
i=0
if [ "$variant" = gpu ] && [ -n "$find_links" ]; then
    # A local torch+cpu wheel satisfies vLLM's `torch==X` pin too and would make a GPU image without CUDA.
    say "gpu: not handing pip's find-links folders to the build (the CUDA torch comes from the index)"
    find_links=
fi
for link in $find_links; do
    link=${link#file://}
    if [ -d "$link" ]; then
        volumes+=(-v "$link:/build/find-links/$i:ro")
        in_image_links+=("/build/find-links/$i")
        i=$((i + 1))
    fi
done
pip_args=()
if [ ${#in_image_links[@]} -gt 0 ]; then
    pip_args+=(--build-arg "PIP_FIND_LINKS=${in_image_links[*]}")
    say "handing pip's find-links folder(s) to the build: ${#in_image_links[@]}"
fi
if [ -n "$pip_cert" ] && [ -f "$pip_cert" ]; then
    volumes+=(-v "$pip_cert:/build/pip-cert.pem:ro")
    pip_args+=(--build-arg "PIP_CERT=/build/pip-cert.pem")
    say "handing pip's CA bundle to the build"
fi
[ -n "${PIP_INDEX_URL:-}" ] && pip_args+=(--build-arg "PIP_INDEX_URL=$PIP_INDEX_URL")
[ -n "${PIP_EXTRA_INDEX_URL:-}" ] && pip_args+=(--build-arg "PIP_EXTRA_INDEX_URL=$PIP_EXTRA_INDEX_URL")

# ------------------------------------------------------------------------------------------------ the base
bah() { buildah --storage-driver "$STORAGE_DRIVER" "$@"; }

make_debian_base() {
    if bah inspect --type image "$local_base" >/dev/null 2>&1; then
        say "base: $local_base (cached)"
        return
    fi
    if ! command -v mmdebstrap >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap >/dev/null
        else
            say "mmdebstrap is missing: run 'sudo apt-get install mmdebstrap'"
            exit 1
        fi
    fi
    local sources tmp ctr
    sources=$(ls /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | head -1 || true)
    tmp=$(mktemp -d)
    say "base: building Debian bookworm with mmdebstrap (${sources:-default mirror})"
    # The runtime needs: python3.11 (+venv for the build), libnuma (vLLM's CPU kernels), a C++ compiler and the
    # Python headers (torch.compile's inductor builds its CPU kernels at run time). Docs, man pages and apt lists
    # are left out; the same path as python:3.11-slim's interpreter keeps the Dockerfile base-agnostic.
    mmdebstrap --variant=minbase --quiet \
        --include=ca-certificates,passwd,python3.11,python3.11-venv,python3.11-dev,g++,libnuma1 \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --customize-hook='ln -sf /usr/bin/python3.11 "$1/usr/local/bin/python3.11"' \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
        bookworm "$tmp/rootfs.tar" ${sources:+"$sources"}
    ctr=$(bah from scratch)
    bah add "$ctr" "$tmp/rootfs.tar" / >/dev/null
    bah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd /bin/bash "$ctr"
    bah commit --rm --quiet "$ctr" "$local_base" >/dev/null
    rm -rf "$tmp"
    say "base: $local_base imported"
}

base=${PYTHON_IMAGE:-}
if [ -z "$base" ]; then
    if [ "$engine" = docker ]; then
        base=$upstream_python # a daemon that answers pulls it, or the build says why not
    elif timeout 60 buildah --storage-driver "$STORAGE_DRIVER" pull --quiet "$upstream_python" >/dev/null 2>&1; then
        base=$upstream_python
    else
        say "cannot pull $upstream_python: using a Debian bookworm base made with mmdebstrap"
        make_debian_base
        base=$local_base
    fi
fi
say "base image: $base"

# ------------------------------------------------------------------------------------------------ the disk
# vfs stores every layer as a full copy of the file system: the builder's two big layers, the runtime's copy of the
# venv and the working containers all count. Measured here: the CPU venv is 3.4 GB; the GPU one holds torch's CUDA
# build and the nvidia-* libraries (3.4 GB of wheels, ≈8 GB unpacked). IMAGE_MIN_FREE_GB overrides the estimate.
if [ "$engine" = buildah ] && [ "$STORAGE_DRIVER" = vfs ]; then
    case "$variant" in cpu) need_gb=${IMAGE_MIN_FREE_GB:-20} ;; gpu) need_gb=${IMAGE_MIN_FREE_GB:-45} ;; esac
    store=$(bah info --format '{{.store.GraphRoot}}' 2>/dev/null || echo /var/lib/containers/storage)
    while [ ! -d "$store" ]; do store=$(dirname "$store"); done
    free_gb=$(df -P -B1G "$store" | awk 'NR == 2 {print $4}')
    if [ "$free_gb" -lt "$need_gb" ]; then
        say "not building $variant: ${free_gb} GB free under $store, the vfs build needs about ${need_gb} GB" \
            "(set IMAGE_MIN_FREE_GB to try anyway, or use a Docker daemon / overlay storage)"
        exit 3
    fi
    say "disk: ${free_gb} GB free, about ${need_gb} GB needed"
fi

# ------------------------------------------------------------------------------------------------ the build
args=(--build-arg "VARIANT=$variant" --build-arg "PYTHON_IMAGE=$base" "${pip_args[@]}" -t "$name:$tag" "$root")
start=$(date +%s)
if [ "$engine" = docker ]; then
    [ ${#volumes[@]} -gt 0 ] && say "docker build cannot mount pip's local find-links folders: set PIP_EXTRA_INDEX_URL"
    docker build "${args[@]}"
    size="$(docker image inspect --format '{{.Size}}' "$name:$tag") bytes"
else
    # --layers=false (buildah's default) keeps only the final image: no intermediate layers pile up under vfs.
    bah bud --isolation chroot --layers=false "${volumes[@]}" "${args[@]}"
    size=$(bah images --format '{{.Size}}' "localhost/$name:$tag" 2>/dev/null || echo "?")
fi
say "built $name:$tag in $(($(date +%s) - start)) s, size $size"
