/**
 * One-shot apply: gather inputs (policy, users, DNS), call the pure compiler, and hand the
 * result to nft as one transaction. Used by `egressctl apply` and `egressd --once`.
 */
import { compile, domainAllowances, type ServiceInput } from "../rules/compile.ts";
import { diff, type Finding } from "../rules/diff.ts";
import { invalid, type Problem } from "../rules/errors.ts";
import { parseLive } from "../rules/live.ts";
import type { DaemonConfig, ServicePolicy } from "../rules/policy.ts";
import type { PolicyStore } from "./store/policy-store.fs.ts";
import type { Dropped } from "../rules/address-filter.ts";
import type { Ruleset } from "../rules/ruleset.ts";
import { replaceBatch } from "../rules/batch.ts";
import { createHash } from "node:crypto";
import { dnsResolver, resolveAll, type Resolver } from "./dns/dns.client.ts";
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
    if (user) out.push({ policy, uid: user.id, ...(group ? { gid: group.id } : {}) });
  }
  if (problems.length) {
    throw invalid(
      "ERR_EGRESS_UNKNOWN_PRINCIPAL",
      "some services name users or groups that do not exist",
      problems,
      "create them (or re-register with --create-user), or register the service with a numeric --user",
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
  const { table, problems } = NameTable.fromJSON(saved?.names, config.refresh, {
    names: users.keys(),
    now,
    file: deps.state?.file ?? "state",
    hostAddresses: (deps.hostAddresses ?? hostAddresses)(),
  });
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
  const ruleset = compile({ table: config.table, resolvers, services, resolutions });
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
    stateProblems: problems,
    services: services.map((s) => ({
      name: s.policy.name,
      uid: s.uid,
      ...(s.gid !== undefined ? { gid: s.gid } : {}),
      mode: s.policy.mode,
    })),
  };
}

/** What applying would change in the kernel: the live table against the desired one. */
export async function pendingChanges(nft: Nft, ruleset: Ruleset): Promise<Finding[]> {
  return diff(parseLive(await nft.listTable(ruleset.table), ruleset.table), ruleset);
}

/**
 * Replaces egressd's table in one transaction (on failure the previous ruleset stays), then
 * saves the resolutions it was built from, so the daemon and the audit start from them.
 */
export async function applyPlan(
  deps: Pick<Deps, "nft" | "state" | "clock">,
  p: Plan,
): Promise<void> {
  const batch = replaceBatch(p.ruleset);
  // A state path that cannot be written safely stops the apply before the kernel changes.
  await deps.state?.checkWritable();
  await deps.nft.apply(batch);
  await deps.state?.save({
    version: 2,
    savedAt: (deps.clock ?? Date.now)(),
    names: p.table.toJSON(),
    applied: {
      digest: createHash("sha256").update(JSON.stringify(batch)).digest("hex"),
      at: (deps.clock ?? Date.now)(),
    },
  });
}

/** Audit: the live table against the desired one. With `repair`, re-applies the desired table in one transaction and audits again. */
export async function auditTable(
  nft: Nft,
  desired: Ruleset,
  repair: boolean,
): Promise<{ findings: Finding[]; repaired: boolean; remaining: Finding[] }> {
  const findings = await pendingChanges(nft, desired);
  if (!repair || !findings.length) return { findings, repaired: false, remaining: findings };
  await nft.apply(replaceBatch(desired));
  return { findings, repaired: true, remaining: await pendingChanges(nft, desired) };
}
