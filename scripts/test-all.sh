#!/usr/bin/env bash
# Sets up everything the test suite needs on a fresh Debian/Ubuntu/Fedora machine with
# Node.js >= 20, then runs it. Must run as root: the system tests create network
# namespaces and load nftables rules inside them (never on the host's own ruleset), and the
# packaging test builds a Debian root with debootstrap.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/ensure-deps.sh

# The packaging test's tools: building (dpkg-deb, dpkg-shlibdeps, rpmbuild, gpg), linting
# (lintian, rpmlint), the unit check (systemd-analyze) and the install test (debootstrap).
tools=()
for t in debootstrap rpmbuild lintian rpmlint gpg systemd-analyze dpkg-shlibdeps; do command -v "$t" >/dev/null || tools+=("$t"); done
if [ ${#tools[@]} -gt 0 ]; then
  echo "installing packaging tools for: ${tools[*]}"
  if command -v apt-get >/dev/null; then
    [ -n "${EGRESSD_APT_UPDATED:-}" ] || apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      debootstrap rpm lintian rpmlint gnupg systemd dpkg-dev >/dev/null
  elif command -v dnf >/dev/null; then
    dnf install -y -q debootstrap rpm-build rpmlint gnupg2 systemd dpkg dpkg-dev lintian
  fi
fi

npm run build
npm run check
npm test
