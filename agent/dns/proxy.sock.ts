/**
 * The DNS proxy of DNS-aware services (`"dns": "proxy"`). The kernel redirects each such
 * service's port-53 queries (UDP and TCP, any destination) to that service's own port on
 * 127.0.0.1 and ::1, so the port says who asked. dns2 serves the sockets and parses messages.
 *
 * For an allowed name (exact or under a wildcard) the query goes to the configured resolvers
 * (same deadlines as every egressd query); the answer's addresses pass the address filter and
 * are put into the service's sets before the answer is returned. If that kernel update fails
 * the client gets SERVFAIL, never an address the kernel would refuse. Any other name gets
 * NXDOMAIN (or REFUSED) without leaving the host; in audit mode it is forwarded and logged as
 * "would refuse".
 */
import DNS from "dns2";
import type { Socket as TcpSocket } from "node:net";
import type { Logger } from "pino";
import type { Dropped } from "../../rules/address-filter.ts";
import { normalizeQueryName, type NameMatcher } from "../../rules/name-match.ts";
import {
  answerAddresses,
  clientUdpLimit,
  codeReply,
  parse,
  RCODE,
  truncatedReply,
  upstreamQuery,
  withoutAddresses,
  type Message,
} from "./message.ts";

export interface ProxyService {
  name: string;
  mode: "enforce" | "audit";
  matcher: NameMatcher;
}

export interface ProxyDeps {
  /** Sends a query to the configured resolvers (in order, each under its deadline). */
  upstream(query: Buffer): Promise<Buffer>;
  /** Splits addresses into those the filter passes and those it refuses. */
  filter(addresses: readonly string[]): { kept: string[]; dropped: Dropped[] };
  /** Puts `addresses` into `service`'s sets for `name` (TTL in seconds); resolves once the kernel has them. */
  allow(service: string, name: string, addresses: readonly string[], ttl: number): Promise<void>;
  /** How to answer names a service may not look up. */
  unlisted(): "nxdomain" | "refused";
  log: Logger;
  clock: () => number;
}

export interface ProxyStats {
  /** Queries answered for allowed names. */
  allowed: number;
  /** Queries for names the service may not look up (answered NXDOMAIN/REFUSED, or in audit mode forwarded). */
  refused: number;
  /** Queries that failed: upstream unreachable, kernel update failed (answered SERVFAIL). */
  failed: number;
  /** The last refused names, newest first. */
  lastRefused: { name: string; type: number; at: number }[];
  /** Addresses taken out of answers because the address filter refuses them. */
  addressesRemoved: number;
  /** The last ones, newest first. */
  lastRemoved: { name: string; address: string; reason: string; at: number }[];
}

const LAST_REFUSED = 10;
/** Names remembered per service in audit mode (for learning), and addresses per name. */
const MAX_LOOKED_UP = 4096;
const MAX_ADDRESSES = 64;

/** A name an audit-mode service looked up outside its policy, with what it was answered. */
export interface LookedUpName {
  name: string;
  addresses: string[];
  /** When it was last looked up (ms). */
  at: number;
}
/** At most one "refused" log line per service and name in this interval. */
const LOG_EVERY_MS = 60_000;

interface Listener {
  port: number;
  service: ProxyService;
  stats: ProxyStats;
  servers: { udp4: DNS.UDPServer; udp6: DNS.UDPServer; tcp4: DNS.TCPServer; tcp6: DNS.TCPServer };
  logged: Map<string, number>;
  /** Audit mode: unlisted names looked up, oldest first (bounded: the oldest is forgotten). */
  lookedUp: Map<string, { addresses: Set<string>; at: number }>;
}

function bindUdp(server: DNS.UDPServer, port: number, address: string): Promise<void> {
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.bind(port, address, () => {
      server.off("error", reject);
      resolve();
    });
  });
}

function listenTcp(server: DNS.TCPServer, port: number, address: string): Promise<void> {
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, address, () => {
      server.off("error", reject);
      resolve();
    });
  });
}

export class DnsProxy {
  private readonly listeners = new Map<string, Listener>();

  constructor(private readonly deps: ProxyDeps) {}

  /** The port `service` listens on, if it does. */
  port(service: string): number | undefined {
    return this.listeners.get(service)?.port;
  }

  stats(service: string): ProxyStats | undefined {
    return this.listeners.get(service)?.stats;
  }

