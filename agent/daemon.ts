/**
 * The long-running agent: keeps the kernel's table equal to the policy plus the live DNS
 * answers plus what each DNS-aware service's proxy learned. Every kernel change is decided by
 * reconcile(applied, desired) and goes through one queue, so nft sees one transaction at a
 * time and only what differs: elements added and removed, one service's objects refilled,
 * nothing at all when nothing changed. DNS queries run outside that queue, each under its
 * deadline, so a slow or hostile resolver never holds up a control request, the audit or
 * other names.
 */
import type { Logger } from "pino";
import {
  DROPPED_HINT,
  filterAddresses,
  refuseReason,
  type Dropped,
} from "../rules/address-filter.ts";
import {
  assemble,
  checkDistinctOwners,
  compile,
  compileService,
  domainAllowances,
  nameMatcher,
  nameSetNames,
  nameSetsFor,
  serviceObject,
  UID_PROXY,
  type ResolverAddr,
  type ServiceInput,
  type ServiceParts,
} from "../rules/compile.ts";
import { checkInboundOverlap } from "../rules/inbound.ts";
import { auditDiff, diff, type Finding } from "../rules/diff.ts";
import { parseLive } from "../rules/live.ts";
import {
  parseRefusedListing,
  REFUSED_SET,
  refusedEntries,
  type RefusedEntry,
} from "../rules/refused.ts";
import { EgressError } from "../rules/errors.ts";
import type { NameMatcher } from "../rules/name-match.ts";
import { dnsBypassWarnings } from "../rules/nsswitch.ts";
import type { DaemonConfig, ServicePolicy } from "../rules/policy.ts";
import { DEFAULT_MARGIN_MS, reconcile, type Reconciled } from "../rules/reconcile.ts";
import { tableDigest, type Ruleset, type SetDef } from "../rules/ruleset.ts";
import { parsePorts } from "../rules/target.ts";
import type { PolicyStore } from "./store/policy-store.fs.ts";
import { resolvePrincipals } from "./apply.ts";
import { resolveAll, type Lookup, type Resolution, type Resolver } from "./dns/dns.client.ts";
import { LearnedTable } from "./dns/learned.ts";
import { clampTtl, FAMILIES, NameTable } from "./dns/names.ts";
import type { LookedUpName, ProxyService, ProxyStats } from "./dns/proxy.sock.ts";
import {
  effectivePolicy,
  isLearning,
  nextLearningEnd,
  type Learning,
  type LookedUp,
  type Observed,
} from "../rules/learn.ts";
import type { Nft } from "./nft/nft.exec.ts";
import { configuredResolvers } from "./dns/resolvers.fs.ts";
import type { StateStore } from "./store/state.fs.ts";
import type { Users } from "./users.sys.ts";
import type { Metrics, MetricsSnapshot } from "./metrics/metrics.ts";

/** The DNS proxies, as the daemon drives them (agent/dns/proxy.sock.ts; tests may fake it). */
export interface Proxies {
  listen(service: ProxyService, port: number): Promise<void>;
  update(service: ProxyService): void;
  close(service: string): Promise<void>;
  closeAll(): Promise<void>;
  port(service: string): number | undefined;
  stats(service: string): ProxyStats | undefined;
  services(): string[];
  /** Names `service` looked up outside its policy in audit mode since `since` (ms). */
  lookedUp(service: string, since?: number): LookedUpName[];
}

export interface DaemonDeps {
  store: PolicyStore;
  state: StateStore;
  nft: Nft;
  users: Users;
  resolver: (servers: readonly ResolverAddr[], config: DaemonConfig) => Resolver;
  clock: () => number;
  /** The host's own addresses, read from the kernel (re-read at every commit). */
  hostAddresses: () => ReadonlySet<string>;
  log: Logger;
  /** The DNS proxies of DNS-aware services; absent: none are served. */
  proxies?: Proxies;
  /** The host's nsswitch.conf and whether nscd runs (for the DNS-bypass warning of status). */
  nameService?: () => Promise<{ nsswitch: string; nscdRunning: boolean }>;
  /** Forgets the port-53 conntrack entries, so flows that predate a redirect take it. */
  flushDnsConntrack?: () => Promise<void>;
  /** The metrics registry this daemon reports to (agent/metrics/metrics.ts); absent: none. */
  metrics?: Metrics;
  /** Called after the config is (re)loaded, e.g. to reschedule the audit. */
  onConfig?: (config: DaemonConfig) => void;
}

interface Loaded {
  config: DaemonConfig;
  policies: ServicePolicy[];
  services: ServiceInput[];
  resolvers: ResolverAddr[];
  resolver: Resolver;
  /** What each DNS-aware service may look up. */
  matchers: Map<string, NameMatcher>;
}

/** What a learning proposal is computed from (egressctl adds the listening sockets). */
export interface LearningReport {
  service: string;
  /** The uid whose listening sockets explain inbound ports (egressctl reads them). */
  uid: number;
  learning?: Learning & { active: boolean };
  observed: Observed[];
  lookedUp: LookedUp[];
  /** Why the address filter refuses an address seen, by address (absent: it may be allowed). */
  refuseReasons: Record<string, string>;
}

export interface AuditRecord {
  at: number;
  findings: Finding[];
  repaired: boolean;
  remaining: number;
}

export interface ApplySummary {
  kind: "replace" | "objects" | "elements" | "none";
  /** Elements added and removed, or objects touched. */
  changes: number;
  at: number;
  /** Names whose first resolution had not finished when the request had to answer. */
  pending?: string[];
}

const MAX_TIMER = 2 ** 31 - 1;
/** More changed service files than this are applied by one reload instead of one at a time. */
const MAX_FILES_ONE_BY_ONE = 8;
/**
 * A scheduled refresh applies the answers that came back within this time in one transaction;
 * a lookup still running then (a stalled resolver) is applied by itself when it ends.
 */
const REFRESH_WINDOW_MS = 250;

/** applyService before any policy loaded: the whole policy has to be read. */
class ChangeNeedsReload extends Error {}

/** The domain names a policy allows (each policy object is read once). */
const domainNamesOf = new WeakMap<ServicePolicy, string[]>();
function domainNames(p: ServicePolicy): string[] {
  let names = domainNamesOf.get(p);
  if (!names) domainNamesOf.set(p, (names = domainAllowances(p).map((d) => d.name)));
  return names;
}

/** A number per policy object: a reloaded or changed policy is a new object, so a new number. */
const policyIds = new WeakMap<ServicePolicy, number>();
let nextPolicyId = 0;
function policyId(p: ServicePolicy): number {
  let id = policyIds.get(p);
  if (id === undefined) policyIds.set(p, (id = ++nextPolicyId));
  return id;
}
const plural = (n: number, w: string) => `${n} ${w}${n === 1 ? "" : "s"}`;
const key = (l: Lookup) => `${l.family}|${l.name}`;

/** How long a control request waits for the names it added before it answers without them. */
export function controlWaitMs(config: DaemonConfig): number {
  return 2 * config.dns.queryTimeoutMs + 1000;
}

