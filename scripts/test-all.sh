#!/usr/bin/env bash
# Sets up everything the test suite needs on a fresh Debian/Ubuntu/Fedora machine with
# Node.js >= 20, then runs it. Must run as root: the system tests create network
# namespaces and load nftables rules inside them (never on the host's own ruleset).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/ensure-deps.sh
npm run build
npm run check
npm test
