/** IP address parsing, classification and range arithmetic (pure). */
import ipaddr from "ipaddr.js";

export type Family = 4 | 6;

/** An inclusive range of addresses of one family, as integers. */
export interface AddrRange {
  family: Family;
  lo: bigint;
  hi: bigint;
}

const BITS: Record<Family, number> = { 4: 32, 6: 128 };

function parseStrict(text: string): ipaddr.IPv4 | ipaddr.IPv6 | null {
  if (ipaddr.IPv4.isValidFourPartDecimal(text)) return ipaddr.IPv4.parse(text);
  if (text.includes("%") || !text.includes(":")) return null;
  // ipaddr.js reads any dotted tail as IPv4-mapped ("::127.0.0.1" becomes "::ffff:7f00:1");
  // spell the tail as two hex groups so the address keeps its own prefix.
  const tail = /^(.*:)([0-9]+\.[0-9]+\.[0-9]+\.[0-9]+)$/.exec(text);
  if (tail) {
    const quad = tail[2] as string;
    if (!ipaddr.IPv4.isValidFourPartDecimal(quad)) return null;
    const [a, b, c, d] = ipaddr.IPv4.parse(quad).octets as [number, number, number, number];
    text = `${tail[1]}${((a << 8) | b).toString(16)}:${((c << 8) | d).toString(16)}`;
  }
  return ipaddr.IPv6.isValid(text) ? ipaddr.IPv6.parse(text) : null;
}

function toBigInt(addr: ipaddr.IPv4 | ipaddr.IPv6): bigint {
  let n = 0n;
  for (const byte of addr.toByteArray()) n = (n << 8n) | BigInt(byte);
  return n;
}

/** Formats an integer address the way `nft` prints it. */
export function formatAddr(family: Family, n: bigint): string {
  if (family === 4) {
    const v = Number(n);
    return `${v >>> 24}.${(v >>> 16) & 255}.${(v >>> 8) & 255}.${v & 255}`;
  }

  const bytes: number[] = [];
  for (let i = 15; i >= 0; i--) bytes.push(Number((n >> BigInt(i * 8)) & 0xffn));
  return ipaddr.fromByteArray(bytes).toString(); // RFC 5952 compact form, as nft prints it
}

export interface ParsedNet {
  family: Family;
  /** Canonical text: "192.0.2.1" for a host, "10.0.0.0/8" for a network. */
  canonical: string;
  range: AddrRange;
}

/**
 * Parses "192.0.2.1", "2001:db8::1", "10.0.0.0/8" or "2001:db8::/32".
 * Returns an error text (not a throw) so callers can attach location.
 */
export function parseNet(text: string): ParsedNet | { error: string } {
  const slash = text.indexOf("/");
  const addrText = slash === -1 ? text : text.slice(0, slash);
  const addr = parseStrict(addrText);
  if (!addr) return { error: "not an IPv4 or IPv6 address" };
  const family: Family = addr.kind() === "ipv4" ? 4 : 6;
  const bits = BITS[family];
  let len = bits;
  if (slash !== -1) {
    const lenText = text.slice(slash + 1);
    if (!/^[0-9]{1,3}$/.test(lenText) || Number(lenText) > bits) {
      return { error: `invalid prefix length "/${lenText}"; IPv${family} prefixes are 0-${bits}` };
    }
    len = Number(lenText);
  }
  const value = toBigInt(addr);
  const hostBits = BigInt(bits - len);
  const lo = (value >> hostBits) << hostBits;
  const hi = lo | ((1n << hostBits) - 1n);
  if (lo !== value) {
    return {
      error: `host bits are set; the network is ${formatAddr(family, lo)}/${len}`,
    };
  }
  const canonical = len === bits ? formatAddr(family, lo) : `${formatAddr(family, lo)}/${len}`;
  return { family, canonical, range: { family, lo, hi } };
}

/** Why a resolved address must never be allowed, or null when it may be. */
export function forbiddenReason(
  address: string,
  allowPrivate: boolean,
):
  | "invalid"
  | "loopback"
  | "link-local"
  | "unspecified"
  | "multicast"
  | "mapped"
  | "private"
  | null {
  const addr = parseStrict(address);
  if (!addr) return "invalid";
  switch (addr.range()) {
    case "loopback":
      return "loopback";
    case "linkLocal":
      return "link-local";
    case "unspecified":
      return "unspecified";
    case "multicast":
    case "broadcast":
      return "multicast";
    case "ipv4Mapped":
      return "mapped";
    case "private":
    case "uniqueLocal":
    case "carrierGradeNat":
      return allowPrivate ? null : "private";
    default:
      return null;
  }
}

/** Canonical text of a single address (as nft prints it), or null if invalid. */
export function canonicalAddress(address: string): { family: Family; text: string } | null {
  const parsed = parseNet(address);
  if ("error" in parsed || parsed.canonical.includes("/")) return null;
  return { family: parsed.family, text: parsed.canonical };
}

/** The prefix length when [lo, hi] is exactly one network, else null. */
export function prefixLength(range: AddrRange): number | null {
  const size = range.hi - range.lo + 1n;
  if ((size & (size - 1n)) !== 0n) return null;
  if (range.lo % size !== 0n) return null;
  return BITS[range.family] - (size.toString(2).length - 1);
}
