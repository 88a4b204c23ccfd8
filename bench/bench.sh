#!/usr/bin/env bash
# npm run bench [-- --quick]: benchmarks in throwaway network namespaces, as root.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/ensure-deps.sh
# iperf3 (packet rates) and dnsmasq with nftset support (the DNS-aware mode's peer).
if ! command -v iperf3 >/dev/null || ! command -v dnsmasq >/dev/null; then
  if command -v apt-get >/dev/null; then DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iperf3 dnsmasq-base >/dev/null
  elif command -v dnf >/dev/null; then dnf install -y -q iperf3 dnsmasq
  else echo "install iperf3 and dnsmasq first" >&2; exit 3; fi
fi
npm run build --silent
exec node --import tsx bench/run.ts "$@"