export class Daemon {
  private loaded: Loaded | null = null;
  private names: NameTable | null = null;
  private learned: LearnedTable | null = null;
  /** What the kernel holds, as far as egressd knows: the last applied (or listed) table. */
  private applied: Ruleset | null = null;
  private appliedNames = new Map<string, string[]>();
  private queue: Promise<unknown> = Promise.resolve();
  private timer: NodeJS.Timeout | null = null;
  private wakeAt: number | null = null;
  private stopped = false;
  /** Lookups on the wire, so a name is never asked twice at once. */
  private readonly inflight = new Map<string, Promise<void>>();
  /** Dropped addresses already logged, so each is logged once per name. */
  private readonly droppedLogged = new Set<string>();
  /** The services as last compiled (same objects while the policy and proxy ports hold). */
  private inputsMemo: { loaded: Loaded; ports: number; inputs: ServiceInput[] } | null = null;
  /** Bumped whenever syncProxies may have opened, moved or closed a proxy. */
  private portsVersion = 0;
  /** The table desired() last assembled (its shared sets are reused while they hold). */
  private lastDesired: Ruleset | null = null;
  /** Each service's compiled parts, and what they were compiled from. */
  private readonly parts = new Map<
    string,
    { key: string; parts: ServiceParts; input: ServiceInput; learned: number }
  >();
  /** Loopback port of each DNS-aware service's proxy (kept across restarts in the state file). */
  private ports = new Map<string, number>();
  /** Services whose learned addresses wait for the next proxy transaction, and who waits. */
  private readonly pendingLearned = new Set<string>();
  private waiters: { resolve: () => void; reject: (e: unknown) => void }[] = [];
  private flushing: Promise<void> | null = null;
  private saveTimer: NodeJS.Timeout | null = null;
  /** A save asked for while stopping: stop() writes it. */
  private savePending = false;
  /** Wakes the daemon when the next learning window ends (the service is enforced again). */
  private learnTimer: NodeJS.Timeout | null = null;
  readonly startedAt: number;
  lastApply: ApplySummary | null = null;
  lastError: { code: string; message: string; at: number } | null = null;
  lastAudit: AuditRecord | null = null;
  /** When names were last re-resolved and the result applied (ms), for the metrics. */
  lastRefresh: number | null = null;
  /** The metrics endpoint as egressd.ts last bound it (status shows it). */
  metricsEndpoint: { listen: string | null; error: string | null } = { listen: null, error: null };
  /** +1 each time a newly loaded policy reaches the kernel (the metrics' policy generation). */
  generation = 0;
  /**
   * Why the policy on disk is not the one enforced, by file ("*" for the policy as a whole);
   * empty when it is.
   */
  private readonly policyErrors = new Map<string, EgressError>();
  /** What each config file held when it was last loaded into what is enforced. */
  private known = new Map<string, string>();
  /** The policy the kernel holds (status shows this one, never one that did not apply). */
  private enforced: Loaded | null = null;
  /** True until start() has applied the cached ruleset. */
  starting = true;
  /** Set by begin(): until then no timer is armed, so start() asks DNS nothing. */
  private begun = false;
  /** The table last applied, for its digest (computed when state is saved, not per commit). */
  private digestOf: { table: Ruleset; digest: string | null } | null = null;
  /**
   * The host's own addresses: read at start, at each full commit, before each refresh records
   * its answers, and each minute (the proxy's answers are filtered with this copy).
   */
  private host: ReadonlySet<string> = new Set();
  /** Applied sets by name (rebuilt when the applied table changes), for the proxy's checks. */
  private appliedIndex: { of: Ruleset | null; sets: Map<string, SetDef> } = {
    of: null,
    sets: new Map(),
  };
  /** Saved state read at start-up, kept until a policy loads. */
  private saved: { names?: unknown; learned?: unknown; proxyPorts?: unknown } | null = null;

  constructor(private readonly deps: DaemonDeps) {
    this.startedAt = deps.clock();
  }

  /** The digest of the last applied table (what status and state show); see tableDigest. */
  private get digest(): string | null {
    const d = this.digestOf;
    if (!d) return null;
    d.digest ??= tableDigest(d.table);
    return d.digest;
  }

  /** An applied set by name. */
  private appliedSet(name: string): SetDef | undefined {
    if (this.appliedIndex.of !== this.applied) {
      this.appliedIndex = {
        of: this.applied,
        sets: new Map((this.applied?.sets ?? []).map((s) => [s.name, s])),
      };
    }
    return this.appliedIndex.sets.get(name);
  }

  get config(): DaemonConfig | null {
    return this.loaded?.config ?? null;
  }

  /** The first reason the policy on disk is not enforced, or null. */
  get loadError(): EgressError | null {
    return this.policyErrors.values().next().value ?? null;
  }

