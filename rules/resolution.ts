/** What a DNS answer may contribute to a set: filtering and capping addresses (pure). */
import { canonicalAddress, forbiddenReason } from "./addresses.ts";

export interface Dropped {
  address: string;
  reason: string;
}

/**
 * Keeps the addresses that may be allowed: never loopback, link-local (169.254.0.0/16,
 * fe80::/10), unspecified, multicast or IPv4-mapped; private ranges only when allowed;
 * at most `max` per name, choosing the lowest so the choice does not churn with DNS order.
 */
export function filterAddresses(
  addresses: readonly string[],
  opts: { allowPrivate: boolean; max: number },
): { kept: string[]; dropped: Dropped[] } {
  const dropped: Dropped[] = [];
  const ok = new Set<string>();
  for (const a of addresses) {
    const reason = forbiddenReason(a, opts.allowPrivate);
    const canon = canonicalAddress(a);
    if (reason || !canon) {
      dropped.push({ address: a, reason: reason ?? "invalid" });
      continue;
    }
    ok.add(canon.text);
  }
  const sorted = [...ok].sort(compareAddresses);
  for (const a of sorted.slice(opts.max))
    dropped.push({ address: a, reason: `over maxAddressesPerName (${opts.max})` });
  return { kept: sorted.slice(0, opts.max), dropped };
}

/** IPv4 before IPv6, then numerically. */
export function compareAddresses(a: string, b: string): number {
  const fa = a.includes(":") ? 6 : 4;
  const fb = b.includes(":") ? 6 : 4;
  if (fa !== fb) return fa - fb;
  const key = (s: string) =>
    fa === 4
      ? s
          .split(".")
          .map((x) => x.padStart(3, "0"))
          .join(".")
      : s; // canonical IPv6 text; order only needs to be stable
  return key(a) < key(b) ? -1 : key(a) > key(b) ? 1 : 0;
}
