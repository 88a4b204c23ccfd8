/**
 * What an address learned from DNS may become: the one filter every DNS-derived address goes
 * through (refresh loop, DNS proxy, saved state), and the classifier behind it (pure).
 *
 * Only globally routable unicast passes. Never, whatever the config: loopback, unspecified,
 * link-local, multicast, broadcast, reserved, site-local, known cloud metadata addresses, and
 * any address of the host itself. IPv6 forms that carry an IPv4 address (mapped, compatible,
 * NAT64, 6to4, Teredo) are judged by the IPv4 they carry. Private, shared (100.64/10) and
 * unique-local space only when private addresses are allowed. Documentation ranges pass.
 */
import { parseNet, type Family } from "./addresses.ts";

export type AddressClass =
  | "global"
  | "documentation"
  | "private"
  | "shared"
  | "unique-local"
  | "loopback"
  | "unspecified"
  | "link-local"
  | "multicast"
  | "broadcast"
  | "reserved"
  | "site-local"
  | "metadata";

/** Classes allowed only with `refresh.allowPrivateAddresses`. */
const PRIVATE_CLASSES: ReadonlySet<AddressClass> = new Set(["private", "shared", "unique-local"]);

/** Cloud metadata and platform endpoints: never reachable through a name. */
export const METADATA_ADDRESSES: readonly string[] = [
  "169.254.169.254", // AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle
  "169.254.170.2", // AWS ECS task metadata
  "169.254.170.23", // AWS EKS pod identity
  "100.100.100.200", // Alibaba Cloud
  "168.63.129.16", // Azure wire server
  "fd00:ec2::254", // AWS IMDS over IPv6
  "fd00:ec2::23", // AWS EKS pod identity over IPv6
];
const METADATA = new Set(METADATA_ADDRESSES);

interface Range {
  lo: bigint;
  hi: bigint;
  cls: AddressClass;
}

function range(cidr: string, cls: AddressClass): Range {
  const net = parseNet(cidr);
  if ("error" in net) throw new Error(`bad built-in range ${cidr}`);
  return { lo: net.range.lo, hi: net.range.hi, cls };
}

/** Special-purpose IPv4 space (IANA registry); most specific first. Everything else is global. */
const V4: readonly Range[] = [
  range("255.255.255.255/32", "broadcast"),
  range("0.0.0.0/32", "unspecified"),
  range("0.0.0.0/8", "reserved"),
  range("10.0.0.0/8", "private"),
  range("100.64.0.0/10", "shared"),
  range("127.0.0.0/8", "loopback"),
  range("169.254.0.0/16", "link-local"),
  range("172.16.0.0/12", "private"),
  range("192.0.0.0/24", "reserved"),
  range("192.0.2.0/24", "documentation"),
  range("192.88.99.0/24", "reserved"),
  range("192.168.0.0/16", "private"),
  range("198.18.0.0/15", "reserved"),
  range("198.51.100.0/24", "documentation"),
  range("203.0.113.0/24", "documentation"),
  range("224.0.0.0/4", "multicast"),
  range("240.0.0.0/4", "reserved"),
];

/** IPv6 space that is not an IPv4 carrier; most specific first. Outside 2000::/3 is reserved. */
const V6: readonly Range[] = [
  range("::/128", "unspecified"),
  range("::1/128", "loopback"),
  range("100::/64", "reserved"),
  range("2001:db8::/32", "documentation"),
  range("2001::/23", "reserved"),
  range("3fff::/20", "documentation"),
  range("5f00::/16", "reserved"),
  range("fc00::/7", "unique-local"),
  range("fe80::/10", "link-local"),
  range("fec0::/10", "site-local"),
  range("ff00::/8", "multicast"),
];
const GLOBAL6 = range("2000::/3", "global");

const V4_MASK = (1n << 32n) - 1n;

/** IPv6 prefixes that carry an IPv4 address, and where. */
const CARRIERS: readonly { net: Range; name: string; extract: (v: bigint) => bigint[] }[] = [
  { net: range("::ffff:0:0/96", "global"), name: "IPv4-mapped", extract: (v) => [v & V4_MASK] },
  // ::/96 minus :: and ::1, which the table above classifies first.
  { net: range("::/96", "global"), name: "IPv4-compatible", extract: (v) => [v & V4_MASK] },
  { net: range("64:ff9b::/96", "global"), name: "NAT64", extract: (v) => [v & V4_MASK] },
  {
    // RFC 8215 local-use NAT64: the operator picks the prefix length. A /96 prefix leaves bits
    // 48-95 zero and carries the IPv4 in the last 32 bits; otherwise read it as a /48 (RFC 6052).
    net: range("64:ff9b:1::/48", "global"),
    name: "NAT64 (local use)",
    extract: (v) =>
      ((v >> 32n) & ((1n << 48n) - 1n)) === 0n
        ? [v & V4_MASK]
        : [(((v >> 64n) & 0xffffn) << 16n) | ((v >> 40n) & 0xffffn)],
  },
  { net: range("2002::/16", "global"), name: "6to4", extract: (v) => [(v >> 80n) & V4_MASK] },
  {
    // Teredo: the server's IPv4, and the client's, stored inverted.
    net: range("2001::/32", "global"),
    name: "Teredo",
    extract: (v) => [(v >> 64n) & V4_MASK, ~v & V4_MASK],
  },
];

