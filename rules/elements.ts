/**
 * Set elements of `address . protocol . port`: normalising overlapping allowances into
 * disjoint boxes (the kernel rejects overlapping interval elements) and rendering them
 * in the exact form `nft -j list` prints, so listings compare equal (pure).
 */
import { formatAddr, prefixLength, type AddrRange } from "./addresses.ts";
import type { PortRange, Protocol } from "./target.ts";

export interface Allow {
  range: AddrRange;
  protocol: Protocol;
  ports: PortRange;
}

/** An element of a concatenated set in libnftables JSON. */
export type AddrJSON =
  string | { prefix: { addr: string; len: number } } | { range: [string, string] };
export type PortJSON = number | { range: [number, number] };
export interface ConcatElem {
  concat: [AddrJSON, Protocol, PortJSON];
}

function mergeRanges(ranges: AddrRange[]): AddrRange[] {
  const sorted = [...ranges].sort((a, b) => (a.lo < b.lo ? -1 : a.lo > b.lo ? 1 : 0));
  const out: AddrRange[] = [];
  for (const r of sorted) {
    const last = out[out.length - 1];
    if (last && r.lo <= last.hi + 1n) {
      if (r.hi > last.hi) last.hi = r.hi;
    } else {
      out.push({ ...r });
    }
  }
  return out;
}

/**
 * Rewrites allowances of one family into disjoint boxes covering exactly the same
 * (address, protocol, port) points, in a deterministic order.
 */
export function disjoint(allows: readonly Allow[]): Allow[] {
  const out: Allow[] = [];
  for (const protocol of ["tcp", "udp"] as const) {
    const mine = allows.filter((a) => a.protocol === protocol);
    if (!mine.length) continue;
    const cuts = [...new Set(mine.flatMap((a) => [a.ports.low, a.ports.high + 1]))].sort(
      (a, b) => a - b,
    );
    // Each elementary port segment gets the merged address ranges of the allowances covering it;
    // adjacent segments with the same ranges are joined back together.
    let pending: { ports: PortRange; ranges: AddrRange[]; key: string } | null = null;
    const flush = () => {
      if (!pending) return;
      for (const range of pending.ranges) out.push({ range, protocol, ports: pending.ports });
      pending = null;
    };
    for (let i = 0; i + 1 < cuts.length; i++) {
      const low = cuts[i] as number;
      const high = (cuts[i + 1] as number) - 1;
      const covering = mine.filter((a) => a.ports.low <= low && a.ports.high >= high);
      if (!covering.length) {
        flush();
        continue;
      }
      const ranges = mergeRanges(covering.map((a) => a.range));
      const key = ranges.map((r) => `${r.lo}-${r.hi}`).join(",");
      if (pending && pending.key === key && pending.ports.high + 1 === low) {
        pending.ports = { low: pending.ports.low, high };
      } else {
        flush();
        pending = { ports: { low, high }, ranges, key };
      }
    }
    flush();
  }
  return out.sort(
    (a, b) =>
      (a.range.lo < b.range.lo ? -1 : a.range.lo > b.range.lo ? 1 : 0) ||
      a.protocol.localeCompare(b.protocol) ||
      a.ports.low - b.ports.low,
  );
}

/** The address part as nft prints it: a plain address, a prefix, or a range. */
export function addrJSON(range: AddrRange): AddrJSON {
  if (range.lo === range.hi) return formatAddr(range.family, range.lo);
  const len = prefixLength(range);
  if (len !== null) return { prefix: { addr: formatAddr(range.family, range.lo), len } };
  return { range: [formatAddr(range.family, range.lo), formatAddr(range.family, range.hi)] };
}

export function elementJSON(a: Allow): ConcatElem {
  const ports: PortJSON =
    a.ports.low === a.ports.high ? a.ports.low : { range: [a.ports.low, a.ports.high] };
  return { concat: [addrJSON(a.range), a.protocol, ports] };
}

/** Human-readable form, as in nft's text syntax: "10.0.0.0/8 . tcp . 5432". */
export function elementText(e: unknown): string {
  const part = (p: unknown): string => {
    if (typeof p === "string" || typeof p === "number") return String(p);
    if (p && typeof p === "object") {
      const o = p as {
        prefix?: { addr: string; len: number };
        range?: [unknown, unknown];
        concat?: unknown[];
      };
      if (o.prefix) return `${o.prefix.addr}/${o.prefix.len}`;
      if (o.range) return `${part(o.range[0])}-${part(o.range[1])}`;
      if (o.concat) return o.concat.map(part).join(" . ");
    }
    return JSON.stringify(p);
  };
  if (Array.isArray(e)) return `${part(e[0])} : ${JSON.stringify(e[1])}`;
  return part(e);
}
