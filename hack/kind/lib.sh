# shellcheck shell=bash
# Shared by hack/kind-node-image and hack/kind-images: logging, the Go build
# environment of hack/local-cluster (one cache for both), debootstrap rootfs
# tarballs and buildah images made from them. Everything is cached by version
# under $CACHE; a second run only checks that the results exist.

K8S_VERSION="${DAMOPS_K8S_VERSION:-v1.34.4}"
KIND_VERSION="${DAMOPS_KIND_VERSION:-v0.33.0}"
CACHE="${DAMOPS_CACHE:-$HOME/.cache/damops}"
KIND_CACHE="$CACHE/kind"
KIND_BIN="$CACHE/tools/kind-$KIND_VERSION/kind"
KIND_HACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
HACK_DIR="$(cd "$KIND_HACK_DIR/.." && pwd)"
REPO_ROOT="$(cd "$HACK_DIR/.." && pwd)"
SUITE=bookworm
# root here lacks CAP_SYS_RESOURCE: podman's default nofile rlimit fails without this
export CONTAINERS_CONF="${CONTAINERS_CONF:-$KIND_HACK_DIR/containers.conf}"

log() { printf '[%s %s] %s\n' "$(basename "$0")" "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; exit 1; }

go_env() {  # as hack/local-cluster: GOPATH, module and build caches under $CACHE/go
    command -v go >/dev/null || die "needs Go (builds from the Go module proxy)"
    export GOPATH="$CACHE/go" GOMODCACHE="$CACHE/go/pkg/mod" GOCACHE="$CACHE/go/build-cache"
    export GOFLAGS="-mod=mod -buildvcs=false" CGO_ENABLED=0 GOTOOLCHAIN=local
    export GOMAXPROCS="${DAMOPS_BUILD_PROCS:-2}"
}

# go_tool DIR PKG@VERSION: `go install` a tool into DIR once
go_tool() {
    local dir="$1" pkg="$2" name
    name="${pkg%@*}"; name="${name##*/}"
    [[ -x "$dir/$name" ]] && return 0
    go_env
    mkdir -p "$dir"
    log "go install $pkg"
    GOBIN="$dir" nice -n 10 go install -trimpath -ldflags "-s -w" "$pkg" >"$dir.log" 2>&1 ||
        { tail -20 "$dir.log" >&2; die "go install $pkg failed (log: $dir.log)"; }
}

ensure_kind() { go_tool "$(dirname "$KIND_BIN")" "sigs.k8s.io/kind@$KIND_VERSION"; }

debian_mirror() {
    local m
    m="$(sed -n 's/^URIs: \(http[^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)"
    echo "${m:-http://deb.debian.org/debian}"
}

# unmount whatever is mounted below DIR (debootstrap mounts proc/sys), then remove it
remove_tree() {
    local dir="$1" m
    for m in $(awk '{print $2}' /proc/self/mounts | grep -E "^$dir(/|$)" | sort -r); do umount -l "$m" 2>/dev/null || true; done
    rm -rf --one-file-system "${dir:?}"
}

# rootfs_tar NAME PACKAGES: a cached tarball of `debootstrap --variant=minbase` + PACKAGES
rootfs_tar() {
    local name="$1" pkgs="$2" tar="$CACHE/rootfs/$SUITE-$1.tar" root
    if [[ ! -f "$tar" ]]; then
        command -v debootstrap >/dev/null || die "needs debootstrap (apt-get install debootstrap)"
        mkdir -p "$CACHE/rootfs"
        root="$(mktemp -d "$CACHE/rootfs/$SUITE-$name.XXXXXX")"
        log "debootstrap $SUITE + $pkgs"
        if ! nice -n 10 debootstrap --variant=minbase --include="$pkgs" "$SUITE" "$root" "$(debian_mirror)" >"$root.log" 2>&1; then
            tail -20 "$root.log" >&2
            remove_tree "$root"
            die "debootstrap failed (log: $root.log)"
        fi
        chroot "$root" apt-get clean
        rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/tmp/* "$root"/var/log/*.log 2>/dev/null || true
        local m
        for m in $(awk '{print $2}' /proc/self/mounts | grep -E "^$root/" | sort -r); do umount -l "$m" 2>/dev/null || true; done
        tar -C "$root" --numeric-owner -cf "$tar.$$" .
        mv "$tar.$$" "$tar"
        remove_tree "$root"; rm -f "$root.log"
    fi
    echo "$tar"
}

# trust the host's extra CAs (this workplace's egress) inside a mounted rootfs
add_host_cas() {
    local mnt="$1"
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null && [[ -d "$mnt/usr/local/share/ca-certificates" ]]; then
        cp /usr/local/share/ca-certificates/*.crt "$mnt/usr/local/share/ca-certificates/"
        chroot "$mnt" update-ca-certificates >/dev/null 2>&1 || true
    fi
}

# commit_replacing CONTAINER IMAGE: commit, then drop the image IMAGE named before (a rebuild
# would otherwise leave a dangling GB behind each time)
commit_replacing() {
    local old; old="$(buildah inspect --type image --format '{{.FromImageID}}' "$2" 2>/dev/null || true)"
    buildah commit -q "$1" "$2" >/dev/null
    [[ -n "$old" && "$old" != "$(buildah inspect --type image --format '{{.FromImageID}}' "$2")" ]] && buildah rmi "$old" >/dev/null 2>&1
    return 0
}

image_exists() { buildah inspect --type image "$1" >/dev/null 2>&1; }
image_label() { buildah inspect --type image --format "{{index .ImageAnnotations \"$2\"}}{{index .OCIv1.Config.Labels \"$2\"}}" "$1" 2>/dev/null; }

# save_archive IMAGE TAR: a docker-archive of IMAGE (for ctr import / kind load image-archive)
save_archive() {
    rm -f "$2.tmp"
    buildah push -q "$1" "docker-archive:$2.tmp:$1" >/dev/null
    mv "$2.tmp" "$2"
}

# a hash of the given files and strings: the cache key of an image built from them
cache_key() {
    # contents only: the key must not depend on how a file was named (relative or absolute)
    { for a in "$@"; do if [[ -f "$a" ]]; then sha256sum <"$a"; else echo "$a"; fi; done; } | sha256sum | cut -c1-16
}