  /** Runs `fn` after everything queued before it. */
  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.queue.then(fn, fn);
    this.queue = run.catch(() => undefined);
    return run;
  }

  private reconcileOptions(now: number) {
    const grace = this.loaded?.config.refresh.graceSeconds ?? 300;
    return { now, slackMs: (grace * 1000) / 2, marginMs: DEFAULT_MARGIN_MS };
  }

  /**
   * Start-up: enforce from the last-known resolutions before any DNS query, updating the live
   * table in place (what DNS-aware services learned stays), then resolve what is due in the
   * background and apply the difference.
   */
  async start(): Promise<void> {
    const { log } = this.deps;
    try {
      const saved = await this.deps.state.load();
      this.saved = saved.state
        ? {
            names: saved.state.names,
            learned: saved.state.learned,
            proxyPorts: saved.state.proxyPorts,
          }
        : null;
      if (saved.problem)
        log.warn(
          { code: "ERR_EGRESS_STATE", problem: saved.problem },
          "ignoring unreadable state; starting without last-known addresses (DNS will refill them)",
        );
    } catch (err) {
      log.error(
        { code: "ERR_EGRESS_STATE", err: err instanceof EgressError ? err.toJSON() : String(err) },
        "ignoring the state file; starting without last-known addresses (DNS will refill them)",
      );
    }
    try {
      await this.startApply();
    } finally {
      this.starting = false;
    }
  }

  /** start()'s one transaction: the saved state (and the policy) into the kernel, no DNS. */
  private startApply(): Promise<void> {
    const { log } = this.deps;
    return this.serial(async () => {
      if (!(await this.load())) {
        log.error("not applying: the policy does not load; the kernel keeps its current ruleset");
        return;
      }
      this.restore();
      await this.syncProxies();
      const table = (this.loaded as Loaded).config.table;
      const now = this.deps.clock();
      try {
        this.applied = parseLive(await this.deps.nft.listTable(table), table, now);
        this.adoptLive(now);
      } catch (err) {
        log.warn({ err: String(err) }, "could not list the live table; replacing it whole");
        this.applied = null;
      }
      await this.commit();
      log.info(
        {
          table: `inet ${table}`,
          services: this.loaded?.services.length,
          names: this.names?.list().length,
          proxies: this.deps.proxies?.services().length ?? 0,
          fromState: this.saved !== null,
          kind: this.lastApply?.kind,
        },
        this.saved !== null
          ? "applied from saved state, before any DNS query"
          : "applied (no saved state yet)",
      );
    });
  }

  /**
   * After start-up (and after the control socket is up): resolves what is due in the
   * background, applies the difference, and keeps doing so on schedule.
   */
  begin(): void {
    this.begun = true;
    void this.refreshDue().finally(() => this.schedule());
  }

  /** Builds the name and learned tables, and proxy ports, from the saved state, filtered like fresh answers. */
  private restore(): void {
    const l = this.loaded as Loaded;
    const now = this.deps.clock();
    const host = (this.host = this.deps.hostAddresses());
    const file = this.deps.state.file;
    const names = NameTable.fromJSON(this.saved?.names, l.config.refresh, {
      names: this.policyNames(),
      now,
      file,
      hostAddresses: host,
    });
    const learned = LearnedTable.fromJSON(this.saved?.learned, l.config.refresh, {
      matchers: l.matchers,
      sets: (svc) => {
        const p = l.policies.find((x) => x.name === svc);
        return p ? nameSetNames(p) : new Set();
      },
      now,
      file,
      hostAddresses: host,
    });
    for (const p of [...names.problems, ...learned.problems])
      this.deps.log.warn(
        { code: "ERR_EGRESS_STATE", where: p.where },
        `saved state: ${p.where}: ${p.text}`,
      );
    this.names = names.table;
    this.names.track(this.policyNames(), now);
    this.learned = learned.table;
    const ports = this.saved?.proxyPorts;
    if (ports && typeof ports === "object")
      for (const [svc, port] of Object.entries(ports as Record<string, unknown>))
        if (typeof port === "number" && Number.isInteger(port) && l.matchers.has(svc))
          this.ports.set(svc, port);
  }

  /**
   * Reads the host's addresses from the kernel again and re-filters what the name and learned
   * tables hold with them (logging what no longer passes; the next commit removes it).
   */
  private rereadHost(): void {
    const l = this.loaded;
    this.host = this.deps.hostAddresses();
    if (!l) return;
    const ctx = { hostAddresses: this.host };
    this.logDropped([
      ...(this.names?.configure(l.config.refresh, ctx) ?? []),
      ...(this.learned?.configure(l.config.refresh, ctx) ?? []),
    ]);
  }

  /** Names every service allows, each once. */
  private policyNames(): string[] {
    const set = new Set<string>();
    for (const p of this.loaded?.policies ?? [])
      for (const d of domainAllowances(p)) set.add(d.name);
    return [...set].sort();
  }

  /** Reads config, policies and users from disk and checks they compile; changes nothing. */
  private async read(): Promise<Loaded> {
    const { store, users } = this.deps;
    store.digests.clear();
    const config = await store.loadConfig();
    const now = this.deps.clock();
    const policies = (await store.loadServices()).map((p) => effectivePolicy(p, now));
    const services = await resolvePrincipals(policies, users, (n) => store.serviceFile(n));
    const resolvers = await configuredResolvers(config);
    // What could stop the compiler is checked here, so a bad policy is refused before anything changes.
    checkDistinctOwners(services);
    checkInboundOverlap(policies);
    const matchers = new Map(
      policies.filter((p) => p.dns === "proxy").map((p) => [p.name, nameMatcher(p)]),
    );
    return {
      config,
      policies,
      services,
      resolvers,
      matchers,
      resolver: this.deps.resolver(resolvers, config),
    };
  }

  /** Loads config, policies and users. On failure keeps what was loaded before and records why. */
  private async load(): Promise<boolean> {
    const { log } = this.deps;
    try {
      const loaded = await this.read();
      this.loaded = loaded;
      this.known = new Map(this.deps.store.digests);
      log.level = loaded.config.log.level;
      this.policyErrors.clear();
      this.deps.onConfig?.(loaded.config);
      this.armLearning();
      return true;
    } catch (err) {
      const e =
        err instanceof EgressError
          ? err
          : new EgressError("ERR_EGRESS_INTERNAL", String((err as Error).message), { exitCode: 4 });
      this.policyErrors.clear();
      this.policyErrors.set("*", e);
      log.error(
        {
          err: e.toJSON(),
          enforcing: this.loaded ? "the last good policy" : "whatever the kernel has",
        },
        `policy not loaded: ${e.message}; still enforcing the last good policy`,
      );
      return false;
    }
  }

  /**
   * Opens, updates and closes DNS proxies to match the DNS-aware services. A service keeps its
   * port across restarts; a taken port moves it to the next free one in dns.proxyPortRange.
   * A service whose proxy cannot listen gets no redirect: its lookups fail (closed), nothing opens.
   */
  private async syncProxies(): Promise<void> {
    try {
      await this.placeProxies();
    } finally {
      this.portsVersion++; // the services' inputs are built again with the ports as they are now
    }
  }

  private async placeProxies(): Promise<void> {
    const proxies = this.deps.proxies;
    const l = this.loaded as Loaded;
    if (!proxies) return;
    const wanted = new Map(
      l.policies
        .filter((p) => p.dns === "proxy")
        .map((p) => [
          p.name,
          { name: p.name, mode: p.mode, matcher: l.matchers.get(p.name) as NameMatcher },
        ]),
    );
    for (const name of proxies.services())
      if (!wanted.has(name)) {
        await proxies.close(name);
        this.ports.delete(name);
      }
    for (const name of [...this.ports.keys()]) if (!wanted.has(name)) this.ports.delete(name);
    const range = parsePorts(l.config.dns.proxyPortRange);
    if ("error" in range) return;
    // Ports in use or kept for a service; candidates are tried from a cursor that only moves
    // forward, so placing N proxies costs O(N), not a scan of the range per proxy.
    const taken = new Set(this.ports.values());
    let cursor = range.low;
    for (const [name, svc] of wanted) {
      const current = proxies.port(name);
      if (current !== undefined && current >= range.low && current <= range.high) {
        proxies.update(svc);
        continue;
      }
      const tried = new Set<number>();
      const preferred = this.ports.get(name);
      this.ports.delete(name);
      if (preferred !== undefined) taken.delete(preferred);
      const candidates = function* () {
        if (preferred !== undefined && preferred >= range.low && preferred <= range.high)
          yield preferred;
        for (; cursor <= range.high; cursor++) yield cursor;
      };
      let bound: number | null = null;
      let lastErr = "";
      for (const port of candidates()) {
        if (tried.has(port) || taken.has(port)) continue;
        tried.add(port);
        if (tried.size > 50) break;
        try {
          await proxies.listen(svc, port);
          bound = port;
          break;
        } catch (err) {
          lastErr = (err as Error).message;
          taken.add(port); // busy (another program's?): the next services skip it this round
        }
      }
      if (bound === null) {
        this.deps.log.error(
          {
            code: "ERR_EGRESS_PROXY",
            service: name,
            range: l.config.dns.proxyPortRange,
            error: lastErr,
          },
          `${name}: no free port for its DNS proxy; its lookups fail until one is free`,
        );
        continue;
      }
      this.ports.set(name, bound);
      taken.add(bound);
      this.deps.log.info(
        { service: name, port: bound },
        `${name}: DNS proxy listening on port ${bound}`,
      );
    }
  }

  /** The services as compiled: DNS-aware ones with the port their proxy listens on. */
  private inputs(): ServiceInput[] {
    const l = this.loaded as Loaded;
    const proxies = this.deps.proxies;
    const m = this.inputsMemo;
    if (m?.loaded === l && m.ports === this.portsVersion) return m.inputs;
    const record = l.config.refused.size > 0;
    const inputs = l.services.map((s) => {
      const port = s.policy.dns === "proxy" ? proxies?.port(s.policy.name) : undefined;
      return port === undefined && !record
        ? s
        : { ...s, ...(port === undefined ? {} : { proxyPort: port }), record };
    });
    this.inputsMemo = { loaded: l, ports: this.portsVersion, inputs };
    return inputs;
  }

  /**
   * The desired table: policy, refresh answers and learned addresses alive at `now`. Each
   * service is recompiled only when something it is compiled from changed (its policy, port,
   * the answers for its names, what its proxy learned); its unchanged parts are the same
   * objects as before, which reconcile skips without comparing them.
   */
  private desired(now: number, fast = false): Ruleset {
    const l = this.loaded as Loaded;
    const learned = this.learned as LearnedTable;
    let snap: ReturnType<NameTable["snapshot"]> | null = null;
    const snapshot = () => (snap ??= (this.names as NameTable).snapshot(now));
    const all: ServiceParts[] = [];
    const seen = new Set<string>();
    for (const svc of this.inputs()) {
      const name = svc.policy.name;
      seen.add(name);
      const cached = this.parts.get(name);
      // The proxy's transactions change learned addresses only: a service whose input and
      // learned version are what its parts were compiled from keeps them without a look at
      // its names (their answers change by refresh, a full commit).
      if (fast && cached?.input === svc && cached.learned === learned.version(name)) {
        all.push(cached.parts);
        continue;
      }
      const key = [
        policyId(svc.policy),
        svc.uid,
        svc.gid ?? "",
        svc.proxyPort ?? "",
        svc.record ? "r" : "",
        learned.version(name),
        ...domainNames(svc.policy).map((d) => `${d}=${snapshot().get(d)?.join(",")}`),
      ].join("|");
      if (cached?.key === key) {
        if (cached.input !== svc) this.parts.set(name, { ...cached, input: svc });
        all.push(cached.parts);
        continue;
      }
      const parts = compileService(
        svc,
        snapshot(),
        learned.of(name, now),
        learned.adoptedOf(name, now),
      );
      this.parts.set(name, { key, parts, input: svc, learned: learned.version(name) });
      all.push(parts);
    }
    for (const name of [...this.parts.keys()]) if (!seen.has(name)) this.parts.delete(name);
    return (this.lastDesired = assemble(
      l.config.table,
      l.resolvers,
      all,
      this.lastDesired,
      l.config.refused,
    ));
  }

  /** Timed elements adopted from the kernel at start-up, by service and set. */
  private adopted(now: number): Map<string, Map<string, Map<string, number>>> {
    const learned = this.learned as LearnedTable;
    return new Map(
      [...(this.loaded as Loaded).matchers.keys()].map((s) => [s, learned.adoptedOf(s, now)]),
    );
  }

  /**
   * Keeps the timed elements the kernel holds in DNS-aware services' name sets, so a restart
   * (even after a crash, with a state file older than the table) loses nothing learned. What
   * does not pass the filter now, or lives longer than maxTtl + grace, is not kept.
   */
  private adoptLive(now: number): void {
    const l = this.loaded as Loaded;
    const learned = this.learned as LearnedTable;
    const latest = now + (l.config.refresh.maxTtlSeconds + l.config.refresh.graceSeconds) * 1000;
    for (const policy of l.policies) {
      if (policy.dns !== "proxy") continue;
      for (const name of nameSetNames(policy)) {
        const set = this.applied?.sets.find((x) => x.name === name);
        for (const [address, until] of Object.entries(set?.expires ?? {})) {
          if (until <= now || until > latest || this.filter([address]).dropped.length) continue;
          learned.adopt(policy.name, name, address, until);
        }
      }
    }
  }

  /** What `reload` would change in the kernel, using the addresses known now (new names count as unresolved). */
  plan(): Promise<{ changes: Finding[]; table: string }> {
    return this.serial(async () => {
      const l = await this.read();
      const now = this.deps.clock();
      const desired = compile({
        table: l.config.table,
        resolvers: l.resolvers,
        services: l.services.map((s) => {
          const port =
            s.policy.dns === "proxy" ? this.deps.proxies?.port(s.policy.name) : undefined;
          return port === undefined ? s : { ...s, proxyPort: port };
        }),
        resolutions: this.names?.snapshot(now) ?? new Map(),
        learned: this.learned?.all(now) ?? new Map(),
        refused: l.config.refused,
      });
      const live = parseLive(await this.deps.nft.listTable(l.config.table), l.config.table, now);
      return { changes: diff(live, desired), table: `inet ${l.config.table}` };
    });
  }

  /** Sends a reconciled transaction; records it as applied. */
  private async send(r: Reconciled): Promise<void> {
    if (r.commands.length) {
      const kind = r.kind === "replace" ? "full" : "incremental";
      const t0 = performance.now();
      try {
        await this.deps.nft.apply({ nftables: r.commands });
      } catch (err) {
        this.deps.metrics?.observeApply(kind, 0, false);
        throw err;
      }
      this.deps.metrics?.observeApply(kind, (performance.now() - t0) / 1000, true);
    }
    this.applied = r.applied;
    if (r.wakeAt !== null)
      this.wakeAt = this.wakeAt === null ? r.wakeAt : Math.min(this.wakeAt, r.wakeAt);
  }

  /**
   * Brings the kernel to the desired table through reconcile. The filter is re-applied first
   * (config, and the host's addresses read again now), so a narrowing takes effect in this same
   * transaction. If the kernel refuses the change (it no longer holds what egressd applied),
   * egressd lists it and reconciles again from what it really holds.
   */
  private async commit(opts: { save: "now" | "soon" } = { save: "now" }): Promise<ApplySummary> {
    const { log, clock } = this.deps;
    const l = this.loaded as Loaded;
    const learned = this.learned as LearnedTable;
    const now = clock();
    if (opts.save === "now") {
      // A full commit (start, reload, refresh, change, repair): the filter is re-applied with
      // the host's addresses read again. The proxy's transactions (save "soon") skip this: what
      // they add was filtered on arrival, with the copy read here.
      this.rereadHost();
      learned.retain(l.matchers);
    }
    learned.prune(now);
    const next = this.desired(now, opts.save === "soon");
    const before = this.appliedSet(UID_PROXY);
    let r = reconcile(this.applied, next, this.reconcileOptions(now));
    try {
      await this.send(r);
    } catch (err) {
      if (r.kind === "replace") return this.failed(err, now);
      log.warn(
        { err: err instanceof EgressError ? err.toJSON() : String(err) },
        "the kernel refused the change (its table is not what egressd applied); reconciling from a fresh listing",
      );
      try {
        const live = parseLive(
          await this.deps.nft.listTable(l.config.table),
          l.config.table,
          clock(),
        );
        r = reconcile(live, this.desired(clock()), this.reconcileOptions(clock()));
        await this.send(r);
      } catch (err2) {
        return this.failed(err2, now);
      }
    }
    const summary: ApplySummary = { kind: r.kind, changes: r.changes, at: now };
    // The kernel holds what was just reconciled: that policy is now the enforced one, and an
    // earlier apply error is over.
    if (this.enforced !== l) this.generation++;
    this.enforced = l;
    this.lastError = null;
    if (r.kind !== "none") {
      this.digestOf = { table: next, digest: null };
      log.info(
        { kind: r.kind, changes: r.changes },
        r.kind === "replace"
          ? "table replaced"
          : r.kind === "objects"
            ? "services updated"
            : "sets updated",
      );
    }
    this.lastApply = summary;
    if (opts.save === "now") this.logNameChanges(now); // names change by refresh, not by the proxy
    await this.flushConntrackFor(before);
    if (opts.save === "now") await this.saveState();
    else this.saveSoon();
    this.schedule();
    return summary;
  }

  private failed(err: unknown, now: number): never {
    const e =
      err instanceof EgressError
        ? err
        : new EgressError("ERR_EGRESS_INTERNAL", String(err), { exitCode: 4 });
    this.lastError = { code: e.code, message: e.message, at: now };
    this.deps.log.error({ err: e.toJSON() }, "apply failed; the previous ruleset stays in force");
    throw e;
  }

  /** A UDP flow to port 53 that predates a new redirect would keep bypassing it: forget those flows. */
  private async flushConntrackFor(beforeMap: SetDef | undefined): Promise<void> {
    const afterMap = this.appliedSet(UID_PROXY);
    if (afterMap === beforeMap || !this.deps.flushDnsConntrack) return;
    const uids = (m: SetDef | undefined) => new Set((m?.elem ?? []).map((e) => (e as [number])[0]));
    const before = uids(beforeMap);
    if (![...uids(afterMap)].some((u) => !before.has(u))) return;
    try {
      await this.deps.flushDnsConntrack();
    } catch (err) {
      this.deps.log.warn(
        { code: "ERR_EGRESS_CONNTRACK", error: (err as Error).message },
        "could not remove port-53 conntrack entries; DNS flows older than the redirect keep going to the resolver until they idle out",
      );
    }
  }

  /** One log line per name whose allowed addresses changed, naming its services. */
  private logNameChanges(now: number): void {
    const snapshot = (this.names as NameTable).snapshot(now);
    for (const [name, after] of snapshot) {
      const before = this.appliedNames.get(name) ?? [];
      const added = after.filter((a) => !before.includes(a));
      const removed = before.filter((a) => !after.includes(a));
      if (added.length || removed.length) {
        this.deps.log.info(
          { services: this.servicesOf(name), name, added, removed },
          `${name}: +${added.length} -${removed.length} addresses`,
        );
      }
    }
    this.appliedNames = snapshot;
  }

  /** Logs each address the filter refused, once per name and reason, with the fix. */
  private logDropped(dropped: readonly (Dropped & { name?: string })[]): void {
    for (const d of dropped) {
      const id = `${d.name ?? ""}|${d.address}|${d.reason}`;
      if (this.droppedLogged.has(id)) continue;
      this.droppedLogged.add(id);
      this.deps.log.warn(
        {
          code: "ERR_EGRESS_ADDRESS_REFUSED",
          ...(d.name ? { name: d.name, services: this.servicesOf(d.name) } : {}),
          address: d.address,
          reason: d.reason,
          hint: DROPPED_HINT,
        },
        `${d.name ? `${d.name}: ` : ""}not allowing ${d.address} (${d.reason})`,
      );
    }
  }

  private servicesOf(name: string): string[] {
    return (this.loaded?.policies ?? [])
      .filter((p) => domainAllowances(p).some((d) => d.name === name))
      .map((p) => p.name);
  }

  private async saveState(final = false): Promise<void> {
    // After stop() (a lookup still answering, a commit it triggered), nothing is written: stop()
    // wrote the last state.
    if (this.stopped && !final) return;
    try {
      await this.deps.state.save({
        version: 2,
        savedAt: this.deps.clock(),
        names: this.names?.toJSON() ?? {},
        learned: this.learned?.toJSON() ?? {},
        proxyPorts: Object.fromEntries(this.ports),
        ...(this.digest
          ? { applied: { digest: this.digest, at: this.lastApply?.at ?? this.deps.clock() } }
          : {}),
      });
    } catch (err) {
      this.deps.log.warn(
        {
          code: "ERR_EGRESS_STATE",
          error: err instanceof EgressError ? err.toJSON() : (err as Error).message,
        },
        "could not save state",
      );
    }
  }

  // ------------------------------------------------------------------ the DNS proxy's path

  /** The address filter as it stands now (for the proxy). */
  filter(addresses: readonly string[]): { kept: string[]; dropped: Dropped[] } {
    const config = this.loaded?.config;
    return filterAddresses(addresses, {
      allowPrivateAddresses: config?.refresh.allowPrivateAddresses ?? true,
      hostAddresses: this.host,
    });
  }

  /**
   * Puts addresses a service's query was answered with into its sets and resolves once the
   * kernel holds them, with a lifetime that covers the answer's (clamped) TTL. Already covered:
   * resolves at once. Queries arriving while a transaction is in flight join the next one.
   */
  allowLearned(
    service: string,
    name: string,
    addresses: readonly string[],
    ttl: number,
  ): Promise<void> {
    const l = this.loaded;
    const learned = this.learned;
    if (!l || !learned) return Promise.reject(new Error("egressd has not loaded a policy yet"));
    const now = this.deps.clock();
    learned.learn(service, name, addresses, ttl, now);
    const policy = l.policies.find((p) => p.name === service);
    if (!policy) return Promise.reject(new Error(`${service} is not registered`));
    const need = now + clampTtl(ttl, l.config.refresh) * 1000;
    const want = learned.expiryFor(ttl, now);
    const sets = nameSetsFor(policy, name);
    let covered = true;
    let stale = false;
    for (const a of addresses) {
      for (const setName of sets[a.includes(":") ? 6 : 4]) {
        const set = this.appliedSet(setName);
        const present = set?.elem.includes(a);
        const until = set?.expires?.[a];
        if (!present || (until !== undefined && until < need)) covered = false;
        else if (until !== undefined && want > until + this.reconcileOptions(now).slackMs)
          stale = true;
      }
    }
    if (covered) {
      if (stale) {
        // Extend the lifetime in the background; the answer does not wait for it.
        this.pendingLearned.add(service);
        this.kick();
      }
      return Promise.resolve();
    }
    return new Promise((resolve, reject) => {
      this.waiters.push({ resolve, reject });
      this.pendingLearned.add(service);
      this.kick();
    });
  }

  /** Runs proxy transactions until nothing is pending: each one carries everything learned so far. */
  private kick(): void {
    if (this.flushing) return;
    this.flushing = (async () => {
      while (this.pendingLearned.size) {
        this.pendingLearned.clear();
        const waiters = this.waiters;
        this.waiters = [];
        try {
          await this.serial(() => this.pushLearned());
          for (const w of waiters) w.resolve();
        } catch (err) {
          for (const w of waiters) w.reject(err);
        }
      }
    })().finally(() => {
      this.flushing = null;
      if (this.pendingLearned.size) this.kick();
    });
  }

  /**
   * One transaction with what the proxies learned: a commit, which recompiles only the services
   * whose learned addresses changed (their name sets), and saves state within a second.
   */
  private async pushLearned(): Promise<void> {
    await this.commit({ save: "soon" });
  }

  /** Saves state within a second (proxy transactions can come many per second). */
  private saveSoon(): void {
    // Once stopping, stop() saves what is pending itself (nothing is written after it returns).
    if (this.stopped) {
      this.savePending = true;
      return;
    }
    if (this.saveTimer) return;
    this.saveTimer = setTimeout(() => {
      this.saveTimer = null;
      void this.saveState();
    }, 1000);
  }

  // ------------------------------------------------------------------ resolution

  /**
   * Resolves `lookups` (each at most once at a time, however many callers ask) and records the
   * answers. Runs outside the kernel queue; every query has its deadline.
   */
  private resolve(lookups: readonly Lookup[]): Promise<void> {
    const l = this.loaded as Loaded;
    const table = this.names as NameTable;
    const waits: Promise<void>[] = [];
    const todo: Lookup[] = [];
    const mine = new Map<string, { done: Promise<void>; settle: () => void }>();
    for (const x of lookups) {
      const k = key(x);
      const running = this.inflight.get(k);
      if (running) {
        waits.push(running);
        continue;
      }
      let settle = () => undefined as void;
      const done = new Promise<void>((r) => (settle = r));
      mine.set(k, { done, settle });
      this.inflight.set(k, done);
      waits.push(done);
      todo.push(x);
    }
    const finish = (x: Lookup) => {
      const k = key(x);
      const m = mine.get(k);
      if (!m) return;
      if (this.inflight.get(k) === m.done) this.inflight.delete(k);
      m.settle();
    };
    if (todo.length) {
      // Each answer is recorded as it arrives, so a stalled lookup holds back no other name.
      // The host's addresses are read from the kernel again before the first answer of the
      // batch is recorded: an address added to an interface since is refused from this very
      // answer (and shown in status as dropped), what the tables already hold is re-filtered.
      let hostRead = false;
      const record = ({ name, family, result }: Lookup & { result: Resolution }) => {
        try {
          if (!hostRead) {
            hostRead = true;
            this.rereadHost();
          }
          if (table.has(name)) this.recordAnswer(table, name, family, result); // else revoked meanwhile
        } catch (err) {
          this.deps.log.error({ err: String(err), name }, "recording a DNS answer failed");
        } finally {
          finish({ name, family });
        }
      };
      void resolveAll(l.resolver, todo, 64, record)
        .catch((err: unknown) => {
          this.deps.log.error({ err: String(err) }, "DNS resolution failed unexpectedly");
        })
        .finally(() => todo.forEach(finish));
    }
    return Promise.all(waits).then(() => undefined);
  }

  /** Records one answer in the name table, and logs a failure or the addresses it dropped. */
  private recordAnswer(
    table: NameTable,
    name: string,
    family: Lookup["family"],
    result: Resolution,
  ): void {
    table.observe(name, family, result, this.deps.clock());
    const st = table.get(name)?.[family];
    if (!result.ok) {
      this.deps.log.warn(
        {
          code: "ERR_EGRESS_DNS",
          name,
          family: family === 4 ? "A" : "AAAA",
          services: this.servicesOf(name),
          dns: result.code,
          error: result.message,
          keeping: result.code === "NXDOMAIN" ? [] : st?.current,
          retryAt: st?.nextRefresh,
        },
        result.code === "NXDOMAIN"
          ? `${name}: NXDOMAIN; its addresses go after the grace period`
          : `${name} ${family === 4 ? "A" : "AAAA"}: ${result.code}; keeping the last-known addresses`,
      );
    } else if (st?.dropped.length) {
      this.logDropped(st.dropped.map((d) => ({ ...d, name })));
    }
  }

  /** Starts resolving `lookups` and waits for them at most `ms`; `finished` says whether they all ended. */
  private async resolveWithin(
    lookups: readonly Lookup[],
    ms: number,
  ): Promise<{ finished: boolean; resolution: Promise<void> }> {
    let finished = !lookups.length;
    const resolution = this.resolve(lookups).then(() => {
      finished = true;
    });
    if (!finished) {
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([resolution, new Promise<void>((r) => (timer = setTimeout(r, ms)))]);
      clearTimeout(timer);
    }
    return { finished, resolution };
  }

  /**
   * Resolves what is due (and not already being asked), then applies the difference: the
   * answers back within REFRESH_WINDOW_MS in one transaction; lookups still running then (a
   * slow or stalled resolver) in another when they end, so they hold back no other name.
   */
  private async refreshDue(): Promise<void> {
    if (!this.loaded || !this.names || this.stopped) return;
    const due = this.names
      .dueForRefresh(this.deps.clock())
      .filter((x) => !this.inflight.has(key(x)));
    const { finished, resolution } = await this.resolveWithin(due, REFRESH_WINDOW_MS);
    const commit = async () => {
      if (this.stopped) return; // after stop(), nothing more goes to the kernel
      await this.serial(() => this.commit()).then(
        () => {
          if (due.length) this.lastRefresh = this.deps.clock();
        },
        () => undefined,
      );
    };
    await commit();
    if (!finished) void resolution.then(commit).finally(() => this.schedule());
  }

  /**
   * Resolves `lookups`, waiting at most the control deadline, then applies. Lookups still
   * running are applied when they finish, and reported as pending.
   */
  private async resolveThenCommit(lookups: readonly Lookup[]): Promise<ApplySummary> {
    const config = (this.loaded as Loaded).config;
    const { finished, resolution } = await this.resolveWithin(lookups, controlWaitMs(config));
    const summary = await this.serial(() => this.commit());
    if (finished && lookups.length) this.lastRefresh = summary.at;
    if (finished) return summary;
    void resolution
      .then(async () => {
        if (!this.stopped) await this.serial(() => this.commit()); // none after stop()
      })
      .catch(() => undefined);
    const pending = [
      ...new Set(lookups.filter((x) => this.inflight.has(key(x))).map((x) => x.name)),
    ];
    this.deps.log.warn(
      { code: "ERR_EGRESS_DNS_PENDING", pending },
      `answering before ${plural(pending.length, "name")} resolved; they are applied when DNS answers`,
    );
    return { ...summary, pending };
  }

  /** Re-reads config and policy and applies them; new names are resolved first. Throws when the policy does not load. */
  async reload(): Promise<ApplySummary> {
    const added = await this.serial(async () => {
      if (!(await this.load())) throw this.loadError;
      // First successful load after a start that could not load: begin from the saved state.
      if (!this.names) this.restore();
      await this.syncProxies();
      return (this.names as NameTable).track(this.policyNames(), this.deps.clock()).added;
    });
    const summary = await this.resolveThenCommit(NameTable.lookups(added));
    this.deps.log.info(
      {
        services: this.loaded?.services.length,
        names: this.names?.list().length,
        kind: summary.kind,
      },
      "policy applied",
    );
    return summary;
  }

  /**
   * Applies one service's policy file (changed, new or removed) without reading any other
   * file: validated against the other services as loaded, then only that service's objects
   * change in the kernel. Throws (nothing changed) when the file does not load or clashes with
   * another service; a change noticed by the file watcher also records why (status shows it).
   */
  async applyService(name: string, origin: "control" | "watch" = "control"): Promise<ApplySummary> {
    const file = this.deps.store.serviceFile(name);
    // What to go back to if the kernel refuses the change.
    let before: { loaded: Loaded; known: string | undefined; next: Loaded } | null = null;
    const added = await this.serial(async () => {
      const l = this.loaded;
      if (!l || !this.names) throw new ChangeNeedsReload();
      const { store, users } = this.deps;
      try {
        const read = await store.loadService(name);
        const policy = read && effectivePolicy(read, this.deps.clock());
        const others = l.policies.filter((p) => p.name !== name);
        const policies = (policy ? [...others, policy] : others).sort((a, b) =>
          a.name.localeCompare(b.name),
        );
        const mine = policy
          ? await resolvePrincipals([policy], users, (n) => store.serviceFile(n))
          : [];
        const services = [...l.services.filter((s) => s.policy.name !== name), ...mine];
        checkDistinctOwners(services);
        checkInboundOverlap(policies);
        const matchers = new Map(l.matchers);
        matchers.delete(name);
        if (policy?.dns === "proxy") matchers.set(name, nameMatcher(policy));
        this.loaded = { ...l, policies, services, matchers };
        before = { loaded: l, known: this.known.get(file), next: this.loaded };
        this.known.set(file, store.digests.get(file) ?? "");
        this.policyErrors.delete(file);
        this.armLearning();
      } catch (err) {
        const e =
          err instanceof EgressError
            ? err
            : new EgressError("ERR_EGRESS_INTERNAL", String((err as Error).message), {
                exitCode: 4,
              });
        if (origin === "watch") {
          this.policyErrors.set(file, e);
          this.deps.log.error(
            { err: e.toJSON(), file },
            `policy not loaded: ${e.message}; still enforcing the last good policy`,
          );
        }
        throw e;
      }
      await this.syncProxies();
      return (this.names as NameTable).track(this.policyNames(), this.deps.clock()).added;
    }).catch(async (err: unknown) => {
      if (err instanceof ChangeNeedsReload) return null;
      throw err;
    });
    if (added === null) return this.reload();
    let summary: ApplySummary;
    try {
      summary = await this.resolveThenCommit(NameTable.lookups(added));
    } catch (err) {
      await this.unloadRefused(file, before, origin === "watch" ? err : null);
      throw err;
    }
    this.deps.log.info(
      { service: name, kind: summary.kind, changes: summary.changes },
      "policy applied",
    );
    return summary;
  }

  /**
   * The kernel refused a service's change: the daemon goes back to the policy the kernel holds,
   * so no later refresh applies the refused one behind the operator's back. egressctl puts the
   * old file back; a file edited by hand stays on disk, shown as unapplied (with the reason)
   * in status and the audit until it changes again or a reload applies it.
   */
  private async unloadRefused(
    file: string,
    before: { loaded: Loaded; known: string | undefined; next: Loaded } | null,
    err: unknown,
  ): Promise<void> {
    if (!before) return;
    const b = before;
    await this.serial(async () => {
      if (this.loaded !== b.next) return; // something newer was loaded since
      this.loaded = b.loaded;
      if (b.known === undefined) this.known.delete(file);
      else this.known.set(file, b.known);
      if (err instanceof EgressError) this.policyErrors.set(file, err); // a hand edit: say why
      this.armLearning();
      this.names?.track(this.policyNames(), this.deps.clock());
      await this.syncProxies();
    });
  }

  /**
   * Looks at the config files for changes made behind egressctl's back (an editor,
   * configuration management): a changed egressd.json reloads everything, a changed, new or
   * removed service file applies that service. A file whose content is what was last loaded
   * (egressctl's own writes, already applied) is left alone.
   */
  async noticeChanges(): Promise<void> {
    if (!this.loaded) return;
    const { store } = this.deps;
    const changed = await this.filesOnDiskChanged();
    if (!changed.length) {
      // Edits undone by hand: nothing on disk differs from what is enforced any more.
      for (const f of [...this.policyErrors.keys()]) if (f !== "*") this.policyErrors.delete(f);
      return;
    }
    this.deps.log.info(
      { files: changed.length > 20 ? [...changed.slice(0, 20), "..."] : changed },
      `${changed.length} policy file(s) changed on disk`,
    );
    // Many files at once (configuration management rolling out a fleet's policy) are one
    // reload, one transaction, not a transaction per file.
    if (
      changed.includes(store.configFile) ||
      this.policyErrors.has("*") ||
      changed.length > MAX_FILES_ONE_BY_ONE
    ) {
      await this.reload().catch(() => undefined); // the reason is logged and shown in status
      return;
    }
    for (const f of changed) {
      const name = store.serviceNameOf(f);
      if (!name) continue;
      // A reload or egressctl may have loaded this file while the ones before were applied.
      const now = await store.currentDigest(f).catch(() => null);
      if (now !== null && now === (this.known.get(f) ?? "")) continue;
      await this.applyService(name, "watch").catch(() => undefined);
    }
  }

  /** Config files whose content on disk is not what was last loaded into what is enforced. */
  private async filesOnDiskChanged(): Promise<string[]> {
    const { store } = this.deps;
    const files = new Set(this.known.keys());
    for (const name of await store.listServiceNames().catch(() => []))
      files.add(store.serviceFile(name));
    files.add(store.configFile);
    const changed: string[] = [];
    for (const f of files) {
      const now = await store.currentDigest(f).catch(() => null);
      if (now !== null && now !== (this.known.get(f) ?? "")) changed.push(f);
    }
    return changed.sort();
  }

  /** Findings for policy files on disk that egressd does not enforce, and why. */
  private async policyFindings(): Promise<Finding[]> {
    return (await this.filesOnDiskChanged()).map((f) => {
      const why = this.policyErrors.get(f) ?? this.policyErrors.get("*");
      return {
        kind: "policy-unapplied",
        object: `file ${f}`,
        found: why
          ? `differs from the policy egressd enforces, and does not load: ${why.message}`
          : "differs from the policy egressd enforces (not applied yet)",
      };
    });
  }

  /** Re-resolves now: every name, or those of one service. */
  async refresh(service?: string): Promise<ApplySummary & { names: string[] }> {
    if (!this.loaded || !this.names)
      throw (
        this.loadError ??
        new EgressError("ERR_EGRESS_NOT_READY", "egressd has not loaded a policy yet", {
          exitCode: 3,
        })
      );
    let names = this.names.list();
    if (service) {
      const p = this.loaded.policies.find((x) => x.name === service);
      if (!p)
        throw new EgressError(
          "ERR_EGRESS_UNKNOWN_SERVICE",
          `service "${service}" is not registered`,
          {
            hint: "egressctl list shows the registered services",
          },
        );
      names = [...new Set(domainAllowances(p).map((d) => d.name))].sort();
    }
    const summary = await this.resolveThenCommit(NameTable.lookups(names));
    return { ...summary, names };
  }

  /**
   * Periodic reconciliation (node-cron, every minute): applies whatever fell due, re-arms the
   * timer (it may have been delayed by a suspended machine or a clock jump), saves state.
   */
  housekeep(): Promise<void> {
    // The proxy filters answers with a copy of the host's addresses: read it again each minute
    // even when nothing else commits (an address added to the host is refused within a minute).
    this.host = this.deps.hostAddresses();
    return this.refreshDue()
      .catch(() => undefined)
      .finally(() => this.schedule());
  }

  /** Arms one timer for the next refresh, grace expiry or element that needs re-adding. */
  private schedule(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    // Not during start(): it enforces the saved state without a DNS query; begin() arms the timer.
    if (this.stopped || !this.begun || !this.names) return;
    const now = this.deps.clock();
    // A lookup still running is not due again: its end applies it and re-arms this timer.
    const asking = (x: Lookup) => this.inflight.has(key(x));
    const candidates = [this.names.nextEvent(now, asking), this.wakeAt].filter(
      (t): t is number => t !== null,
    );
    if (!candidates.length) return;
    const next = Math.min(...candidates);
    // Expiries are exact to the millisecond; wake just after so the address is gone when we look.
    const delay = Math.min(Math.max(0, next - now + 5), MAX_TIMER);
    this.timer = setTimeout(() => {
      this.timer = null;
      if (this.wakeAt !== null && this.wakeAt <= this.deps.clock()) this.wakeAt = null;
      void this.refreshDue().finally(() => this.schedule());
    }, delay);
  }

  /**
   * The drift audit: the live table against what egressd last applied (learned addresses that
   * expire in the next seconds are left out of the comparison: the kernel may already have
   * dropped them). A change on its way (DNS answers recorded, their commit still to come) is not
   * drift. With `repair`, reconciles the live table back to what egressd applied in one
   * transaction and audits again.
   */
  audit(repair: boolean): Promise<AuditRecord> {
    return this.serial(async () => {
      if (!this.applied || !this.loaded) {
        throw (
          this.loadError ??
          new EgressError("ERR_EGRESS_NOT_READY", "egressd has not applied a policy yet", {
            exitCode: 3,
          })
        );
      }
      const { log, clock, nft } = this.deps;
      const table = this.loaded.config.table;
      const listed = async () => parseLive(await nft.listTable(table), table, clock());
      const live = await listed();
      const policy = await this.policyFindings();
      const findings = [...policy, ...auditDiff(live, this.applied, clock())];
      let remaining = findings;
      let repaired = false;
      if (repair && findings.length > policy.length) {
        // Back to what egressd applied; a change on its way is applied by its own commit.
        const r = reconcile(live, this.applied, this.reconcileOptions(clock()));
        await this.send(r);
        repaired = true;
        remaining = [...policy, ...auditDiff(await listed(), this.applied, clock())];
      }
      const record: AuditRecord = { at: clock(), findings, repaired, remaining: remaining.length };
      this.lastAudit = record;
      this.deps.metrics?.driftFindings.inc(findings.length);
      if (repaired) this.deps.metrics?.driftRepairs.inc();
      if (findings.length) {
        log.warn(
          {
            code: "ERR_EGRESS_DRIFT",
            findings: findings.slice(0, 50),
            count: findings.length,
            opens: findings.filter((f) => f.opens).length,
          },
          `drift: ${findings.length} difference(s) between the kernel and the policy`,
        );
        if (repaired) {
          if (remaining.length)
            log.error(
              { code: "ERR_EGRESS_DRIFT", remaining: remaining.slice(0, 50) },
              "repair did not converge",
            );
          else
            log.info(
              { repaired: findings.length },
              "drift repaired: the table is as the policy says again",
            );
        }
      } else log.debug("audit: in sync");
      return record;
    });
  }

  /** Live view for `egressctl status`. */
  async status(service?: string): Promise<unknown> {
    const now = this.deps.clock();
    // What the kernel holds: never a policy that did not apply.
    const l = this.enforced;
    const table = this.names;
    let counters = new Map<string, { packets: number; bytes: number }>();
    let countersError: string | undefined;
    if (l) {
      try {
        counters = await this.deps.nft.listCounters(l.config.table);
      } catch (err) {
        countersError = (err as Error).message;
      }
    }
    const familyView = (st: NonNullable<ReturnType<NameTable["get"]>>[4]) => ({
      addresses: st.current,
      ttl: st.ttl,
      lastAnswer: st.lastAnswer,
      nextRefresh: st.nextRefresh,
      failures: st.failures,
      lastError: st.lastError,
      dropped: st.dropped,
      chain: st.chain,
    });
    const services = (l?.services ?? [])
      .filter((s) => !service || s.policy.name === service)
      .map((s) => {
        const names = [...new Set(domainAllowances(s.policy).map((d) => d.name))].sort();
        const proxy = this.deps.proxies?.stats(s.policy.name);
        return {
          name: s.policy.name,
          uid: s.uid,
          ...(s.gid !== undefined ? { gid: s.gid } : {}),
          mode: s.policy.mode,
          ...(s.policy.learning
            ? { learning: { ...s.policy.learning, active: isLearning(s.policy, now) } }
            : {}),
          dns: {
            mode: s.policy.dns,
            ...(s.policy.dns === "proxy"
              ? {
                  proxyPort: this.deps.proxies?.port(s.policy.name) ?? null,
                  queriesAllowed: proxy?.allowed ?? 0,
                  queriesRefused: proxy?.refused ?? 0,
                  queriesFailed: proxy?.failed ?? 0,
                  lastRefused: proxy?.lastRefused ?? [],
                  addressesRemoved: proxy?.addressesRemoved ?? 0,
                  lastRemoved: proxy?.lastRemoved ?? [],
                  learned: this.learned?.count(s.policy.name) ?? 0,
                }
              : {}),
          },
          refused: counters.get(serviceObject(s.policy.name)) ?? null,
          outbound: s.policy.outbound.length,
          inbound: s.policy.inbound,
          names: names.map((n) => {
            const st = table?.get(n);
            const current = new Set(FAMILIES.flatMap((f) => st?.[f].current ?? []));
            return {
              name: n,
              addresses: (table?.allowed(n, now) ?? []).map((a) => ({
                address: a,
                current: current.has(a),
                expires: st?.[a.includes(":") ? 6 : 4].until[a] ?? null,
              })),
              resolving: FAMILIES.some((f) => this.inflight.has(key({ name: n, family: f }))),
              A: st ? familyView(st[4]) : null,
              AAAA: st ? familyView(st[6]) : null,
            };
          }),
        };
      });
    if (service && !services.length) {
      throw new EgressError(
        "ERR_EGRESS_UNKNOWN_SERVICE",
        `service "${service}" is not registered (or not loaded)`,
        {
          hint: "egressctl list shows the policy on disk; egressctl apply loads it",
        },
      );
    }
    const warnings: string[] = [];
    if (l?.policies.some((p) => p.dns === "proxy") && this.deps.nameService) {
      try {
        const ns = await this.deps.nameService();
        warnings.push(...dnsBypassWarnings(ns.nsswitch, ns.nscdRunning));
      } catch {
        // No nsswitch.conf: nothing to warn about.
      }
    }
    return {
      daemon: {
        pid: process.pid,
        nft: { backend: this.deps.nft.backend, detail: this.deps.nft.detail },
        warnings,
        startedAt: this.startedAt,
        table: l ? `inet ${l.config.table}` : null,
        lastApply: this.lastApply,
        lastAudit: this.lastAudit && {
          ...this.lastAudit,
          findings: this.lastAudit.findings.length,
        },
        appliedDigest: this.digest,
        lastError: this.lastError,
        policyError: this.loadError?.toJSON() ?? null,
        policyErrors: [...this.policyErrors].map(([file, e]) => ({
          file: file === "*" ? null : file,
          ...e.toJSON(),
        })),
        starting: this.starting,
        nextEvent: table?.nextEvent(now) ?? null,
        resolving: this.inflight.size,
        metrics: this.metricsEndpoint,
        ...(countersError ? { countersError } : {}),
      },
      services,
    };
  }

  /**
   * The destinations the kernel recorded as refused (in audit mode: would have refused), for
   * every service or one: one `list set` per family, the uid of each element turned into its
   * service, and the names the daemon knows the address by now (the answers the refresh loop
   * holds for any policy's names, and what any service's DNS proxy learned). Most packets first.
   * Empty when the record is off (`refused.size` 0). Learning mode builds on this.
   */
  async refused(service?: string): Promise<RefusedEntry[]> {
    const l = this.enforced ?? this.loaded;
    if (!l)
      throw (
        this.loadError ??
        new EgressError("ERR_EGRESS_NOT_READY", "egressd has not loaded a policy yet", {
          exitCode: 3,
        })
      );
    if (service !== undefined && !l.services.some((s) => s.policy.name === service))
      throw new EgressError(
        "ERR_EGRESS_UNKNOWN_SERVICE",
        `service "${service}" is not registered (or not loaded)`,
        { hint: "egressctl list shows the policy on disk; egressctl apply loads it" },
      );
    if (l.config.refused.size <= 0) return [];
    const raw = [];
    for (const family of [4, 6] as const)
      raw.push(
        ...parseRefusedListing(await this.deps.nft.listSet(l.config.table, REFUSED_SET[family])),
      );
    const now = this.deps.clock();
    const byAddress = new Map<string, Set<string>>();
    const note = (address: string, name: string) => {
      const set = byAddress.get(address) ?? new Set<string>();
      set.add(name);
      byAddress.set(address, set);
    };
    const wanted = new Set(raw.map((r) => r.address));
    for (const name of this.names?.list() ?? [])
      for (const a of this.names?.allowed(name, now) ?? []) if (wanted.has(a)) note(a, name);
    for (const svc of l.services)
      for (const [a, names] of this.learned?.namesOf(svc.policy.name) ?? [])
        if (wanted.has(a)) for (const n of names) note(a, n);
    const serviceOf = new Map(l.services.map((svc) => [svc.uid, svc.policy.name]));
    return refusedEntries(
      raw,
      serviceOf,
      (_svc, address) => [...(byAddress.get(address) ?? [])],
      service,
    );
  }

  /** The refused record's settings as enforced (the control op reports them with the entries). */
  refusedConfig(): DaemonConfig["refused"] | null {
    return (this.enforced ?? this.loaded)?.config.refused ?? null;
  }

  /**
   * What the metrics read at a scrape: the kernel's refused counters (one listing), the
   * proxies' counts, addresses per policy name and per service. Labels are services and policy
   * names only, never addresses.
   */
  async metricsSnapshot(): Promise<MetricsSnapshot> {
    const now = this.deps.clock();
    const l = this.enforced;
    const refused = new Map<string, { packets: number; bytes: number }>();
    const proxy = new Map<string, { allowed: number; refused: number; failed: number }>();
    const nameAddresses = new Map<string, number>();
    const serviceAddresses = new Map<string, number>();
    const allowedOf = new Map<string, string[]>();
    if (l) {
      const counters = await this.deps.nft.listCounters(l.config.table).catch((err: unknown) => {
        this.deps.log.warn(
          { code: "ERR_EGRESS_NFT_FAILED", error: (err as Error).message },
          "metrics: could not read the refused counters",
        );
        return new Map<string, { packets: number; bytes: number }>();
      });
      for (const s of l.services) {
        const name = s.policy.name;
        const c = counters.get(serviceObject(name));
        if (c) refused.set(name, { packets: c.packets, bytes: c.bytes });
        if (s.policy.dns === "proxy") {
          const st = this.deps.proxies?.stats(name);
          proxy.set(name, {
            allowed: st?.allowed ?? 0,
            refused: st?.refused ?? 0,
            failed: st?.failed ?? 0,
          });
        }
        // Distinct addresses: what the proxy learned often repeats what refresh resolved.
        const reach = new Set(this.learned?.namesOf(name).keys() ?? []);
        for (const n of new Set(domainNames(s.policy))) {
          let addrs = allowedOf.get(n);
          if (!addrs) allowedOf.set(n, (addrs = this.names?.allowed(n, now) ?? []));
          nameAddresses.set(n, addrs.length);
          for (const a of addrs) reach.add(a);
        }
        serviceAddresses.set(name, reach.size);
      }
    }
    return {
      refused,
      proxy,
      nameAddresses,
      serviceAddresses,
      lastRefresh: this.lastRefresh,
      lastAudit: this.lastAudit?.at ?? null,
      generation: this.generation,
      now,
    };
  }

  /**
   * Arms one timer for the end of the next learning window: the service is then applied again
   * from its file, in the mode written there (the window is over, so audit mode ends).
   */
  private armLearning(): void {
    if (this.learnTimer) clearTimeout(this.learnTimer);
    this.learnTimer = null;
    const l = this.loaded;
    if (this.stopped || !l) return;
    const now = this.deps.clock();
    const end = nextLearningEnd(l.policies, now);
    if (end === null) return;
    this.learnTimer = setTimeout(
      () => {
        this.learnTimer = null;
        const at = this.deps.clock();
        const ended = (this.loaded?.policies ?? []).filter(
          (p) => p.learning?.until !== undefined && Date.parse(p.learning.until) <= at,
        );
        void (async () => {
          for (const p of ended) {
            if (this.stopped) break;
            this.deps.log.info(
              { service: p.name, since: p.learning?.since, until: p.learning?.until },
              `${p.name}: learning window over; enforcing its policy again (see: egressctl learn ${p.name} --show)`,
            );
            await this.applyService(p.name, "watch").catch(() => undefined);
          }
        })().finally(() => this.armLearning());
      },
      Math.min(Math.max(0, end - now + 5), MAX_TIMER),
    );
  }

  /**
   * What `egressctl learn --show` proposes from: the service's learning window, the destinations
   * it reached outside its policy (the kernel's refused-destination record), the names it looked
   * up outside its policy while learning, and why the address filter would refuse each address.
   */
  async learning(service: string): Promise<LearningReport> {
    const l = this.loaded;
    const policy = l?.policies.find((p) => p.name === service);
    if (!l || !policy) {
      throw new EgressError("ERR_EGRESS_UNKNOWN_SERVICE", `service "${service}" is not loaded`, {
        hint: `register it first: egressctl register ${service} --user <name|uid>`,
      });
    }
    const now = this.deps.clock();
    const since = policy.learning ? Date.parse(policy.learning.since) : 0;
    // Only what was seen since the window opened (an element's last packet; its counter may
    // include packets refused before, which the proposal does not need to tell apart).
    const observed = (await this.refused(service))
      .filter((e) => now - e.lastSeenSeconds * 1000 >= since - 1000)
      .map((e) => ({
        address: e.address,
        family: e.family,
        protocol: e.protocol,
        port: e.port,
        packets: e.packets,
        names: e.names,
      }));
    const lookedUp = (this.deps.proxies?.lookedUp(service, since) ?? []).map((n) => ({
      name: n.name,
      addresses: n.addresses,
    }));
    const settings = {
      allowPrivateAddresses: l.config.refresh.allowPrivateAddresses,
      hostAddresses: this.host,
    };
    const reasons: Record<string, string> = {};
    for (const a of new Set([
      ...observed.map((o) => o.address),
      ...lookedUp.flatMap((n) => n.addresses),
    ])) {
      const why = refuseReason(a, settings);
      if (why) reasons[a] = why;
    }
    const uid = l.services.find((s) => s.policy.name === service)?.uid ?? -1;
    return {
      service,
      uid,
      ...(policy.learning
        ? { learning: { ...policy.learning, active: isLearning(policy, now) } }
        : {}),
      observed,
      lookedUp,
      refuseReasons: reasons,
    };
  }

  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    if (this.learnTimer) clearTimeout(this.learnTimer);
    await this.deps.proxies?.closeAll();
    // Whatever is queued or in flight (a start, a change, a proxy transaction) ends first,
    // including work queued while waiting.
    for (let q = null as Promise<unknown> | null; q !== this.queue || this.flushing;) {
      q = this.queue;
      await Promise.all([q, this.flushing]);
    }
    if (this.saveTimer) {
      clearTimeout(this.saveTimer);
      this.saveTimer = null;
      this.savePending = true;
    }
    if (this.savePending && this.loaded) {
      this.savePending = false;
      await this.saveState(true);
    }
  }
}
