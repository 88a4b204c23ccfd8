#!/usr/bin/env bash
# A narrated demo of the real egressd and egressctl inside a throwaway network namespace:
# an embedded DNS server, a registered service, allowed and refused connections, and a DNS
# change the daemon picks up. The host's own firewall is never touched.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/ensure-deps.sh
npm run build --silent
exec node --import tsx scripts/demo.ts
