/**
 * One-shot apply: gather inputs (policy, users, DNS), call the pure compiler, and hand the
 * result to nft as one transaction. Used by `egressctl apply` and `egressd --once`.
 */
import {
  compile,
  domainAllowances,
  nameMatcher,
  nameSetNames,
  type ServiceInput,
} from "../rules/compile.ts";
import { auditDiff, type Finding } from "../rules/diff.ts";
import { invalid, type Problem } from "../rules/errors.ts";
import { parseLive } from "../rules/live.ts";
import { ROOT_REASON, type DaemonConfig, type ServicePolicy } from "../rules/policy.ts";
import type { PolicyStore } from "./store/policy-store.fs.ts";
import type { Dropped } from "../rules/address-filter.ts";
import type { Ruleset } from "../rules/ruleset.ts";
import { replaceBatch } from "../rules/batch.ts";
import { DEFAULT_MARGIN_MS, reconcile } from "../rules/reconcile.ts";
import { parsePorts } from "../rules/target.ts";
import { createHash } from "node:crypto";
import { dnsResolver, resolveAll, type Resolver } from "./dns/dns.client.ts";
import { LearnedTable } from "./dns/learned.ts";
import { FAMILIES, NameTable } from "./dns/names.ts";
import { hostAddresses } from "./host.sys.ts";
import type { StateStore } from "./store/state.fs.ts";
import type { Nft } from "./nft/nft.exec.ts";
import { configuredResolvers } from "./dns/resolvers.fs.ts";
import type { Users } from "./users.sys.ts";
import type { ResolverAddr } from "../rules/compile.ts";

export interface Deps {
  store: PolicyStore;
  nft: Nft;
  users: Users;
  /** Builds the DNS resolver for the configured servers (tests may pass their own). */
  resolver?: (servers: readonly ResolverAddr[], config: DaemonConfig) => Resolver;
  /** Where last-known resolutions are kept (shared with the daemon). */
  state?: StateStore;
  clock?: () => number;
  /** The host's own addresses (default: read from the kernel). */
  hostAddresses?: () => ReadonlySet<string>;
}

export interface NameReport {
  name: string;
  services: string[];
  addresses: string[];
  dropped: Dropped[];
  ttl?: number;
  /** Failures of this run's queries, per record type. */
  errors?: { A?: { code: string; message: string }; AAAA?: { code: string; message: string } };
}

export interface Plan {
  config: DaemonConfig;
  ruleset: Ruleset;
  services: { name: string; uid: number; gid?: number; mode: string }[];
  resolvers: ResolverAddr[];
  names: NameReport[];
  /** The DNS bookkeeping after this plan, to save once it is applied. */
  table: NameTable;
  /** What DNS-aware services learned (from the state dir), kept as it was. */
  learned: LearnedTable;
  /** Proxy ports of DNS-aware services (from the state dir), kept as they were. */
  proxyPorts: Map<string, number>;
  /** Saved-state entries that were left out, and why. */
  stateProblems: Problem[];
}

/** Looks up every service's user and group; all unknown ones are reported together. */
export async function resolvePrincipals(
  policies: readonly ServicePolicy[],
  users: Users,
  where: (name: string) => string,
): Promise<ServiceInput[]> {
  const uids = await users.users(policies.map((p) => p.user));
  const gids = await users.groups(
    policies.flatMap((p) => (p.group === undefined ? [] : [p.group])),
  );
  const problems: Problem[] = [];
  const out: ServiceInput[] = [];
  for (const policy of policies) {
    const user = uids.get(policy.user);
    const group = policy.group === undefined ? undefined : gids.get(policy.group);
    if (!user) {
      problems.push({
        where: `${where(policy.name)}: $.user`,
        text: `user "${policy.user}" does not exist on this host`,
      });
    }
    if (policy.group !== undefined && !group) {
      problems.push({
        where: `${where(policy.name)}: $.group`,
        text: `group "${policy.group}" does not exist on this host`,
      });
    }
    // A name that resolves to root (an alias, a changed passwd) would lock the host out too.
    if (user?.id === 0)
      problems.push({
        where: `${where(policy.name)}: $.user`,
        text: `user "${policy.user}" is uid 0 (root): ${ROOT_REASON}`,
      });
    if (group?.id === 0)
      problems.push({
        where: `${where(policy.name)}: $.group`,
        text: `group "${policy.group}" is gid 0 (root): ${ROOT_REASON}`,
      });
    if (user) out.push({ policy, uid: user.id, ...(group ? { gid: group.id } : {}) });
  }
  if (problems.length) {
    const missing = problems.some((p) => p.text.includes("does not exist"));
    throw invalid(
      "ERR_EGRESS_UNKNOWN_PRINCIPAL",
      missing
        ? "some services name users or groups that do not exist"
        : "some services name root as their user or group",
      problems,
      missing
        ? "create them (or re-register with --create-user), or register the service with a numeric --user"
        : "give each service its own unprivileged user (egressctl register SERVICE --user NAME --create-user)",
    );
  }
  return out;
}

