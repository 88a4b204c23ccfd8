/**
 * The long-running agent: keeps the kernel's table equal to the policy plus the live DNS
 * answers. Kernel changes go through one queue, so nft sees one transaction at a time: a
 * policy change replaces the table; a DNS change sends only the set elements that changed;
 * nothing changed, nothing sent. DNS queries run outside that queue, each under its deadline,
 * so a slow or hostile resolver never holds up a control request, the audit or other names.
 */
import { createHash } from "node:crypto";
import type { Logger } from "pino";
import { DROPPED_HINT, type Dropped } from "../rules/address-filter.ts";
import { replaceBatch } from "../rules/batch.ts";
import {
  checkDistinctOwners,
  compile,
  domainAllowances,
  serviceObject,
  type ResolverAddr,
  type ServiceInput,
} from "../rules/compile.ts";
import { checkInboundOverlap } from "../rules/inbound.ts";
import { deltaCommands, elementDelta, type SetChange } from "../rules/delta.ts";
import { diff, type Finding } from "../rules/diff.ts";
import { parseLive } from "../rules/live.ts";
import { EgressError } from "../rules/errors.ts";
import type { DaemonConfig, ServicePolicy } from "../rules/policy.ts";
import type { PolicyStore } from "./store/policy-store.fs.ts";
import type { Ruleset } from "../rules/ruleset.ts";
import { auditTable, resolvePrincipals } from "./apply.ts";
import { resolveAll, type Lookup, type Resolver } from "./dns/dns.client.ts";
import { FAMILIES, NameTable } from "./dns/names.ts";
import type { Nft } from "./nft/nft.exec.ts";
import { configuredResolvers } from "./dns/resolvers.fs.ts";
import type { StateStore } from "./store/state.fs.ts";
import type { Users } from "./users.sys.ts";

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
  /** Called after the config is (re)loaded, e.g. to reschedule the audit. */
  onConfig?: (config: DaemonConfig) => void;
}

interface Loaded {
  config: DaemonConfig;
  policies: ServicePolicy[];
  services: ServiceInput[];
  resolvers: ResolverAddr[];
  resolver: Resolver;
}

export interface AuditRecord {
  at: number;
  findings: Finding[];
  repaired: boolean;
  remaining: number;
}

export interface ApplySummary {
  kind: "replace" | "delta" | "none";
  /** Elements added and removed (delta), or objects in the table (replace). */
  changes: number;
  at: number;
  /** Names whose first resolution had not finished when the request had to answer. */
  pending?: string[];
}

const MAX_TIMER = 2 ** 31 - 1;
const plural = (n: number, w: string) => `${n} ${w}${n === 1 ? "" : "s"}`;
const key = (l: Lookup) => `${l.family}|${l.name}`;

/** How long a control request waits for the names it added before it answers without them. */
export function controlWaitMs(config: DaemonConfig): number {
  return 2 * config.dns.queryTimeoutMs + 1000;
}

export class Daemon {
  private loaded: Loaded | null = null;
  private names: NameTable | null = null;
  private applied: Ruleset | null = null;
  private appliedNames = new Map<string, string[]>();
  private queue: Promise<unknown> = Promise.resolve();
  private timer: NodeJS.Timeout | null = null;
  private stopped = false;
  /** Lookups on the wire, so a name is never asked twice at once. */
  private readonly inflight = new Map<string, Promise<void>>();
  /** Dropped addresses already logged, so each is logged once per name. */
  private readonly droppedLogged = new Set<string>();
  readonly startedAt: number;
  lastApply: ApplySummary | null = null;
  lastError: { code: string; message: string; at: number } | null = null;
  lastAudit: AuditRecord | null = null;
  /** Why the policy on disk is not the one enforced (null when it is). */
  loadError: EgressError | null = null;
  private digest: string | null = null;
  /** Last-known resolutions read at start-up, kept until a policy loads. */
  private savedNames: unknown = undefined;