function lookup(table: readonly Range[], v: bigint): AddressClass | null {
  for (const r of table) if (v >= r.lo && v <= r.hi) return r.cls;
  return null;
}

function formatV4(v: bigint): string {
  const n = Number(v);
  return `${n >>> 24}.${(n >>> 16) & 255}.${(n >>> 8) & 255}.${n & 255}`;
}

export interface Classified {
  /** Canonical text, as nft prints it. */
  address: string;
  family: Family;
  cls: AddressClass;
  /** For an IPv6 form that carries IPv4: the form and the carried addresses. */
  carrier?: { name: string; ipv4: string[] };
}

/** Classifies one address (no prefix). Null when the text is not an address. */
export function classify(text: string): Classified | null {
  const net = parseNet(text);
  if ("error" in net || net.range.lo !== net.range.hi) return null;
  const v = net.range.lo;
  const address = net.canonical;
  if (METADATA.has(address)) return { address, family: net.family, cls: "metadata" };
  if (net.family === 4) return { address, family: 4, cls: lookup(V4, v) ?? "global" };
  const direct = lookup(V6, v);
  if (direct === "unspecified" || direct === "loopback") return { address, family: 6, cls: direct };
  for (const c of CARRIERS) {
    if (v < c.net.lo || v > c.net.hi) continue;
    return {
      address,
      family: 6,
      cls: "global",
      carrier: { name: c.name, ipv4: c.extract(v).map(formatV4) },
    };
  }
  if (direct) return { address, family: 6, cls: direct };
  return { address, family: 6, cls: v >= GLOBAL6.lo && v <= GLOBAL6.hi ? "global" : "reserved" };
}

export interface FilterSettings {
  allowPrivateAddresses: boolean;
  /** The host's own addresses (canonical text). */
  hostAddresses: ReadonlySet<string>;
}

const REASON: Record<AddressClass, string> = {
  global: "",
  documentation: "",
  private: "private",
  shared: "shared address space (100.64.0.0/10)",
  "unique-local": "unique-local",
  loopback: "loopback",
  unspecified: "unspecified",
  "link-local": "link-local",
  multicast: "multicast",
  broadcast: "broadcast",
  reserved: "reserved",
  "site-local": "site-local (deprecated)",
  metadata: "cloud metadata",
};

function verdict(c: Classified, s: FilterSettings): string | null {
  const open = c.cls === "global" || c.cls === "documentation" || PRIVATE_CLASSES.has(c.cls);
  if (!open) return REASON[c.cls];
  if (s.hostAddresses.has(c.address)) return "an address of this host";
  if (PRIVATE_CLASSES.has(c.cls) && !s.allowPrivateAddresses)
    return `${REASON[c.cls]}, and refresh.allowPrivateAddresses is false`;
  return null;
}

/**
 * Why an address from DNS must not be allowed, or null when it may. The reason names the
 * class ("loopback", "cloud metadata", "NAT64 of 127.0.0.1: loopback", ...).
 */
export function refuseReason(text: string, s: FilterSettings): string | null {
  const c = classify(text);
  if (!c) return "not an address";
  const own = verdict(c, s);
  if (own || !c.carrier) return own;
  for (const ipv4 of c.carrier.ipv4) {
    const inner = classify(ipv4);
    const why = inner && verdict(inner, s);
    if (why) return `${c.carrier.name} of ${ipv4}: ${why}`;
  }
  return null;
}

export interface Dropped {
  address: string;
  reason: string;
}

/** The fix offered with every dropped address. */
export const DROPPED_HINT =
  "to allow such an address, allow it by IP or CIDR (egressctl allow SERVICE ADDRESS:PORT)";

/**
 * Splits addresses into those that may be allowed (canonical, unique, sorted: IPv4 first, then
 * numerically) and those that may not, with the reason.
 */
export function filterAddresses(
  addresses: Iterable<string>,
  s: FilterSettings,
): { kept: string[]; dropped: Dropped[] } {
  const dropped: Dropped[] = [];
  const kept = new Set<string>();
  for (const a of addresses) {
    const reason = refuseReason(a, s);
    if (reason) dropped.push({ address: classify(a)?.address ?? a, reason });
    else kept.add(classify(a)?.address as string);
  }
  return { kept: sortAddresses(kept), dropped };
}

type Parsed = ReturnType<typeof parseNet>;

function compareParsed(a: string, pa: Parsed, b: string, pb: Parsed): number {
  if ("error" in pa || "error" in pb) return a < b ? -1 : a > b ? 1 : 0;
  if (pa.family !== pb.family) return pa.family - pb.family;
  return pa.range.lo < pb.range.lo ? -1 : pa.range.lo > pb.range.lo ? 1 : 0;
}

/**
 * `addresses` IPv4 before IPv6, then numerically; each parsed once (a comparator that parsed
 * both sides at every comparison cost milliseconds per proxy transaction on a set of 1,500).
 */
export function sortAddresses(addresses: Iterable<string>): string[] {
  return [...addresses]
    .map((a) => ({ a, p: parseNet(a) }))
    .sort((x, y) => compareParsed(x.a, x.p, y.a, y.p))
    .map((x) => x.a);
}
