#!/usr/bin/env bash
# Builds the CPU variant's base image without an image registry: Debian bookworm (minbase) made
# by debootstrap from the Debian mirror, Python 3.11 in a venv at /opt/venv on PATH (so that
# `python` and `pip` behave as in the default PyTorch base image), imported into podman.
#
#   sudo docker/debian-base.sh [TAG]        # default TAG: localhost/kubeseg-base:bookworm
#
# Needs root, debootstrap and podman. Idempotent: does nothing when TAG already exists.
set -euo pipefail
TAG=${1:-localhost/kubeseg-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
ENGINE=${CONTAINER_ENGINE:-podman}

if "$ENGINE" image exists "$TAG" 2>/dev/null; then
    echo "debian-base: $TAG exists"; exit 0
fi
for tool in debootstrap "$ENGINE"; do
    command -v "$tool" >/dev/null || { echo "debian-base: $tool not found (apt-get install debootstrap podman)" >&2; exit 1; }
done
[ "$(id -u)" -eq 0 ] || { echo "debian-base: debootstrap needs root" >&2; exit 1; }

work=$(mktemp -d /var/tmp/kubeseg-base.XXXXXX)
trap 'rm -rf "$work"' EXIT
root="$work/root"
# ca-certificates: pip reaches PyPI over TLS inside the build; python3-venv brings ensurepip.
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$root" "$MIRROR"
chroot "$root" python3 -m venv /opt/venv
# what an image does not need: apt lists and caches, docs, man pages
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
       "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/*
tar -C "$root" --numeric-owner -cf "$work/root.tar" .
"$ENGINE" import \
    --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    "$work/root.tar" "$TAG"
echo "debian-base: imported $TAG"
