/**
 * Resolves names for the refresh loop: one family (A or AAAA) at a time, CNAME chains followed,
 * each query to each resolver under a deadline (see exchange.sock.ts). dns2 builds and parses
 * the messages; egressd's own exchange sends them (why not c-ares: docs/dns.md).
 */
import DNS from "dns2";
import type { Family } from "../../rules/addresses.ts";
import type { ResolverAddr } from "../../rules/compile.ts";
import { exchange, ExchangeError, where, type ExchangeObserver } from "./exchange.sock.ts";

export type DnsErrorCode =
  "NXDOMAIN" | "SERVFAIL" | "REFUSED" | "TIMEOUT" | "UNREACHABLE" | "CNAME_LOOP" | "ERROR";

export interface Answer {
  /** Addresses of the asked family, as returned (unfiltered). Empty for NODATA. */
  addresses: string[];
  /** Smallest TTL along the chain, seconds; 0 when nothing was returned. */
  ttl: number;
  /** CNAME chain followed, excluding the queried name. */
  chain: string[];
}

export type Resolution =
  { ok: true; answer: Answer } | { ok: false; code: DnsErrorCode; message: string };

export interface Resolver {
  /** A (family 4) or AAAA (family 6) records of `name`. Never rejects; never outlives its deadline. */
  resolve(name: string, family: Family): Promise<Resolution>;
}

/** Deadline of one query to one resolver, UDP and the TCP retry together, unless configured. */
export const DEFAULT_QUERY_TIMEOUT_MS = 2000;

const RCODE_NAMES: Record<number, DnsErrorCode> = { 2: "SERVFAIL", 3: "NXDOMAIN", 5: "REFUSED" };
const MAX_CHAIN = 8;
const TYPE = { 4: 1, 6: 28 } as const;
const CNAME = 5;

class DnsFailure extends Error {
  constructor(
    readonly code: DnsErrorCode,
    message: string,
  ) {
    super(message);
  }
}

type Rec = { name: string; type: number; ttl: number; address?: string; domain?: string };

/** A recursive query for `name` and `type`, with EDNS0 (1232-byte UDP answers). */
export function queryMessage(name: string, type: number): Buffer {
  const p = new DNS.Packet();
  p.header.rd = 1;
  p.questions.push({ name, type, class: DNS.Packet.CLASS.IN } as never);
  const edns = DNS.Packet.Resource.EDNS as unknown as (rdata: unknown[], o: object) => unknown;
  p.additionals.push(edns([], { udpPayloadSize: 1232 }) as never);
  return p.toBuffer();
}

/** A resolver that asks `servers` in order, moving on when one times out or fails. */
export function dnsResolver(
  servers: readonly ResolverAddr[],
  opts: { timeoutMs?: number; observe?: ExchangeObserver } = {},
): Resolver {
  const timeout = opts.timeoutMs ?? DEFAULT_QUERY_TIMEOUT_MS;

  async function query(name: string, family: Family): Promise<Rec[]> {
    const label = `${name} ${family === 4 ? "A" : "AAAA"}`;
    let last = new DnsFailure("UNREACHABLE", `${label}: no resolvers configured`);
    const msg = queryMessage(name, TYPE[family]);
    for (const server of servers) {
      let reply: Buffer;
      try {
        reply = await exchange(server, msg, timeout, opts.observe);
      } catch (err) {
        const e = err as Error;
        const code =
          err instanceof ExchangeError && err.code === "TIMEOUT" ? "TIMEOUT" : "UNREACHABLE";
        last = new DnsFailure(code, `${label}: ${e.message}`);
        continue;
      }
      let parsed: { header: { rcode: number }; answers: Rec[] };
      try {
        parsed = DNS.Packet.parse(reply) as unknown as typeof parsed;
      } catch (err) {
        last = new DnsFailure(
          "ERROR",
          `${label}: unreadable answer from ${where(server)}: ${(err as Error).message}`,
        );
        continue;
      }
      const rcode = parsed.header.rcode;
      if (rcode === 0) return parsed.answers;
      const code = RCODE_NAMES[rcode] ?? "ERROR";
      const failure = new DnsFailure(
        code,
        `${label}: ${code} (rcode ${rcode}) from ${where(server)}`,
      );
      // NXDOMAIN is an answer: the name does not exist. Anything else: ask the next resolver.
      if (code === "NXDOMAIN") throw failure;
      last = failure;
    }
    throw last;
  }

  /** Follows CNAMEs in the answer, and asks again for a target the answer left unresolved. */
  async function lookup(name: string, family: Family): Promise<Answer> {
    const wanted = TYPE[family];
    const chain: string[] = [];
    let current = name.toLowerCase();
    let ttl = Infinity;
    for (let depth = 0; depth < MAX_CHAIN; depth++) {
      const records = await query(current, family);
      for (let hops = 0; hops <= MAX_CHAIN; hops++) {
        const cname = records.find((r) => r.type === CNAME && r.name.toLowerCase() === current);
        if (!cname?.domain) break;
        ttl = Math.min(ttl, cname.ttl);
        current = cname.domain.toLowerCase().replace(/\.$/, "");
        if (chain.includes(current) || current === name)
          throw new DnsFailure("CNAME_LOOP", `${name}: CNAME loop at ${current}`);
        chain.push(current);
      }
      const addrs = records.filter(
        (r) => r.type === wanted && r.name.toLowerCase() === current && r.address,
      );
      const followed = records.some((r) => r.type === CNAME);
      if (addrs.length || !followed) {
        for (const r of addrs) ttl = Math.min(ttl, r.ttl);
        return {
          addresses: addrs.map((r) => r.address as string),
          ttl: addrs.length ? ttl : 0,
          chain,
        };
      }
    }
    throw new DnsFailure("CNAME_LOOP", `${name}: CNAME chain longer than ${MAX_CHAIN}`);
  }

  return {
    async resolve(name, family) {
      try {
        return { ok: true, answer: await lookup(name, family) };
      } catch (err) {
        if (err instanceof DnsFailure) return { ok: false, code: err.code, message: err.message };
        return { ok: false, code: "ERROR", message: (err as Error).message };
      }
    },
  };
}

export interface Lookup {
  name: string;
  family: Family;
}

/**
 * Resolves each (name, family) once, at most `concurrency` at a time. `onResult` sees each
 * result as it arrives (one stalled lookup holds back nobody else's); it must not throw.
 */
export async function resolveAll(
  resolver: Resolver,
  lookups: Iterable<Lookup>,
  concurrency = 64,
  onResult?: (r: Lookup & { result: Resolution }) => void,
): Promise<(Lookup & { result: Resolution })[]> {
  const queue = [...lookups];
  const out: (Lookup & { result: Resolution })[] = [];
  const worker = async () => {
    for (let l = queue.shift(); l !== undefined; l = queue.shift()) {
      const r = { ...l, result: await resolver.resolve(l.name, l.family) };
      out.push(r);
      onResult?.(r);
    }
  };
  await Promise.all(Array.from({ length: Math.min(concurrency, queue.length) }, worker));
  return out;
}
