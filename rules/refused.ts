/**
 * The refused-destination record (pure): two shared sets the kernel fills from every service's
 * refuse path (`update @refused4 { 2001 . ip daddr . meta l4proto . tcp dport }`), each element
 * with a packet and byte counter and a timeout the next refused packet refreshes. egressd never
 * writes their elements: reconcile and the audit leave them alone (see docs/observability.md).
 * Here: the sets and rules compiled, the parse of a set listing into entries, names attached,
 * and the text `egressctl refused` prints.
 */
import type { Family } from "./addresses.ts";
import type { Expr, SetDef } from "./ruleset.ts";

/** `"refused"` in egressd.json: size 0 turns the record off (no sets, no rules). */
export interface RefusedConfig {
  /** Most elements each set holds; a full set records nothing new (verdicts never change). */
  size: number;
  /** Seconds an element lives after the last refused packet to its destination. */
  timeoutSeconds: number;
}

export const REFUSED_DEFAULT: RefusedConfig = { size: 65536, timeoutSeconds: 3600 };
export const REFUSED_OFF: RefusedConfig = { size: 0, timeoutSeconds: 3600 };

/** The set each family's refusals go to. */
export const REFUSED_SET: Record<Family, string> = { 4: "refused4", 6: "refused6" };

/** One destination a service was refused (or, in audit mode, would have been). */
export interface RefusedEntry {
  service: string;
  address: string;
  family: 4 | 6;
  protocol: "tcp" | "udp";
  port: number;
  packets: number;
  bytes: number;
  /** Seconds since the last refused packet to it (the set's timeout minus what is left). */
  lastSeenSeconds: number;
  /** Names the daemon knows this address came from (resolved for a policy, learned by a proxy). */
  names: string[];
}

/** The two record sets (none when the size is 0). Keyed on the service's uid, a constant of its chain. */
export function refusedSets(c: RefusedConfig): SetDef[] {
  if (c.size <= 0) return [];
  return ([4, 6] as const).map((family) => ({
    name: REFUSED_SET[family],
    type: ["uid", family === 4 ? "ipv4_addr" : "ipv6_addr", "inet_proto", "inet_service"],
    flags: ["timeout"],
    elem: [],
    dynamic: { size: c.size, timeoutSeconds: c.timeoutSeconds },
  }));
}

/**
 * `update @refused4 { <uid> . ip daddr . meta l4proto . tcp dport }`, the same
 * for udp, and the IPv6 twins, in the form nft lists them (nft adds the `meta nfproto` dependency of
 * `ip daddr` itself). Their own rules: when a set is full the update fails and the rule ends
 * there, so the chain goes on to its verdict exactly as without them. The key's first part is
 * the service's uid as a constant, so a socket reaching the chain through its group is recorded
 * under the service too. ICMP has no port: not recorded.
 */
export function recordRules(uid: number): Expr[][] {
  // One rule per family and protocol, not `meta l4proto { tcp, udp }`: each such anonymous set
  // is a set of its own to nft, and libnftables' cost of every transaction grows with the
  // number of sets (measured on nft 1.0.6 with 1,000 services: loading the table 396 ms with
  // anonymous sets against 145 ms like this, one element add 8 ms against 4 ms).
  return ([4, 6] as const).flatMap((family) =>
    // `tcp dport` carries its own `meta l4proto tcp` dependency, which nft adds and lists
    // without (so the audit compares this form).
    (["tcp", "udp"] as const).map((protocol) => [
      {
        set: {
          op: "update",
          elem: {
            concat: [
              uid,
              { payload: { protocol: family === 4 ? "ip" : "ip6", field: "daddr" } },
              { meta: { key: "l4proto" } },
              { payload: { protocol, field: "dport" } },
            ],
          },
          set: `@${REFUSED_SET[family]}`,
        },
      },
    ]),
  );
}

/** One element of a record set as listed, before names and services are attached. */
export interface RawRefused {
  uid: number;
  address: string;
  family: Family;
  protocol: "tcp" | "udp";
  port: number;
  packets: number;
  bytes: number;
  lastSeenSeconds: number;
}

type Obj = Record<string, unknown>;

/**
 * The elements of an `nft -j list set inet TABLE refused4|6` listing (null: no such set).
 * Last seen is the set's (or the element's own) timeout minus the seconds left: the kernel
 * refreshes the timeout on every update. Anything not shaped like a record element is skipped.
 */
