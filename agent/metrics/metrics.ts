/**
 * egressd's Prometheus metrics: one registry the daemon owns, whatever serves it (the HTTP
 * endpoint of `metrics.listen`, the control socket's `metrics` op). Values that the kernel or
 * the daemon already keep (refused counters, proxy counts, addresses) are read once per scrape
 * through `Metrics.source`, never per packet. Labels are bounded by the policy: service names,
 * policy names (not addresses), resolvers from the config, fixed outcome words.
 */
import { Counter, Gauge, Histogram, Registry } from "prom-client";
import type { ExchangeEvent } from "../dns/exchange.sock.ts";

/** What the daemon reports at each scrape. */
export interface MetricsSnapshot {
  /** Per service: packets and bytes its refuse path counted (the kernel's named counters). */
  refused: Map<string, { packets: number; bytes: number }>;
  /** Per DNS-aware service: what its DNS proxy answered. */
  proxy: Map<string, { allowed: number; refused: number; failed: number }>;
  /** Allowed addresses per policy name (current and in grace). */
  nameAddresses: Map<string, number>;
  /** Distinct addresses each service may reach through names (resolved plus learned by its proxy). */
  serviceAddresses: Map<string, number>;
  /** Milliseconds since the epoch, or null when it never happened. */
  lastRefresh: number | null;
  lastAudit: number | null;
  /** The policy generation the kernel holds (0: none applied by this daemon yet). */
  generation: number;
  now: number;
}

export type ApplyKind = "full" | "incremental";

const SECONDS_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];

/** The DNS rcodes worth a label of their own; anything else is "other". */
const RCODES: Record<number, string> = {
  1: "FORMERR",
  2: "SERVFAIL",
  3: "NXDOMAIN",
  4: "NOTIMP",
  5: "REFUSED",
};

export class Metrics {
  readonly registry = new Registry();
  /** Set by the daemon: what is read from it at each scrape. */
  source: (() => Promise<MetricsSnapshot>) | null = null;

  private readonly refusedPackets = new Counter({
    name: "egressd_service_refused_packets_total",
    help: "Packets a service sent that egressd refused (its kernel counter, read at scrape)",
    labelNames: ["service"],
    registers: [this.registry],
  });
  private readonly refusedBytes = new Counter({
    name: "egressd_service_refused_bytes_total",
    help: "Bytes of the packets a service sent that egressd refused (its kernel counter, read at scrape)",
    labelNames: ["service"],
    registers: [this.registry],
  });
  private readonly proxyQueries = new Counter({
    name: "egressd_dns_proxy_queries_total",
    help: "DNS queries of a DNS-aware service answered by its proxy, by result (allowed: a name its policy allows; refused: any other name; failed: SERVFAIL)",
    labelNames: ["service", "result"],
    registers: [this.registry],
  });
  private readonly nameAddresses = new Gauge({
    name: "egressd_name_addresses",
    help: "Addresses a policy name allows now (current answers plus those in their grace period)",
    labelNames: ["name"],
    registers: [this.registry],
  });
  private readonly serviceAddresses = new Gauge({
    name: "egressd_service_addresses",
    help: "Distinct addresses a service may reach through names (its names resolved, plus what its DNS proxy learned)",
    labelNames: ["service"],
    registers: [this.registry],
  });
  readonly dnsDuration = new Histogram({
    name: "egressd_dns_query_duration_seconds",
    help: "Time of one DNS exchange with one resolver (refresh and proxy forwarding), answered or not",
    labelNames: ["resolver"],
    buckets: SECONDS_BUCKETS,
    registers: [this.registry],
  });
  readonly dnsFailures = new Counter({
    name: "egressd_dns_query_failures_total",
    help: "DNS exchanges that did not answer NOERROR, by resolver and rcode (or TIMEOUT, UNREACHABLE, BAD_REPLY)",
    labelNames: ["resolver", "rcode"],
    registers: [this.registry],
  });
  readonly applyDuration = new Histogram({
    name: "egressd_apply_duration_seconds",
    help: "Time of one nftables transaction egressd sent, by kind (full: the table replaced; incremental: objects or set elements)",
    labelNames: ["kind"],
    buckets: SECONDS_BUCKETS,
    registers: [this.registry],
  });
  readonly applyFailures = new Counter({
    name: "egressd_apply_failures_total",
    help: "nftables transactions the kernel refused, by kind (the previous ruleset stayed in force)",
    labelNames: ["kind"],
    registers: [this.registry],
  });
  readonly driftFindings = new Counter({
    name: "egressd_drift_findings_total",
    help: "Differences the drift audit found between the kernel and the policy",
    registers: [this.registry],
  });
  readonly driftRepairs = new Counter({
    name: "egressd_drift_repairs_total",
    help: "Audits that repaired drift (one transaction each)",
    registers: [this.registry],
  });
  private readonly sinceRefresh = new Gauge({
    name: "egressd_last_refresh_age_seconds",
    help: "Seconds since the last successful refresh (names re-resolved and the result applied); -1 before the first",
    registers: [this.registry],
  });
  private readonly sinceAudit = new Gauge({
    name: "egressd_last_audit_age_seconds",
    help: "Seconds since the last completed drift audit; -1 before the first",
    registers: [this.registry],
  });
  private readonly generation = new Gauge({
    name: "egressd_policy_generation",
    help: "Generation of the policy the kernel holds: +1 each time a newly loaded policy is applied (0: none yet)",
    registers: [this.registry],
  });