  /** The names `service` looked up outside its policy in audit mode (learning), since `since` (ms). */
  lookedUp(service: string, since = 0): LookedUpName[] {
    const l = this.listeners.get(service);
    if (!l) return [];
    return [...l.lookedUp]
      .filter(([, v]) => v.at >= since)
      .map(([name, v]) => ({ name, addresses: [...v.addresses], at: v.at }));
  }

  services(): string[] {
    return [...this.listeners.keys()];
  }

  /** Updates what a listening service may look up, and its mode. */
  update(service: ProxyService): void {
    const l = this.listeners.get(service.name);
    if (l) l.service = service;
  }

  /**
   * Listens for `service` on `port` of 127.0.0.1 and ::1, UDP and TCP. Rejects (closing what it
   * opened) when the port is taken.
   */
  async listen(service: ProxyService, port: number): Promise<void> {
    await this.close(service.name);
    const l: Listener = {
      port,
      service,
      stats: {
        allowed: 0,
        refused: 0,
        failed: 0,
        lastRefused: [],
        addressesRemoved: 0,
        lastRemoved: [],
      },
      logged: new Map(),
      lookedUp: new Map(),
      servers: {
        udp4: new DNS.UDPServer({ type: "udp4" }),
        udp6: new DNS.UDPServer({ type: "udp6" }),
        tcp4: new DNS.TCPServer(),
        tcp6: new DNS.TCPServer(),
      },
    };
    const { udp4, udp6, tcp4, tcp6 } = l.servers;
    for (const [server, transport] of [
      [udp4, "udp"],
      [udp6, "udp"],
      [tcp4, "tcp"],
      [tcp6, "tcp"],
    ] as const) {
      (server as NodeJS.EventEmitter).on(
        "request",
        (request: Message, send: (b: Buffer) => unknown, client: unknown) =>
          void this.handle(l, request, transport, (b) => {
            try {
              const sent = send(b) as Promise<unknown> | undefined;
              if (sent && typeof sent.catch === "function") sent.catch(() => undefined);
            } catch {
              // The client went away; nothing to answer.
            }
          }).catch((err: unknown) =>
            this.deps.log.error(
              { service: l.service.name, err: String(err), client: String(client) },
              "DNS proxy error",
            ),
          ),
      );
      (server as NodeJS.EventEmitter).on("requestError", () => undefined);
      (server as NodeJS.EventEmitter).on("error", (err: Error) =>
        this.deps.log.warn({ service: l.service.name, err: err.message }, "DNS proxy socket error"),
      );
    }
    try {
      await bindUdp(udp4, port, "127.0.0.1");
      await bindUdp(udp6, port, "::1");
      await listenTcp(tcp4, port, "127.0.0.1");
      await listenTcp(tcp6, port, "::1");
    } catch (err) {
      await closeAll(l);
      throw err;
    }
    this.listeners.set(service.name, l);
  }

  async close(service: string): Promise<void> {
    const l = this.listeners.get(service);
    if (!l) return;
    this.listeners.delete(service);
    await closeAll(l);
  }

  async closeAll(): Promise<void> {
    for (const s of [...this.listeners.keys()]) await this.close(s);
  }

  private refusedQuery(l: Listener, name: string, type: number, audit: boolean): void {
    const now = this.deps.clock();
    l.stats.refused += 1;
    l.stats.lastRefused.unshift({ name, type, at: now });
    l.stats.lastRefused.length = Math.min(l.stats.lastRefused.length, LAST_REFUSED);
    if (!this.logNow(l, `refused ${name}`)) return;
    this.deps.log.warn(
      { code: "ERR_EGRESS_DNS_REFUSED", service: l.service.name, name, type, audit },
      audit
        ? `${l.service.name} looked up ${name}, which it may not (audit mode: would refuse; answered)`
        : `${l.service.name} may not look up ${name}: answered ${this.deps.unlisted() === "refused" ? "REFUSED" : "NXDOMAIN"}, not forwarded`,
    );
  }

  /** Whether to log `key` now: at most once per LOG_EVERY_MS per service (bounded memory). */
  private logNow(l: Listener, key: string): boolean {
    const now = this.deps.clock();
    if ((l.logged.get(key) ?? 0) > now - LOG_EVERY_MS) return false;
    l.logged.set(key, now);
    if (l.logged.size > 1000) l.logged.clear();
    return true;
  }

