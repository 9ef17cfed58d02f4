# shellcheck shell=bash
# The tools the test command (scripts/test) calls: where they come from, their pinned
# versions, the cache they are installed in, the PATH every test script runs with, and
# the guard that checks all of it. Sourced (not run) by scripts/setup, scripts/test,
# scripts/check-tools, scripts/csi-sanity, scripts/build-images, deploy/check and
# tests/k8s/lib.sh, so each pin and each cache path is written down once.
#
# Caches (all derive from TESSERA_CACHE; point it at an empty directory to simulate a
# fresh machine):
#   TESSERA_CACHE        /var/cache/tessera
#   TESSERA_GO_BIN       $TESSERA_CACHE/go-bin           csi-sanity, helm (scripts/setup)
#   K8S_CACHE            $TESSERA_CACHE/k8s/v$K8S_VERSION Kubernetes binaries (tests/k8s/up build)
#   TESSERA_IMAGE_CACHE  $TESSERA_CACHE                  rootfs/, sidecars/, src/, images/ (scripts/build-images)
#   TESSERA_FUZZ_TARGET  $TESSERA_CACHE/fuzz-target      the fuzz targets' cargo target dir (scripts/fuzz)
#   GOMODCACHE, GOCACHE  $TESSERA_CACHE/go/{mod,build}   Go's module and build caches for every Go
#                                                        build of the scripts (unless set; the
#                                                        Kubernetes build uses $K8S_CACHE/go-build)
#
# Who installs what (and the guard, scripts/check-tools <group>, checks exactly this):
#   setup   scripts/setup: Debian packages (fuse3 e2fsprogs xfsprogs fio util-linux mount
#           build-essential iproute2 iptables; the fault suite's test hosts), Rust through
#           rustup when cargo is missing (>= the workspace's
#           rust-version), csi-sanity $CSI_TEST_VERSION and helm $HELM_VERSION built with Go
#           into $TESSERA_GO_BIN
#   k8s     tests/k8s/up deps + build: Debian packages (etcd-server containerd runc
#           containernetworking-plugins iptables conntrack openssl gcc curl iproute2
#           python3 python3-yaml debootstrap) and Kubernetes v$K8S_VERSION built into
#           $K8S_CACHE/bin; helm from setup
#   deploy  deploy/check: helm, kubectl (from the two above), python3 with Debian's PyYAML
# A Go-built tool is accepted only when `go version -m` names the pinned module version; a
# Debian tool only when the file the PATH finds belongs to the expected Debian package. A
# copy installed by hand (another helm on the PATH, kubectl from a cloud SDK, python3 from
# pyenv, a binary in /usr/local/bin) is never used: the scripts run with tessera_tools_path
# (no inherited PATH entries, no /usr/local/bin) and the guard fails when a tool resolves
# to anything but the copy the project's scripts installed.

TESSERA_CACHE=${TESSERA_CACHE:-/var/cache/tessera}
TESSERA_GO_BIN=${TESSERA_GO_BIN:-$TESSERA_CACHE/go-bin}
TESSERA_IMAGE_CACHE=${TESSERA_IMAGE_CACHE:-$TESSERA_CACHE}
K8S_VERSION=${K8S_VERSION:-1.34.4}
K8S_CACHE=${K8S_CACHE:-$TESSERA_CACHE/k8s/v$K8S_VERSION}
export TESSERA_CACHE TESSERA_GO_BIN TESSERA_IMAGE_CACHE K8S_VERSION K8S_CACHE
# Go's own caches too, so an empty $TESSERA_CACHE is a cold start for every Go build.
export GOMODCACHE=${GOMODCACHE:-$TESSERA_CACHE/go/mod} GOCACHE=${GOCACHE:-$TESSERA_CACHE/go/build}