/** Which services allow each name. */
function nameUsers(policies: readonly ServicePolicy[]): Map<string, string[]> {
  const users = new Map<string, string[]>();
  for (const p of policies) {
    for (const d of domainAllowances(p)) {
      const list = users.get(d.name) ?? [];
      if (!list.includes(p.name)) list.push(p.name);
      users.set(d.name, list);
    }
  }
  return users;
}

/**
 * Everything needed to apply: the desired table and how it came about. Touches no firewall.
 * `resolve: "all"` asks DNS for every name (apply); `"missing"` uses the saved resolutions and
 * asks only for names never resolved (audit: compare with what was applied, not with new answers).
 * Either way a family that fails keeps its last-known addresses from the state dir (fail-static),
 * and what the state dir holds passes the same filter as a fresh answer.
 */
export async function plan(deps: Deps, resolve: "all" | "missing" = "all"): Promise<Plan> {
  const now = (deps.clock ?? Date.now)();
  const config = await deps.store.loadConfig();
  const policies = await deps.store.loadServices();
  const services = await resolvePrincipals(policies, deps.users, (n) => deps.store.serviceFile(n));
  const resolvers = await configuredResolvers(config);
  const saved = deps.state ? (await deps.state.load()).state : null;
  const users = nameUsers(policies);
  const host = (deps.hostAddresses ?? hostAddresses)();
  const file = deps.state?.file ?? "state";
  const { table, problems } = NameTable.fromJSON(saved?.names, config.refresh, {
    names: users.keys(),
    now,
    file,
    hostAddresses: host,
  });
  const matchers = new Map(
    policies.filter((p) => p.dns === "proxy").map((p) => [p.name, nameMatcher(p)]),
  );
  const learned = LearnedTable.fromJSON(saved?.learned, config.refresh, {
    matchers,
    sets: (svc) => {
      const p = policies.find((x) => x.name === svc);
      return p ? nameSetNames(p) : new Set();
    },
    now,
    file,
    hostAddresses: host,
  });
  problems.push(...learned.problems);
  const proxyPorts = savedPorts(saved?.proxyPorts, matchers, config);
  table.track(users.keys(), now);
  const ask = NameTable.lookups(
    resolve === "all"
      ? table.list()
      : table.list().filter((n) => FAMILIES.every((f) => table.get(n)?.[f].lastAnswer === null)),
  );
  const errors = new Map<string, NonNullable<NameReport["errors"]>>();
  if (ask.length) {
    const resolver = (
      deps.resolver ?? ((s, c) => dnsResolver(s, { timeoutMs: c.dns.queryTimeoutMs }))
    )(resolvers, config);
    for (const { name, family, result } of await resolveAll(resolver, ask)) {
      table.observe(name, family, result, now);
      if (!result.ok) {
        const e = errors.get(name) ?? {};
        e[family === 4 ? "A" : "AAAA"] = { code: result.code, message: result.message };
        errors.set(name, e);
      }
    }
  }
  const resolutions = table.snapshot(now);
  const ruleset = compile({
    table: config.table,
    resolvers,
    services: services.map((s) => {
      const port = proxyPorts.get(s.policy.name);
      return port === undefined ? s : { ...s, proxyPort: port };
    }),
    resolutions,
    learned: learned.table.all(now),
    adopted: new Map([...matchers.keys()].map((s) => [s, learned.table.adoptedOf(s, now)])),
    refused: config.refused,
  });
  const names: NameReport[] = table.list().map((name) => {
    const st = table.get(name);
    const ttls = FAMILIES.map((f) => st?.[f].ttl).filter((t): t is number => typeof t === "number");
    const error = errors.get(name);
    return {
      name,
      services: users.get(name) ?? [],
      addresses: resolutions.get(name) ?? [],
      dropped: FAMILIES.flatMap((f) => st?.[f].dropped ?? []),
      ...(ttls.length ? { ttl: Math.min(...ttls) } : {}),
      ...(error ? { errors: error } : {}),
    };
  });
  return {
    config,
    ruleset,
    resolvers,
    names,
    table,
    learned: learned.table,
    proxyPorts,
    stateProblems: problems,
    services: services.map((s) => ({
      name: s.policy.name,
      uid: s.uid,
      ...(s.gid !== undefined ? { gid: s.gid } : {}),
      mode: s.policy.mode,
    })),
  };
}

