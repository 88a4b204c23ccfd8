#!/usr/bin/env bash
# Which address does a cgroup BPF filter (what systemd's IPAddressAllow=/IPAddressDeny= are
# made of) see for a DNS packet that an nftables nat/output rule redirects to 127.0.0.1?
# Attaches a one-address drop filter (attach.c) to a throwaway cgroup, in a throwaway network
# namespace, and sends UDP and TCP to 10.254.0.2:53 from that cgroup as uid 2151, redirected
# to an echo server on 127.0.0.1:5353. As root; needs gcc, python3, nft, a cgroup2 mount.
set -euo pipefail
py=${PYTHON:-/usr/bin/python3}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d); chmod 755 "$work"
cg2=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/mounts)
ns=cgskb-$$
cleanup() {
  [ -n "${echo_pid:-}" ] && kill "$echo_pid" 2>/dev/null || true
  ip netns delete "$ns" 2>/dev/null || true
  for d in "$cg2"/cgskb-$$-*; do [ -d "$d" ] && rmdir "$d"; done
  rm -rf "$work"
}
trap cleanup EXIT
gcc -O1 -o "$work/attach" "$here/attach.c"
cat > "$work/echo.py" <<'PY'
import socket, threading
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("127.0.0.1", 5353))
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("127.0.0.1", 5353)); t.listen()
def tcp():
    while True:
        c, _ = t.accept(); c.send(b"tcp-hello"); c.close()
threading.Thread(target=tcp, daemon=True).start()
while True:
    d, a = u.recvfrom(100); u.sendto(b"echo:" + d, a)
PY
cat > "$work/client.py" <<'PY'
import socket
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(2)
try:
    u.connect(("10.254.0.2", 53)); u.send(b"x"); print("  udp:", u.recv(100))
except Exception as e:
    print("  udp:", repr(e))
t = socket.socket(); t.settimeout(2)
try:
    t.connect(("10.254.0.2", 53)); print("  tcp:", t.recv(100))
except Exception as e:
    print("  tcp:", repr(e))
PY
ip netns add "$ns"
ip -n "$ns" link set lo up
ip -n "$ns" link add v0 type veth peer name v1
ip -n "$ns" addr add 10.254.0.1/30 dev v0
ip -n "$ns" link set v0 up; ip -n "$ns" link set v1 up
printf 'table inet cgskb {\n chain o {\n  type nat hook output priority -100;\n  meta skuid 2151 meta l4proto { tcp, udp } th dport 53 redirect to :5353\n }\n}\n' |
  ip netns exec "$ns" nft -f -
ip netns exec "$ns" "$py" "$work/echo.py" & echo_pid=$!
sleep 1
n=0
try() {
  n=$((n + 1)); local d="$cg2/cgskb-$$-$n"
  mkdir "$d"
  if [ -z "${1:-}" ]; then echo "no filter"; else
    "$work/attach" "$d" "$1" "$2"
    echo "$1 filter dropping $([ "$1" = egress ] && echo destination || echo source) $2"
  fi
  sh -c "echo \$\$ > $d/cgroup.procs; exec ip netns exec $ns setpriv --reuid=2151 --regid=2151 --clear-groups $py $work/client.py"
}
try
try egress 127.0.0.1
try egress 10.254.0.2
try ingress 10.254.0.2
try ingress 127.0.0.1
