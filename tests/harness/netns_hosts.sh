#!/usr/bin/env bash
# Two test hosts on this machine: network namespaces lvmA (10.201.0.1) and lvmB (10.201.0.2) on a
# bridge, each run with its own hostname and an /etc/hosts naming both, so a two-node torchrun
# (c10d rendezvous) goes over a real network between them. Made from
# ../shared/reference/netns_two_nodes.sh.
#
# usage: netns_hosts.sh up | down          (as root)
#   BASE  state dir (default /tmp/lvmtrain-netns); `$BASE/nsrun HOST CMD...` runs CMD on HOST
# `up` exits 3 when namespaces cannot be made here (not root, no CAP_SYS_ADMIN): tests skip on it.
set -euo pipefail
BASE=${BASE:-/tmp/lvmtrain-netns}
SUBNET=10.201.0
BRIDGE=lvmbr0
NODES=(lvmA lvmB)

log() { printf '[netns_hosts %s] %s\n' "$(date +%T)" "$*" >&2; }

up() {
  command -v ip >/dev/null && command -v nsenter >/dev/null && command -v unshare >/dev/null \
    || { log "needs ip (iproute2), nsenter and unshare (util-linux)"; exit 3; }
  ip netns add lvmprobe 2>/dev/null && ip netns del lvmprobe || { log "cannot create network namespaces here"; exit 3; }
  mkdir -p "$BASE"
  { echo "127.0.0.1 localhost"; echo "$SUBNET.1 lvmA"; echo "$SUBNET.2 lvmB"; } >"$BASE/hosts"
  # NOTE: nsenter, not `ip netns exec` (which remounts /sys); each host needs its own hostname
  # (own UTS namespace) or torchrun's c10d rendezvous sees one host twice and times out.
  cat >"$BASE/nsrun" <<'NSRUN'
#!/bin/bash
set -e
ns=$1; shift
hosts=$(cd "$(dirname "$0")" && pwd)/hosts
exec nsenter --net=/run/netns/"$ns" unshare --uts --mount --propagation private \
  /bin/bash -c 'mount --bind "$0" /etc/hosts && hostname "$1" && shift && exec "$@"' "$hosts" "$ns" "$@"
NSRUN
  chmod +x "$BASE/nsrun"
  ip link show "$BRIDGE" >/dev/null 2>&1 || {
    ip link add "$BRIDGE" type bridge; ip addr add "$SUBNET.254/24" dev "$BRIDGE"; ip link set "$BRIDGE" up; }
  local i=1 n
  for n in "${NODES[@]}"; do
    if ! ip netns list | grep -qw "$n"; then
      ip netns add "$n"
      ip link add "v$n" type veth peer name "v${n}br"
      ip link set "v$n" netns "$n"
      ip link set "v${n}br" master "$BRIDGE" up
      ip -n "$n" addr add "$SUBNET.$i/24" dev "v$n"
      ip -n "$n" link set lo up
      ip -n "$n" link set "v$n" up
    fi
    i=$((i + 1))
  done
  # the bridge's ports take a moment: wait until lvmA can open a TCP connection to lvmB
  "$BASE/nsrun" lvmB python3 -c "
import socket, subprocess, sys, time
s = socket.socket(); s.bind(('lvmB', 0)); s.listen(8); port = s.getsockname()[1]
probe = f'import socket; socket.create_connection((\"lvmB\", {port}), timeout=1)'
for _ in range(50):
    if subprocess.run(['$BASE/nsrun', 'lvmA', 'python3', '-c', probe], stderr=subprocess.DEVNULL).returncode == 0:
        sys.exit(0)
    time.sleep(0.2)
sys.exit('lvmA cannot reach lvmB')"
  log "up: ${NODES[*]} on $BRIDGE ($SUBNET.0/24)"
}

down() {
  local n pids
  for n in "${NODES[@]}"; do
    pids=$(ip netns pids "$n" 2>/dev/null || true)
    [ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
    ip netns del "$n" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  log "down"
}

case ${1:-} in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
