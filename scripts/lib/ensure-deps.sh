# Sourced by test-all.sh and demo.sh: checks root and Node.js, installs missing system
# packages (Debian/Ubuntu with apt-get, Fedora with dnf), and installs npm dependencies.
if [ "$(id -u)" -ne 0 ]; then
  echo "$(basename "$0"): run as root (sudo bash $0): egressd's tests and demo use network namespaces" >&2
  exit 3
fi
if ! command -v node >/dev/null || ! node -e 'process.exit(+process.versions.node.split(".")[0] >= 20 ? 0 : 1)'; then
  echo "$(basename "$0"): Node.js >= 20 is required (found: $(node --version 2>/dev/null || echo none))" >&2
  echo "  Debian 13 / Ubuntu 24.04: apt-get install nodejs npm    Fedora: dnf install nodejs npm" >&2
  exit 3
fi
need=()
command -v nft >/dev/null || need+=(nft)
command -v ip >/dev/null || need+=(ip)
command -v setpriv >/dev/null || need+=(setpriv)
command -v getent >/dev/null || need+=(getent)
command -v useradd >/dev/null || need+=(useradd)
command -v conntrack >/dev/null || need+=(conntrack)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing system packages for: ${need[*]}"
  if command -v apt-get >/dev/null; then
    [ -n "${EGRESSD_APT_UPDATED:-}" ] || apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables iproute2 util-linux libc-bin passwd conntrack >/dev/null
  elif command -v dnf >/dev/null; then
    dnf install -y -q nftables iproute util-linux glibc-common shadow-utils conntrack-tools
  else
    echo "install nftables, iproute2, util-linux (setpriv), shadow utilities (useradd) and conntrack, then retry" >&2
    exit 3
  fi
fi
if [ ! -d node_modules ] || [ package-lock.json -nt node_modules ]; then
  npm ci --no-audit --no-fund --loglevel=error
fi