export function parseRefusedListing(listing: unknown): RawRefused[] {
  const items = ((listing as { nftables?: unknown[] } | null)?.nftables ?? []) as Obj[];
  const out: RawRefused[] = [];
  for (const item of items) {
    const set = item.set as Obj | undefined;
    if (!set || typeof set !== "object" || !Array.isArray(set.elem)) continue;
    const family: Family | null =
      set.name === REFUSED_SET[4] ? 4 : set.name === REFUSED_SET[6] ? 6 : null;
    if (family === null) continue;
    const setTimeout = typeof set.timeout === "number" ? set.timeout : 0;
    for (const raw of set.elem as unknown[]) {
      const e = (raw as { elem?: Obj })?.elem;
      const key = (e?.val as { concat?: unknown[] } | undefined)?.concat;
      if (!e || !Array.isArray(key) || key.length !== 4) continue;
      const [uid, address, protocol, port] = key;
      if (
        typeof uid !== "number" ||
        typeof address !== "string" ||
        (protocol !== "tcp" && protocol !== "udp") ||
        typeof port !== "number"
      )
        continue;
      const counter = (e.counter ?? {}) as { packets?: unknown; bytes?: unknown };
      const timeout = typeof e.timeout === "number" ? e.timeout : setTimeout;
      const expires = typeof e.expires === "number" ? e.expires : timeout;
      out.push({
        uid,
        address,
        family,
        protocol,
        port,
        packets: typeof counter.packets === "number" ? counter.packets : 0,
        bytes: typeof counter.bytes === "number" ? counter.bytes : 0,
        lastSeenSeconds: Math.max(0, timeout - expires),
      });
    }
  }
  return out;
}

/** Most packets first; then most recent, then by address and port (a stable order). */
export function byPackets(a: RefusedEntry, b: RefusedEntry): number {
  return (
    b.packets - a.packets ||
    a.lastSeenSeconds - b.lastSeenSeconds ||
    a.service.localeCompare(b.service) ||
    a.address.localeCompare(b.address) ||
    a.protocol.localeCompare(b.protocol) ||
    a.port - b.port
  );
}

/**
 * Entries from raw elements: the uid becomes its service (elements of uids no longer a
 * service's are left out), names are attached, only `service` when given, sorted by packets.
 */
export function refusedEntries(
  raw: readonly RawRefused[],
  serviceOf: ReadonlyMap<number, string>,
  namesOf: (service: string, address: string) => string[],
  service?: string,
): RefusedEntry[] {
  const out: RefusedEntry[] = [];
  for (const r of raw) {
    const svc = serviceOf.get(r.uid);
    if (svc === undefined || (service !== undefined && svc !== service)) continue;
    out.push({
      service: svc,
      address: r.address,
      family: r.family,
      protocol: r.protocol,
      port: r.port,
      packets: r.packets,
      bytes: r.bytes,
      lastSeenSeconds: r.lastSeenSeconds,
      names: [...new Set(namesOf(svc, r.address))].sort(),
    });
  }
  return out.sort(byPackets);
}

/** "just now", "42 s ago", "3 min ago", "2 h ago". */
export function agoText(seconds: number): string {
  if (seconds < 1) return "just now";
  if (seconds < 60) return `${Math.floor(seconds)} s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  return `${Math.floor(seconds / 3600)} h ago`;
}

/** `198.51.100.7:443/tcp ← telemetry.vendor.example, 212 packets, 3 min ago` ([v6]:port for IPv6). */
export function refusedLine(e: RefusedEntry): string {
  const where = e.family === 6 ? `[${e.address}]:${e.port}` : `${e.address}:${e.port}`;
  const names = e.names.length ? ` ← ${e.names.join(", ")}` : "";
  const packets = `${e.packets} packet${e.packets === 1 ? "" : "s"}`;
  return `${where}/${e.protocol}${names}, ${packets}, ${agoText(e.lastSeenSeconds)}`;
}

/** The text of `egressctl refused`: a heading per service, its destinations by packets. */
export function formatRefused(entries: readonly RefusedEntry[], service?: string): string {
  if (!entries.length)
    return service === undefined
      ? "no refused destinations recorded"
      : `no refused destinations recorded for ${service}`;
  const byService = new Map<string, RefusedEntry[]>();
  for (const e of [...entries].sort(byPackets)) {
    const list = byService.get(e.service) ?? [];
    list.push(e);
    byService.set(e.service, list);
  }
  const lines: string[] = [];
  for (const svc of [...byService.keys()].sort()) {
    lines.push(`${svc}:`);
    for (const e of byService.get(svc) ?? []) lines.push(`  ${refusedLine(e)}`);
  }
  return lines.join("\n");
}