  constructor(private readonly deps: DaemonDeps) {
    this.startedAt = deps.clock();
  }

  get config(): DaemonConfig | null {
    return this.loaded?.config ?? null;
  }

  /** Runs `fn` after everything queued before it. */
  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.queue.then(fn, fn);
    this.queue = run.catch(() => undefined);
    return run;
  }

  /**
   * Start-up: enforce from the last-known resolutions before any DNS query, then resolve
   * what is due in the background and apply the difference.
   */
  async start(): Promise<void> {
    const { log } = this.deps;
    try {
      const saved = await this.deps.state.load();
      this.savedNames = saved.state?.names;
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
    await this.serial(async () => {
      if (!(await this.load())) {
        log.error("not applying: the policy does not load; the kernel keeps its current ruleset");
        return;
      }
      this.restoreNames();
      await this.commit();
      log.info(
        {
          table: `inet ${this.loaded?.config.table}`,
          services: this.loaded?.services.length,
          names: this.names?.list().length,
          fromState: this.savedNames !== undefined,
        },
        this.savedNames !== undefined
          ? "applied from saved state, before any DNS query"
          : "applied (no saved state yet)",
      );
    });
    void this.refreshDue().finally(() => this.schedule());
  }

  /** Builds the name table from the saved state, filtered like fresh answers. */
  private restoreNames(): void {
    const l = this.loaded as Loaded;
    const now = this.deps.clock();
    const { table, problems } = NameTable.fromJSON(this.savedNames, l.config.refresh, {
      names: this.policyNames(),
      now,
      file: this.deps.state.file,
      hostAddresses: this.deps.hostAddresses(),
    });
    for (const p of problems)
      this.deps.log.warn(
        { code: "ERR_EGRESS_STATE", where: p.where },
        `saved state: ${p.where}: ${p.text}`,
      );
    this.names = table;
    this.names.track(this.policyNames(), now);
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
    const config = await store.loadConfig();
    const policies = await store.loadServices();
    const services = await resolvePrincipals(policies, users, (n) => store.serviceFile(n));
    const resolvers = await configuredResolvers(config);
    // What could stop the compiler is checked here, so a bad policy is refused before anything changes.
    checkDistinctOwners(services);
    checkInboundOverlap(policies);

    return {
      config,
      policies,
      services,
      resolvers,
      resolver: this.deps.resolver(resolvers, config),
    };
  }

  /** Loads config, policies and users. On failure keeps what was loaded before and records why. */
  private async load(): Promise<boolean> {
    const { log } = this.deps;
    try {
      const loaded = await this.read();
      this.loaded = loaded;
      log.level = loaded.config.log.level;
      this.loadError = null;
      this.deps.onConfig?.(loaded.config);
      return true;
    } catch (err) {
      const e =
        err instanceof EgressError
          ? err
          : new EgressError("ERR_EGRESS_INTERNAL", String((err as Error).message), { exitCode: 4 });
      this.loadError = e;
      this.lastError = { code: e.code, message: e.message, at: this.deps.clock() };
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

  /** What `reload` would change in the kernel, using the addresses known now (new names count as unresolved). */
  plan(): Promise<{ changes: Finding[]; table: string }> {
    return this.serial(async () => {
      const l = await this.read();
      const desired = compile({
        table: l.config.table,
        resolvers: l.resolvers,
        services: l.services,
        resolutions: this.names?.snapshot(this.deps.clock()) ?? new Map(),
      });
      const live = parseLive(await this.deps.nft.listTable(l.config.table), l.config.table);
      return { changes: diff(live, desired), table: `inet ${l.config.table}` };
    });
  }

  /**
   * Brings the kernel to the current desired table: a whole-table replace when the structure
   * changed (or nothing was applied yet), else one transaction with only the element changes,
   * else nothing at all. The filter is re-applied first (config, and the host's addresses read
   * again now), so a narrowing takes effect in this same transaction.
   */
  private async commit(): Promise<ApplySummary> {
    const { log, clock } = this.deps;
    const l = this.loaded as Loaded;
    const names = this.names as NameTable;
    const now = clock();
    const pruned = names.configure(l.config.refresh, { hostAddresses: this.deps.hostAddresses() });
    this.logDropped(pruned);
    const next = compile({
      table: l.config.table,
      resolvers: l.resolvers,
      services: l.services,
      resolutions: names.snapshot(now),
    });
    const delta = this.applied ? elementDelta(this.applied, next) : null;
    let summary: ApplySummary = { kind: "none", changes: 0, at: now };
    if (!delta || delta.length) {
      summary =
        (delta && (await this.applyDelta(next, delta, now))) || (await this.replace(next, now));
      this.lastError = null;
      this.digest = createHash("sha256")
        .update(JSON.stringify(replaceBatch(next)))
        .digest("hex");
      log.info(
        { kind: summary.kind, changes: summary.changes },
        summary.kind === "replace" ? "table replaced" : "sets updated",
      );
    }
    this.applied = next;
    this.lastApply = summary;
    this.logNameChanges(now);
    await this.saveState();
    return summary;
  }

  /** Element changes only, in one transaction; null when nft refuses them (the live table is not what we applied). */
  private async applyDelta(
    next: Ruleset,
    delta: SetChange[],
    now: number,
  ): Promise<ApplySummary | null> {
    try {
      await this.deps.nft.apply({ nftables: deltaCommands(next, delta) });
      return {
        kind: "delta",
        changes: delta.reduce((n, c) => n + c.added.length + c.removed.length, 0),
        at: now,
      };
    } catch (err) {
      this.deps.log.warn(
        { err: err instanceof EgressError ? err.toJSON() : String(err) },
        "element update refused; replacing the table",
      );
      return null;
    }
  }

  private async replace(next: Ruleset, now: number): Promise<ApplySummary> {
    try {
      await this.deps.nft.apply(replaceBatch(next));
    } catch (err) {
      const e =
        err instanceof EgressError
          ? err
          : new EgressError("ERR_EGRESS_INTERNAL", String(err), { exitCode: 4 });
      this.lastError = { code: e.code, message: e.message, at: now };
      this.deps.log.error({ err: e.toJSON() }, "apply failed; the previous ruleset stays in force");
      throw e;
    }
    return { kind: "replace", changes: next.sets.length + next.chains.length, at: now };
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

  private async saveState(): Promise<void> {
    try {
      await this.deps.state.save({
        version: 2,
        savedAt: this.deps.clock(),
        names: this.names?.toJSON() ?? {},
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

  /**
   * Resolves `lookups` (each at most once at a time, however many callers ask) and records the
   * answers. Runs outside the kernel queue; every query has its deadline.
   */
  private resolve(lookups: readonly Lookup[]): Promise<void> {
    const l = this.loaded as Loaded;
    const table = this.names as NameTable;
    const waits: Promise<void>[] = [];
    const todo: Lookup[] = [];
    for (const x of lookups) {
      const running = this.inflight.get(key(x));
      if (running) waits.push(running);
      else todo.push(x);
    }
    if (todo.length) {
      const run = resolveAll(l.resolver, todo).then((results) => {
        const now = this.deps.clock();
        for (const { name, family, result } of results) {
          if (!table.has(name)) continue; // revoked while we were asking
          table.observe(name, family, result, now);
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
      });
      const settled = run.catch((err: unknown) => {
        this.deps.log.error({ err: String(err) }, "DNS resolution failed unexpectedly");
      });
      for (const x of todo) this.inflight.set(key(x), settled);
      void settled.finally(() => {
        for (const x of todo)
          if (this.inflight.get(key(x)) === settled) this.inflight.delete(key(x));
      });
      waits.push(settled);
    }
    return Promise.all(waits).then(() => undefined);
  }

  /** Resolves what is due, then applies the difference. */
  private async refreshDue(): Promise<void> {
    if (!this.loaded || !this.names || this.stopped) return;
    const due = this.names.dueForRefresh(this.deps.clock());
    if (due.length) await this.resolve(due);
    await this.serial(() => this.commit()).catch(() => undefined);
  }

  /**
   * Resolves `lookups`, waiting at most the control deadline, then applies. Lookups still
   * running are applied when they finish, and reported as pending.
   */
  private async resolveThenCommit(lookups: readonly Lookup[]): Promise<ApplySummary> {
    const config = (this.loaded as Loaded).config;
    let finished = !lookups.length;
    const resolution = this.resolve(lookups).then(() => {
      finished = true;
    });
    if (!finished) {
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([
        resolution,
        new Promise<void>((r) => (timer = setTimeout(r, controlWaitMs(config)))),
      ]);
      clearTimeout(timer);
    }
    const summary = await this.serial(() => this.commit());
    if (finished) return summary;
    void resolution.then(() => this.serial(() => this.commit())).catch(() => undefined);
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
      if (!this.names) this.restoreNames();
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
    this.schedule();
    return summary;
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
    this.schedule();
    return { ...summary, names };
  }

  /**
   * Periodic reconciliation (node-cron, every minute): applies whatever fell due, re-arms the
   * timer (it may have been delayed by a suspended machine or a clock jump), saves state.
   */
  housekeep(): Promise<void> {
    return this.refreshDue()
      .catch(() => undefined)
      .finally(() => this.schedule());
  }

  /** Arms one timer for the next refresh or grace expiry. */
  private schedule(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    if (this.stopped || !this.names) return;
    const now = this.deps.clock();
    const next = this.names.nextEvent(now);
    if (next === null) return;
    // Expiries are exact to the millisecond; wake just after so the address is gone when we look.
    const delay = Math.min(Math.max(0, next - now + 5), MAX_TIMER);
    this.timer = setTimeout(() => {
      this.timer = null;
      void this.refreshDue().finally(() => this.schedule());
    }, delay);
  }

  /**
   * The drift audit: the live table against the table egressd last applied. With `repair`,
   * re-applies it in one transaction and audits again.
   */
  audit(repair: boolean): Promise<AuditRecord> {
    return this.serial(async () => {
      if (!this.applied) {
        throw (
          this.loadError ??
          new EgressError("ERR_EGRESS_NOT_READY", "egressd has not applied a policy yet", {
            exitCode: 3,
          })
        );
      }
      const { log, clock } = this.deps;
      const r = await auditTable(this.deps.nft, this.applied, repair);
      const record: AuditRecord = {
        at: clock(),
        findings: r.findings,
        repaired: r.repaired,
        remaining: r.remaining.length,
      };
      this.lastAudit = record;
      if (r.findings.length) {
        log.warn(
          {
            code: "ERR_EGRESS_DRIFT",
            findings: r.findings.slice(0, 50),
            count: r.findings.length,
            opens: r.findings.filter((f) => f.opens).length,
          },
          `drift: ${r.findings.length} difference(s) between the kernel and the policy`,
        );
        if (r.repaired) {
          if (r.remaining.length)
            log.error(
              { code: "ERR_EGRESS_DRIFT", remaining: r.remaining.slice(0, 50) },
              "repair did not converge",
            );
          else
            log.info(
              { repaired: r.findings.length },
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
    const l = this.loaded;
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
        return {
          name: s.policy.name,
          uid: s.uid,
          ...(s.gid !== undefined ? { gid: s.gid } : {}),
          mode: s.policy.mode,
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
    return {
      daemon: {
        pid: process.pid,
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
        nextEvent: table?.nextEvent(now) ?? null,
        resolving: this.inflight.size,
        ...(countersError ? { countersError } : {}),
      },
      services,
    };
  }

  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    await this.queue;
  }
}
