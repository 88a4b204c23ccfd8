#!/usr/bin/env bash
# Sets up everything the test suite needs on a fresh Debian/Ubuntu/Fedora machine with
# Node.js >= 20, then runs it. Must run as root: the system tests create network
# namespaces and load nftables rules inside them (never on the host's own ruleset).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "test-all.sh: run as root (sudo bash scripts/test-all.sh): system tests use network namespaces" >&2
  exit 3
fi

need=()
command -v nft >/dev/null || need+=(nftables)
command -v ip >/dev/null || need+=(iproute2)
command -v setpriv >/dev/null || need+=(util-linux)
command -v getent >/dev/null || need+=(libc-bin)
command -v useradd >/dev/null || need+=(passwd)
if [ ${#need[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
  elif command -v dnf >/dev/null; then
    # Fedora names: iproute, util-linux, glibc-common, shadow-utils
    dnf install -y nftables iproute util-linux shadow-utils
  else
    echo "test-all.sh: install these first: ${need[*]}" >&2
    exit 3
  fi
fi

node -e 'if (+process.versions.node.split(".")[0] < 20) { console.error("Node.js >= 20 is required, found " + process.version); process.exit(3) }'
npm ci --no-audit --no-fund --loglevel=error
npm run build
npm run check
npm test