  /**
   * `minFillMs`: scrapes closer together than this reuse the values read last time, so a
   * flood of scrapes costs one kernel listing per interval, not one each.
   */
  constructor(
    version: string,
    private readonly minFillMs = 1000,
  ) {
    const info = new Gauge({
      name: "egressd_build_info",
      help: "egressd's version and the Node.js running it (always 1)",
      labelNames: ["version", "node"],
      registers: [this.registry],
    });
    info.set({ version, node: process.versions.node }, 1);
    for (const kind of ["full", "incremental"]) {
      this.applyDuration.zero({ kind });
      this.applyFailures.inc({ kind }, 0);
    }
    this.sinceRefresh.set(-1);
    this.sinceAudit.set(-1);
  }

  /** An observer for the DNS exchanges (agent/dns/exchange.sock.ts). */
  readonly observeDns = (e: ExchangeEvent): void => {
    this.dnsDuration.observe({ resolver: e.server }, e.ms / 1000);
    if (e.outcome === 0) return;
    const rcode = typeof e.outcome === "number" ? (RCODES[e.outcome] ?? "other") : e.outcome;
    this.dnsFailures.inc({ resolver: e.server, rcode });
  };

  /** One nft transaction: its duration, or its failure. */
  observeApply(kind: ApplyKind, seconds: number, ok: boolean): void {
    if (ok) this.applyDuration.observe({ kind }, seconds);
    else this.applyFailures.inc({ kind });
  }

  /** Reads the daemon's values into the pulled metrics. */
  private fill(s: MetricsSnapshot): void {
    this.refusedPackets.reset();
    this.refusedBytes.reset();
    for (const [service, c] of s.refused) {
      this.refusedPackets.inc({ service }, c.packets);
      this.refusedBytes.inc({ service }, c.bytes);
    }
    this.proxyQueries.reset();
    for (const [service, q] of s.proxy)
      for (const result of ["allowed", "refused", "failed"] as const)
        this.proxyQueries.inc({ service, result }, q[result]);
    this.nameAddresses.reset();
    for (const [name, n] of s.nameAddresses) this.nameAddresses.set({ name }, n);
    this.serviceAddresses.reset();
    for (const [service, n] of s.serviceAddresses) this.serviceAddresses.set({ service }, n);
    const age = (t: number | null) => (t === null ? -1 : Math.max(0, (s.now - t) / 1000));
    this.sinceRefresh.set(age(s.lastRefresh));
    this.sinceAudit.set(age(s.lastAudit));
    this.generation.set(s.generation);
  }

  /** The Prometheus text exposition, with the daemon's values read now. */
  text(): Promise<string> {
    // One scrape at a time: a fill never lands in the middle of another's rendering.
    const run = this.scraping.then(async () => {
      const now = performance.now();
      if (this.source && (this.filledAt === null || now - this.filledAt >= this.minFillMs)) {
        this.fill(await this.source());
        this.filledAt = now;
      }
      return this.registry.metrics();
    });
    this.scraping = run.catch(() => undefined);
    return run;
  }
  private scraping: Promise<unknown> = Promise.resolve();
  private filledAt: number | null = null;

  get contentType(): string {
    return this.registry.contentType;
  }
}
