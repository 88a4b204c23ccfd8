/** Resolves names with dns2 over UDP (TCP on truncation): A and AAAA, CNAME chains followed. */
import DNS from "dns2";
import type { ResolverAddr } from "../../rules/compile.ts";

export type DnsErrorCode =
  "NXDOMAIN" | "SERVFAIL" | "REFUSED" | "TIMEOUT" | "UNREACHABLE" | "CNAME_LOOP" | "ERROR";

export interface Answer {
  /** Addresses as returned (unfiltered). */
  addresses: string[];
  /** Smallest TTL along the chain, seconds; 0 when nothing was returned. */
  ttl: number;
  /** CNAME chain followed, excluding the queried name. */
  chain: string[];
}

export type Resolution =
  { ok: true; answer: Answer } | { ok: false; code: DnsErrorCode; message: string };

export interface Resolver {
  resolve(name: string): Promise<Resolution>;
}

const RCODE_NAMES: Record<number, DnsErrorCode> = { 2: "SERVFAIL", 3: "NXDOMAIN", 5: "REFUSED" };
const MAX_CHAIN = 8;

class DnsFailure extends Error {
  constructor(
    readonly code: DnsErrorCode,
    message: string,
  ) {
    super(message);
  }
}

type Rec = { name: string; type: number; ttl: number; address?: string; domain?: string };

/** A resolver that asks `servers` in order, moving on when one times out or fails. */
export function dnsResolver(
  servers: readonly ResolverAddr[],
  opts: { timeoutMs?: number } = {},
): Resolver {
  const timeout = opts.timeoutMs ?? 2000;
  const clients = servers.map((s) =>
    DNS.UDPClient({
      dns: s.address,
      port: s.port,
      socketType: s.family === 4 ? "udp4" : "udp6",
      timeout,
    }),
  );

  async function query(name: string, type: "A" | "AAAA"): Promise<Rec[]> {
    let last: DnsFailure = new DnsFailure("UNREACHABLE", "no resolvers configured");
    for (const [i, client] of clients.entries()) {
      const server = servers[i];
      const where = server ? `${server.address}:${server.port}` : "?";
      try {
        const res = await client(name, type);
        const rcode = res.header.rcode as number;
        if (rcode === 0) return res.answers as unknown as Rec[];
        const code = RCODE_NAMES[rcode] ?? "ERROR";
        if (code === "NXDOMAIN") throw new DnsFailure(code, `${name}: NXDOMAIN from ${where}`);
        last = new DnsFailure(code, `${name} ${type}: ${code} (rcode ${rcode}) from ${where}`);
      } catch (err) {
        if (err instanceof DnsFailure) {
          if (err.code === "NXDOMAIN") throw err;
          last = err;
          continue;
        }
        const e = err as NodeJS.ErrnoException;
        last =
          e.code === "ETIMEDOUT"
            ? new DnsFailure(
                "TIMEOUT",
                `${name} ${type}: no answer from ${where} within ${timeout} ms`,
              )
            : new DnsFailure("UNREACHABLE", `${name} ${type}: ${where}: ${e.message}`);
      }
    }
    throw last;
  }

  /** Follows CNAMEs in the answer, and asks again for a target the answer left unresolved. */
  async function lookup(name: string, type: "A" | "AAAA"): Promise<Answer> {
    const wanted = type === "A" ? 1 : 28;
    const chain: string[] = [];
    let current = name.toLowerCase();
    let ttl = Infinity;
    for (let depth = 0; depth < MAX_CHAIN; depth++) {
      const records = await query(current, type);
      // Walk the chain inside this answer.
      for (let hops = 0; hops <= MAX_CHAIN; hops++) {
        const cname = records.find((r) => r.type === 5 && r.name.toLowerCase() === current);
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
      const followed = records.some((r) => r.type === 5);
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
    async resolve(name) {
      try {
        const [a, aaaa] = await Promise.all([lookup(name, "A"), lookup(name, "AAAA")]);
        const ttls = [a, aaaa].filter((x) => x.addresses.length).map((x) => x.ttl);
        return {
          ok: true,
          answer: {
            addresses: [...a.addresses, ...aaaa.addresses],
            ttl: ttls.length ? Math.min(...ttls) : 0,
            chain: a.chain.length >= aaaa.chain.length ? a.chain : aaaa.chain,
          },
        };
      } catch (err) {
        if (err instanceof DnsFailure) return { ok: false, code: err.code, message: err.message };
        return { ok: false, code: "ERROR", message: (err as Error).message };
      }
    },
  };
}

/** Resolves each name once, at most `concurrency` at a time. */
export async function resolveAll(
  resolver: Resolver,
  names: Iterable<string>,
  concurrency = 32,
): Promise<Map<string, Resolution>> {
  const queue = [...new Set(names)];
  const out = new Map<string, Resolution>();
  const worker = async () => {
    for (let name = queue.shift(); name !== undefined; name = queue.shift()) {
      out.set(name, await resolver.resolve(name));
    }
  };
  await Promise.all(Array.from({ length: Math.min(concurrency, queue.length) }, worker));
  return out;
}
