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

# The container and systemd tests' tools: pasta (passt), podman with slirp4netns and the id
# mappers (uidmap), a static busybox for the image podman imports (no registry), and
# python3, whose datagram socket plays systemd's side of sd_notify in the readiness test.
tools=()
for t in pasta podman slirp4netns newuidmap crun python3; do command -v "$t" >/dev/null || tools+=("$t"); done
[ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1 || tools+=(busybox-static)
if [ ${#tools[@]} -gt 0 ]; then
  echo "installing container test tools for: ${tools[*]}"
  if command -v apt-get >/dev/null; then
    [ -n "${EGRESSD_APT_UPDATED:-}" ] || apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      passt podman slirp4netns uidmap crun busybox-static python3 >/dev/null
  elif command -v dnf >/dev/null; then
    dnf install -y -q passt podman slirp4netns shadow-utils crun busybox python3
  fi
fi

# glibc's nss-resolve module, for the test that hides systemd-resolved's socket. Installing
# Debian's libnss-resolve would edit /etc/nsswitch.conf, so its package is unpacked into
# .cache/ instead (Fedora ships the module with systemd).
if ! ldconfig -p | grep -q libnss_resolve.so.2 && [ ! -e .cache/nss-resolve/unpacked ]; then
  if command -v apt-get >/dev/null; then
    rm -rf .cache/nss-resolve && mkdir -p .cache/nss-resolve
    (cd .cache/nss-resolve && apt-get download -qq -o APT::Sandbox::User=root libnss-resolve \
      && dpkg-deb -x libnss-resolve_*.deb . && touch unpacked)
  elif command -v dnf >/dev/null; then
    dnf install -y -q systemd-resolved
  fi
fi

npm run build
npm run check
npm test
