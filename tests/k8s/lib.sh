# shellcheck shell=bash
# Shared settings and helpers of tests/k8s/{up,down,e2e}. Sourced, not run.
#
# Layout (all overridable through the environment; pins and caches in scripts/tools.sh):
#   $K8S_CACHE      $TESSERA_CACHE/k8s/v<version> (TESSERA_CACHE default /var/cache/tessera):
#                   Kubernetes binaries (bin/), the Go wrapper module they are built from
#                   (src/), a GOCACHE (go-build/) and the pause image. Kept by `down`; a
#                   second run skips every build.
#   $K8S_RUN        /var/lib/tessera-k8s: certificates, kubeconfigs, configs, etcd and
#                   containerd data, logs/ and pids/ of this cluster. `down` removes it
#                   (logs are copied to $K8S_KEEP_LOGS first when that is set).
#   $K8S_SOCK_DIR   /run/tessera-k8s: containerd's socket and state (short paths).
#   /var/lib/kubelet: fixed, the manifests in deploy/ use the default kubelet dir.

TK_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=../../scripts/tools.sh
. "$TK_ROOT/scripts/tools.sh"   # K8S_VERSION, K8S_CACHE, TESSERA_HELM, tessera_check_tools ...
K8S_RUN=${K8S_RUN:-/var/lib/tessera-k8s}
K8S_SOCK_DIR=${K8S_SOCK_DIR:-/run/tessera-k8s}
KUBELET_DIR=/var/lib/kubelet
NODE_NAME=localhost            # the apiserver dials the kubelet by this name
SERVICE_CIDR=10.96.0.0/24      # exists only in the API: no kube-proxy, blackholed on the host
POD_CIDR=10.89.0.0/16
CNI_BRIDGE=tessk8s0
PKI=$K8S_RUN/pki
LOGS=$K8S_RUN/logs
PIDS=$K8S_RUN/pids
CONTAINERD_SOCK=$K8S_SOCK_DIR/containerd.sock
PAUSE_IMAGE=tessera.e2e/pause:1
SNAPSHOT_CRDS=(volumesnapshotclasses.snapshot.storage.k8s.io volumesnapshotcontents.snapshot.storage.k8s.io
  volumesnapshots.snapshot.storage.k8s.io)
# The mutual-TLS Secrets every install mounts (deploy/README.md, "Mutual TLS").
TLS_SECRETS=(tessera-tls-controller tessera-tls-node tessera-tls-replica)
# The SnapshotMetadata API's serving certificate (no identity: kept apart from those).
SNAPSHOT_METADATA_SECRET=tessera-snapshot-metadata-tls
export KUBECONFIG=$K8S_RUN/admin.kubeconfig
# The same fixed PATH as scripts/test: $TESSERA_GO_BIN (helm), $K8S_CACHE/bin (kubectl and
# the cluster's binaries), the toolchains and the system dirs; nothing inherited, so a
# kubectl or helm installed by hand elsewhere is never picked up.
PATH=$(tessera_tools_path)
export PATH

tk_log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
tk_die() { tk_log "FAILED: $*"; exit 1; }

# tk_poll <what> <timeout-s> <cmd...>: runs cmd until it succeeds (1 s between tries:
# polling an observable condition, never a sleep standing in for one).
tk_poll() {
  local what=$1 timeout=$2; shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      tk_log "timed out after ${timeout}s waiting for $what"
      return 1
    fi
    sleep 1
  done
  tk_log "ok: $what"
}

# tk_daemon <name> <cmd...>: starts a host daemon in its own session, logs to $LOGS/<name>.log.
tk_daemon() {
  local name=$1; shift
  mkdir -p "$LOGS" "$PIDS"
  if [ -s "$PIDS/$name" ] && kill -0 "$(cat "$PIDS/$name")" 2>/dev/null; then
    tk_log "$name already running"; return
  fi
  setsid "$@" >>"$LOGS/$name.log" 2>&1 </dev/null &
  echo $! >"$PIDS/$name"
  tk_log "started $name (pid $!, log $LOGS/$name.log)"
}

# tk_require_free_space <dir> <MiB>: fails early, naming the shortage, when the file system
# holding <dir> (etcd, containerd images, kubelet) has less than <MiB> free; otherwise the
# kubelet's disk-pressure taint shows up much later as pods that stay Pending.
tk_require_free_space() {
  local dir=$1 need=$2 have
  have=$(df -Pm "$dir" | awk 'NR == 2 {print $4}')
  [ "${have:-0}" -ge "$need" ] ||
    tk_die "only ${have} MiB free on the file system of $dir; the cluster needs at least ${need} MiB"
  tk_log "free space on the file system of $dir: ${have} MiB"
}

# tk_explain_not_ready: what a failed readiness wait leaves for the reader: the node's
# taints and pressure conditions (a Pending pod is usually a tainted node) and the events
# of every Tessera pod that is not Ready.
tk_explain_not_ready() {
  kubectl -n tessera-system get pods -o wide >&2
  kubectl get node "$NODE_NAME" -o jsonpath='{"taints: "}{.spec.taints}{"\n"}{range .status.conditions[*]}{.type}={.status} {.reason}: {.message}{"\n"}{end}' >&2
  local p
  for p in $(kubectl -n tessera-system get pods -o jsonpath='{range .items[*]}{.metadata.name} {.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | awk '$2 != "True" {print $1}'); do
    echo "--- events of $p" >&2
    kubectl -n tessera-system get events --field-selector "involvedObject.name=$p" -o custom-columns=TYPE:.type,REASON:.reason,MESSAGE:.message >&2
  done
}

# tk_wait_tessera_ready: every Deployment rolled out, every DaemonSet with all its pods
# Ready (engine-host is OnDelete, which `rollout status` refuses), then every pod Ready.
tk_wait_tessera_ready() {
  local w
  for w in $(kubectl -n tessera-system get deployments -o name); do
    kubectl -n tessera-system rollout status "$w" --timeout=240s >&2 || return 1
  done
  for w in $(kubectl -n tessera-system get daemonsets -o name); do
    tk_poll "$w: all pods Ready" 240 bash -c "s=\$(kubectl -n tessera-system get $w -o jsonpath='{.status.desiredNumberScheduled} {.status.numberReady} {.status.updatedNumberScheduled}'); set -- \$s; [ \"\${1:-0}\" -gt 0 ] && [ \"\$1\" = \"\$2\" ] && [ \"\$1\" = \"\${3:-\$1}\" ]" || return 1
  done
  kubectl -n tessera-system wait --for=condition=Ready pod --all --timeout=120s >&2
}

# tk_tessera_cli: prints the path of the operator CLI `tessera` (cli/, for `tessera certs`):
# $TESSERA_BIN_DIR/tessera when TESSERA_BIN_DIR is set (scripts/test: target/debug, which
# its build stage made), else target/release/tessera, built (or brought up to date) here
# with cargo under nice, like scripts/build-images builds the daemons.
tk_tessera_cli() {
  local bin
  if [ -n "${TESSERA_BIN_DIR:-}" ]; then
    bin=$(realpath -m "$TESSERA_BIN_DIR")/tessera
  else
    bin=$TK_ROOT/target/release/tessera
    tk_log "cargo build --release -p tessera-cli (nice 19)"
    (cd "$TK_ROOT" && nice -n 19 cargo build --release --locked -p tessera-cli --bin tessera) >&2 ||
      { tk_log "cargo build --release -p tessera-cli failed"; return 1; }
  fi
  [ -x "$bin" ] || { tk_log "no tessera CLI at $bin"; return 1; }
  echo "$bin"
}