  /** Counts and shows (status) the addresses taken out of an answer; logs them once a minute per name. */
  private removedAddresses(l: Listener, name: string, dropped: readonly Dropped[]): void {
    const now = this.deps.clock();
    l.stats.addressesRemoved += dropped.length;
    for (const d of dropped)
      l.stats.lastRemoved.unshift({ name, address: d.address, reason: d.reason, at: now });
    l.stats.lastRemoved.length = Math.min(l.stats.lastRemoved.length, LAST_REFUSED);
    if (!this.logNow(l, `removed ${name}`)) return;
    this.deps.log.warn(
      { code: "ERR_EGRESS_ADDRESS_REFUSED", service: l.service.name, name, dropped },
      `${l.service.name}: ${name}: removed ${dropped.length} refused address(es) from the answer`,
    );
  }

  /** Records what an audit-mode service was answered for a name it may not look up (learning). */
  private remember(l: Listener, name: string, addresses: readonly string[]): void {
    const seen = l.lookedUp.get(name) ?? { addresses: new Set<string>(), at: 0 };
    l.lookedUp.delete(name); // re-inserted last: the map stays in order of last look-up
    for (const a of addresses) if (seen.addresses.size < MAX_ADDRESSES) seen.addresses.add(a);
    seen.at = this.deps.clock();
    l.lookedUp.set(name, seen);
    if (l.lookedUp.size > MAX_LOOKED_UP) {
      const oldest = l.lookedUp.keys().next().value;
      if (oldest !== undefined) l.lookedUp.delete(oldest);
    }
  }

  /** Answers one query of `l`'s service. */
  private async handle(
    l: Listener,
    request: Message,
    transport: "udp" | "tcp",
    reply: (b: Buffer) => void,
  ): Promise<void> {
    const q = request.questions[0];
    if (request.header.qr || request.questions.length !== 1 || !q) {
      reply(codeReply(request, RCODE.FORMERR));
      return;
    }
    if (request.header.opcode !== 0) {
      reply(codeReply(request, RCODE.NOTIMP));
      return;
    }
    const service = l.service;
    const name = normalizeQueryName(q.name);
    const listed = name !== null && service.matcher.matches(name);
    if (!listed) {
      const audit = service.mode === "audit";
      this.refusedQuery(l, name ?? q.name, q.type, audit);
      if (!audit) {
        reply(
          codeReply(request, this.deps.unlisted() === "refused" ? RCODE.REFUSED : RCODE.NXDOMAIN),
        );
        return;
      }
    }
    let raw: Buffer;
    let answer: Message;
    try {
      raw = await this.deps.upstream(upstreamQuery(request));
      answer = parse(raw);
    } catch (err) {
      l.stats.failed += 1;
      this.deps.log.warn(
        { code: "ERR_EGRESS_DNS", service: service.name, name, error: (err as Error).message },
        `${service.name}: ${name}: no answer from the resolvers; answered SERVFAIL`,
      );
      reply(codeReply(request, RCODE.SERVFAIL));
      return;
    }
    let out = raw;
    if (!listed && name !== null) this.remember(l, name, answerAddresses(answer, q.name).addresses);
    if (listed && name !== null) {
      const found = answerAddresses(answer, q.name);
      if (found.addresses.length) {
        const f = this.deps.filter(found.addresses);
        if (f.dropped.length) {
          this.removedAddresses(l, name, f.dropped);
          out = withoutAddresses(answer, new Set(f.dropped.map((d) => d.address)));
        }
        try {
          if (f.kept.length) await this.deps.allow(service.name, name, f.kept, found.ttl);
        } catch (err) {
          l.stats.failed += 1;
          this.deps.log.error(
            {
              code: "ERR_EGRESS_NFT_FAILED",
              service: service.name,
              name,
              error: (err as Error).message,
            },
            `${service.name}: ${name}: the kernel did not take its addresses; answered SERVFAIL`,
          );
          reply(codeReply(request, RCODE.SERVFAIL));
          return;
        }
      }
      l.stats.allowed += 1;
    }
    const buf = Buffer.from(out);
    buf.writeUInt16BE(request.header.id, 0);
    if (transport === "udp" && buf.length > clientUdpLimit(request)) {
      reply(truncatedReply(request));
      return;
    }
    reply(buf);
  }
}

async function closeAll(l: Listener): Promise<void> {
  const { udp4, udp6, tcp4, tcp6 } = l.servers;
  for (const s of [udp4, udp6]) {
    try {
      s.close();
    } catch {
      // never bound
    }
  }
  for (const s of [tcp4, tcp6]) {
    await new Promise<void>((resolve) => {
      for (const c of (s as unknown as { connections?: Set<TcpSocket> }).connections ?? [])
        c.destroy();
      s.close(() => resolve());
    });
  }
}