CSI_TEST_MODULE=github.com/kubernetes-csi/csi-test/v5
CSI_TEST_VERSION=v5.6.0
HELM_MODULE=helm.sh/helm/v3
HELM_VERSION=v3.22.0
# The pinned binaries, by absolute path: scripts call these, never a PATH lookup's guess.
TESSERA_HELM=$TESSERA_GO_BIN/helm
TESSERA_CSI_SANITY=$TESSERA_GO_BIN/csi-sanity
TESSERA_KUBECTL=$K8S_CACHE/bin/kubectl
K8S_CMDS=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl)

# Go: /usr/local/go when present (scripts/setup's choice), else Debian's golang-go.
tessera_go_root_bin() { if [ -x /usr/local/go/bin/go ]; then echo /usr/local/go/bin; else echo /usr/bin; fi; }

# The PATH every test script runs with: the pinned caches first, the Go and Rust
# toolchains, then the system directories dpkg fills. Nothing inherited.
tessera_tools_path() {
  printf '%s' "$TESSERA_GO_BIN:$K8S_CACHE/bin:$(tessera_go_root_bin):${CARGO_HOME:-$HOME/.cargo}/bin:/usr/sbin:/usr/bin:/sbin:/bin"
}

# The workspace's rust-version (Cargo.toml), the minimum toolchain.
tessera_rust_version() {
  sed -n 's/^rust-version *= *"\(.*\)"/\1/p' "$(dirname "${BASH_SOURCE[0]}")/../Cargo.toml" | head -n1
}

# tessera_go_pinned <binary> <module> <version>: the binary's Go build info names
# <module> at <version> (as the main module or a dependency).
tessera_go_pinned() {
  [ -x "$1" ] && command -v go >/dev/null 2>&1 &&
    go version -m "$1" 2>/dev/null |
    awk -v m="$2" -v v="$3" '($1 == "mod" || $1 == "dep") && $2 == m && $3 == v { ok = 1 } END { exit !ok }'
}

# tessera_helm_pinned <binary>: helm at $HELM_VERSION, built with the release's version
# ldflags (its own version string says so; without them it would report "v3.22").
tessera_helm_pinned() {
  tessera_go_pinned "$1" "$HELM_MODULE" "$HELM_VERSION" &&
    [ "$("$1" version --template '{{.Version}}' 2>/dev/null)" = "$HELM_VERSION" ]
}

# tessera_deb_owners <path>: the Debian packages owning <path> (also tried: without /usr,
# with /usr, and the symlink's target: merged-/usr systems list /sbin/x for /usr/sbin/x).
tessera_deb_owners() {
  local p=$1 r c
  r=$(realpath -e "$p" 2>/dev/null || echo "$p")
  for c in "$p" "${p#/usr}" "/usr$p" "$r" "${r#/usr}" "/usr$r"; do
    dpkg-query -S "$c" 2>/dev/null | awk -F': ' -v f="$c" '$2 == f && $1 !~ /^diversion/ { gsub(/, /, "\n", $1); print $1 }'
  done | sed 's/:.*//' | sort -u
}

# ---------------------------------------------------------------- the guard
_tt_fail=0
_tt_ok() { printf '  ok    %-26s %s\n' "$1" "$2"; }
_tt_bad() { printf '  FAIL  %-26s %s\n' "$1" "$2"; _tt_fail=1; }

# _tt_resolves <cmd> <expected path>: the PATH lookup finds exactly that file.
_tt_resolves() {
  local got; got=$(command -v "$1" 2>/dev/null || true)
  if [ "$got" != "$2" ]; then
    _tt_bad "$1" "the PATH finds ${got:-nothing}, not the pinned $2"
    return 1
  fi
}