/** The proxy ports saved by the daemon: DNS-aware services only, inside the configured range, each once. */
function savedPorts(
  raw: unknown,
  matchers: ReadonlyMap<string, unknown>,
  config: DaemonConfig,
): Map<string, number> {
  const out = new Map<string, number>();
  const range = parsePorts(config.dns.proxyPortRange);
  if (!raw || typeof raw !== "object" || "error" in range) return out;
  const used = new Set<number>();
  for (const [svc, port] of Object.entries(raw as Record<string, unknown>)) {
    if (!matchers.has(svc) || typeof port !== "number" || !Number.isInteger(port)) continue;
    if (port < range.low || port > range.high || used.has(port)) continue;
    used.add(port);
    out.set(svc, port);
  }
  return out;
}

/** What applying would change in the kernel: the live table against the desired one. */
export async function pendingChanges(
  nft: Nft,
  ruleset: Ruleset,
  now = Date.now(),
): Promise<Finding[]> {
  return auditDiff(parseLive(await nft.listTable(ruleset.table), ruleset.table, now), ruleset, now);
}

const ONE_SHOT = { slackMs: 0, marginMs: DEFAULT_MARGIN_MS };

/**
 * Brings the kernel's table to the plan in one transaction decided by reconcile (only what
 * differs; the whole table when there is none yet; on failure the previous ruleset stays), then
 * saves the resolutions it was built from, so the daemon and the audit start from them.
 */
export async function applyPlan(
  deps: Pick<Deps, "nft" | "state" | "clock">,
  p: Plan,
): Promise<{ kind: string; changes: number }> {
  const now = (deps.clock ?? Date.now)();
  // A running daemon owns the table; a state path that cannot be written safely: either stops
  // the apply before the kernel changes.
  await deps.state?.assertNoDaemon("a one-shot apply");
  await deps.state?.checkWritable();
  const live = parseLive(await deps.nft.listTable(p.ruleset.table), p.ruleset.table, now);
  const r = reconcile(live, p.ruleset, { now, ...ONE_SHOT });
  if (r.commands.length) await deps.nft.apply({ nftables: r.commands });
  await deps.state?.save({
    version: 2,
    savedAt: now,
    names: p.table.toJSON(),
    learned: p.learned.toJSON(),
    proxyPorts: Object.fromEntries(p.proxyPorts),
    applied: {
      digest: createHash("sha256")
        .update(JSON.stringify(replaceBatch(p.ruleset, 0)))
        .digest("hex"),
      at: now,
    },
  });
  return { kind: r.kind, changes: r.changes };
}

/** Audit: the live table against the desired one. With `repair`, reconciles the live table back in one transaction and audits again. */
export async function auditTable(
  nft: Nft,
  desired: Ruleset,
  repair: boolean,
  now = Date.now(),
  state?: StateStore,
): Promise<{ findings: Finding[]; repaired: boolean; remaining: Finding[] }> {
  const live = parseLive(await nft.listTable(desired.table), desired.table, now);
  const findings = auditDiff(live, desired, now);
  if (!repair || !findings.length) return { findings, repaired: false, remaining: findings };
  await state?.assertNoDaemon("a one-shot repair");
  const r = reconcile(live, desired, { now, ...ONE_SHOT });
  await nft.apply({ nftables: r.commands });
  return { findings, repaired: true, remaining: await pendingChanges(nft, desired, now) };
}
