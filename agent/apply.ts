/**
 * One-shot apply: gather inputs (policy, users, DNS), call the pure compiler, and hand the
 * result to nft as one transaction. Used by `egressctl apply` and `egressd --once`.
 */
import { compile, domainAllowances, type ServiceInput } from "../rules/compile.ts";
import { diff, type Finding } from "../rules/diff.ts";
import { invalid, type Problem } from "../rules/errors.ts";
import { parseLive } from "../rules/live.ts";
import type { DaemonConfig, ServicePolicy } from "../rules/policy.ts";
import type { PolicyStore } from "../rules/policy-store.fs.ts";
import { filterAddresses, type Dropped } from "../rules/resolution.ts";
import type { Ruleset } from "../rules/ruleset.ts";
import { replaceBatch } from "../rules/batch.ts";
import { dnsResolver, resolveAll, type Resolver } from "./dns.resolver.ts";
import type { Nft } from "./nft.exec.ts";
import { configuredResolvers } from "./resolvers.fs.ts";
import type { Users } from "./users.sys.ts";
import type { ResolverAddr } from "../rules/compile.ts";

export interface Deps {
  store: PolicyStore;
  nft: Nft;
  users: Users;
  /** Builds the DNS resolver for the configured servers (tests may pass their own). */
  resolver?: (servers: readonly ResolverAddr[]) => Resolver;
}

export interface NameReport {
  name: string;
  services: string[];
  addresses: string[];
  dropped: Dropped[];
  ttl?: number;
  error?: { code: string; message: string };
}

export interface Plan {
  config: DaemonConfig;
  ruleset: Ruleset;
  services: { name: string; uid: number; gid?: number; mode: string }[];
  resolvers: ResolverAddr[];
  names: NameReport[];
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

/** Resolves every domain once and keeps what may be allowed. */
export async function resolveNames(
  policies: readonly ServicePolicy[],
  config: DaemonConfig,
  resolver: Resolver,
): Promise<NameReport[]> {
  const users = new Map<string, string[]>();
  for (const p of policies) {
    for (const d of domainAllowances(p)) {
      const list = users.get(d.name) ?? [];
      if (!list.includes(p.name)) list.push(p.name);
      users.set(d.name, list);
    }
  }
  const results = await resolveAll(resolver, [...users.keys()].sort());
  return [...users.entries()]
    .sort(([a], [b]) => a.localeCompare(b))
    .map(([name, services]) => {
      const r = results.get(name);
      if (!r || !r.ok) {
        return {
          name,
          services,
          addresses: [],
          dropped: [],
          error: r
            ? { code: r.code, message: r.message }
            : { code: "ERROR", message: "not resolved" },
        };
      }
      const f = filterAddresses(r.answer.addresses, {
        allowPrivate: config.refresh.allowPrivateAddresses,
        max: config.refresh.maxAddressesPerName,
      });
      return { name, services, addresses: f.kept, dropped: f.dropped, ttl: r.answer.ttl };
    });
}

/** Everything needed to apply: the desired table and how it came about. Touches no firewall. */
export async function plan(deps: Deps): Promise<Plan> {
  const config = await deps.store.loadConfig();
  const policies = await deps.store.loadServices();
  const services = await resolvePrincipals(policies, deps.users, (n) => deps.store.serviceFile(n));
  const resolvers = await configuredResolvers(config);
  const resolver = (deps.resolver ?? ((s) => dnsResolver(s)))(resolvers);
  const names = await resolveNames(policies, config, resolver);
  const ruleset = compile({
    table: config.table,
    resolvers,
    services,
    resolutions: new Map(names.map((n) => [n.name, n.addresses])),
  });
  return {
    config,
    ruleset,
    resolvers,
    names,
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

/** Replaces egressd's table in one transaction; on failure the previous ruleset stays. */
export async function applyRuleset(nft: Nft, ruleset: Ruleset): Promise<void> {
  await nft.apply(replaceBatch(ruleset));
}