# _tt_deb <cmd-or-path> <package>...: found on the PATH (or the absolute path exists) and
# owned by one of the packages. _tt_deb_as <label> <cmd-or-path> <package>...: the same,
# reported under <label>.
_tt_deb() { _tt_deb_as "$1" "$@"; }
_tt_deb_as() {
  local label=$1 cmd=$2; shift 2
  local p owners pkg
  if [[ $cmd == /* ]]; then p=$cmd; [ -e "$p" ] || p=""; else p=$(command -v "$cmd" 2>/dev/null || true); fi
  if [ -z "$p" ]; then _tt_bad "$label" "not found (Debian package $*)"; return; fi
  owners=$(tessera_deb_owners "$p")
  for pkg in "$@"; do
    if grep -qx "$pkg" <<<"$owners"; then
      _tt_ok "$label" "$p (Debian $pkg $(dpkg-query -W -f='${Version}' "$pkg" 2>/dev/null))"
      return
    fi
  done
  _tt_bad "$label" "$p is not from Debian package $* (owned by: ${owners:-no package}; installed by hand?)"
}

# _tt_missing <name> <pinned path> <what installs it>: reports a missing pinned binary and
# any other copy the PATH would find instead (which is never used).
_tt_missing() {
  local other; other=$(command -v "$1" 2>/dev/null || true)
  _tt_bad "$1" "missing: $2 ($3)${other:+; the PATH finds $other instead, which is not the pinned copy and is not used}"
}

_tt_go_tool() { # <name> <pinned path> <module> <version> <installer> [check-command]
  local name=$1 path=$2 mod=$3 ver=$4 how=$5 extra=${6:-}
  if [ ! -x "$path" ]; then _tt_missing "$name" "$path" "$how installs $mod@$ver"; return; fi
  _tt_resolves "$name" "$path" || return
  if ! tessera_go_pinned "$path" "$mod" "$ver"; then
    _tt_bad "$name" "$path is not $mod@$ver by its Go build info (rerun $how)"; return
  fi
  if [ -n "$extra" ] && ! "$extra" "$path"; then
    _tt_bad "$name" "$path is $mod@$ver but fails $extra (rerun $how)"; return
  fi
  _tt_ok "$name" "$path ($mod@$ver)"
}

_tt_group_setup() {
  local go_bin; go_bin=$(tessera_go_root_bin)/go
  if [ -x "$go_bin" ] && _tt_resolves go "$go_bin"; then
    if [ "$go_bin" = /usr/bin/go ]; then _tt_deb go golang-go; else _tt_ok go "$go_bin ($("$go_bin" env GOVERSION))"; fi
  elif [ ! -x "$go_bin" ]; then
    _tt_bad go "no Go toolchain (/usr/local/go or Debian golang-go; scripts/setup installs it)"
  fi
  local cargo_bin=${CARGO_HOME:-$HOME/.cargo}/bin want have
  if [ -x "$cargo_bin/cargo" ] && _tt_resolves cargo "$cargo_bin/cargo" && _tt_resolves rustc "$cargo_bin/rustc"; then
    want=$(tessera_rust_version); have=$(rustc --version | awk '{print $2}')
    if [ "$(printf '%s\n%s\n' "$want" "$have" | sort -V | head -n1)" = "$want" ]; then
      _tt_ok cargo "$cargo_bin/cargo (rustc $have >= rust-version $want)"
    else
      _tt_bad cargo "rustc $have is older than the workspace's rust-version $want"
    fi
    cargo fmt --version >/dev/null 2>&1 && _tt_ok "cargo fmt" "$(cargo fmt --version)" || _tt_bad "cargo fmt" "rustfmt missing (rustup component add rustfmt)"
    cargo clippy --version >/dev/null 2>&1 && _tt_ok "cargo clippy" "$(cargo clippy --version)" || _tt_bad "cargo clippy" "clippy missing (rustup component add clippy)"
  elif [ ! -x "$cargo_bin/cargo" ]; then
    _tt_bad cargo "missing: $cargo_bin/cargo (scripts/setup installs Rust with rustup)"
  fi
  _tt_go_tool csi-sanity "$TESSERA_CSI_SANITY" "$CSI_TEST_MODULE" "$CSI_TEST_VERSION" scripts/setup
  # tessera_helm_pinned: also its version string, i.e. built with the release ldflags.
  _tt_go_tool helm "$TESSERA_HELM" "$HELM_MODULE" "$HELM_VERSION" scripts/setup tessera_helm_pinned
  _tt_deb fio fio
  _tt_deb mkfs.ext4 e2fsprogs; _tt_deb e2fsck e2fsprogs; _tt_deb resize2fs e2fsprogs
  _tt_deb mkfs.xfs xfsprogs; _tt_deb xfs_growfs xfsprogs
  _tt_deb fusermount3 fuse3
  _tt_deb blkid util-linux; _tt_deb losetup mount; _tt_deb mount mount; _tt_deb umount mount
  _tt_deb gcc gcc; _tt_deb make make
  _tt_deb ip iproute2; _tt_deb tc iproute2; _tt_deb iptables iptables; _tt_deb nsenter util-linux
  _tt_deb blkdiscard util-linux
}

_tt_python_yaml() {
  _tt_deb python3 python3-minimal
  local f
  f=$(python3 -c 'import yaml; print(yaml.__file__)' 2>/dev/null || true)
  if [ -z "$f" ]; then _tt_bad "python3: import yaml" "PyYAML missing (Debian python3-yaml)"; return; fi
  _tt_deb_as "python3: import yaml" "$f" python3-yaml
}

_tt_group_k8s() {
  local c
  for c in "${K8S_CMDS[@]}"; do
    _tt_go_tool "$c" "$K8S_CACHE/bin/$c" k8s.io/kubernetes "v$K8S_VERSION" "tests/k8s/up build"
  done
  _tt_go_tool helm "$TESSERA_HELM" "$HELM_MODULE" "$HELM_VERSION" scripts/setup tessera_helm_pinned
  _tt_deb etcd etcd-server
  _tt_deb containerd containerd; _tt_deb ctr containerd
  _tt_deb runc runc
  for c in bridge host-local loopback; do _tt_deb_as "cni $c" "/usr/lib/cni/$c" containernetworking-plugins; done
  _tt_deb iptables iptables; _tt_deb ip6tables iptables
  _tt_deb conntrack conntrack
  _tt_deb openssl openssl
  _tt_deb gcc gcc
  _tt_deb curl curl
  _tt_deb ip iproute2
  _tt_deb debootstrap debootstrap
  _tt_python_yaml
}

# deploy/check calls helm and kubectl by path ($TESSERA_HELM, $TESSERA_KUBECTL, which
# HELM=/KUBECTL= may point elsewhere), so no PATH lookup is checked for them.
_tt_group_deploy() {
  if [ ! -x "$TESSERA_HELM" ]; then _tt_missing helm "$TESSERA_HELM" "scripts/setup builds helm $HELM_VERSION"
  elif tessera_helm_pinned "$TESSERA_HELM"; then _tt_ok helm "$TESSERA_HELM ($HELM_VERSION)"
  else _tt_bad helm "$TESSERA_HELM is not helm $HELM_VERSION with the release ldflags (rerun scripts/setup)"; fi
  if [ ! -x "$TESSERA_KUBECTL" ]; then _tt_missing kubectl "$TESSERA_KUBECTL" "tests/k8s/up build builds Kubernetes v$K8S_VERSION"
  elif tessera_go_pinned "$TESSERA_KUBECTL" k8s.io/kubernetes "v$K8S_VERSION"; then _tt_ok kubectl "$TESSERA_KUBECTL (k8s.io/kubernetes v$K8S_VERSION)"
  else _tt_bad kubectl "$TESSERA_KUBECTL is not k8s.io/kubernetes v$K8S_VERSION by its Go build info"; fi
  _tt_python_yaml
  _tt_deb openssl openssl
}

# tessera_check_tools <group>...: checks every tool of the groups (setup, k8s, deploy);
# prints one line per tool; returns non-zero when any is missing, of another version, or
# not the copy the project's scripts installed.
tessera_check_tools() {
  local g
  _tt_fail=0
  for g in "$@"; do
    declare -F "_tt_group_$g" >/dev/null || { echo "unknown tool group $g" >&2; return 2; }
    printf 'tools (%s):\n' "$g"
    "_tt_group_$g"
  done
  if [ $_tt_fail -ne 0 ]; then
    printf 'tools: FAILED: a tool above is missing or is not the pinned copy the project scripts install (PATH=%s)\n' "$PATH"
    return 1
  fi
}
