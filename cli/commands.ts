/** egressctl's command handlers: each gathers inputs, calls the pure parts, and returns data. */
import type { Deps, Plan } from "../agent/apply.ts";
import { DROPPED_HINT } from "../rules/address-filter.ts";
import type { Call } from "../agent/control/control.sock.ts";
import type { ApplySummary } from "../agent/daemon.ts";
import type { Finding } from "../rules/diff.ts";
import { EgressError, invalid, type ExitCode, type Problem } from "../rules/errors.ts";
import {
  DNS_MODES,
  ROOT_REASON,
  SERVICE_NAME,
  type DnsMode,
  type Mode,
  type ServicePolicy,
} from "../rules/policy.ts";
import { listenerText, undeclaredListeners, type Listener } from "../rules/listeners.ts";
import { formatRefused, type RefusedConfig, type RefusedEntry } from "../rules/refused.ts";
import type { Sockets } from "../agent/sockets.sys.ts";
import { formatTarget, parseTarget, TARGET_HINT, type OutboundRule } from "../rules/target.ts";

/** The one-shot path (compiler, DNS client, nft), loaded only by commands that need it. */
const oneShot = () => import("../agent/apply.ts");

export interface Result {
  exitCode: ExitCode;
  /** Human-readable output for stdout. */
  text: string;
  /** Machine-readable output for `--json`. */
  data: unknown;
  /** Lines for stderr in human mode (warnings). */
  warnings?: string[];
}

export interface Ctx extends Deps {
  /** The running egressd's control socket, or null when none runs. */
  daemon: () => Promise<Call | null>;
  /** The kernel's socket table: which ports a uid listens on. */
  sockets: Sockets;
}

const SERVICE_NAME_HINT =
  "service names are 1-32 characters: lowercase letters, digits and hyphens, starting with a letter (e.g. svc-web)";

export function checkServiceName(name: string): void {
  if (!SERVICE_NAME.test(name)) {
    throw invalid(
      "ERR_EGRESS_SERVICE_NAME",
      `invalid service name "${name}"`,
      [{ where: "argument <service>", text: SERVICE_NAME_HINT }],
      "name the service after what it is, e.g. svc-web; it need not match the user's name",
    );
  }
}

/** "--user 2001" is a uid, "--user svc-web" a name. */
export function parsePrincipal(text: string, flag: string): string | number {
  if (/^[0-9]+$/.test(text)) {
    const n = Number(text);
    if (n > 4294967294)
      throw invalid(
        "ERR_EGRESS_ID",
        `invalid ${flag.slice(2)} id "${text}"`,
        [{ where: flag, text: "ids are 0-4294967294" }],
        '4294967295 is (uid_t) -1, never a real id: pass the id that "id -u NAME" prints, or the name',
      );
    return n;
  }
  if (!/^[a-z_][a-z0-9_.-]{0,31}\$?$/.test(text)) {
    throw invalid(
      "ERR_EGRESS_PRINCIPAL",
      `invalid ${flag.slice(2)} name "${text}"`,
      [
        {
          where: flag,
          text: "use a numeric id or a user name of lowercase letters, digits, '_', '-' or '.'",
        },
      ],
      "names are at most 32 characters and start with a letter or '_'",
    );
  }
  return text;
}

export async function requireService(ctx: Ctx, name: string): Promise<ServicePolicy> {
  checkServiceName(name);
  const p = await ctx.store.loadService(name);
  if (!p) {
    throw new EgressError("ERR_EGRESS_UNKNOWN_SERVICE", `service "${name}" is not registered`, {
      hint: `register it first: egressctl register ${name} --user <name|uid>`,
    });
  }
  return p;
}

function parseTargets(args: readonly string[]): OutboundRule[] {
  const problems: Problem[] = [];
  const hints: string[] = [];
  const out: OutboundRule[] = [];
  for (const a of args) {
    const t = parseTarget(a);
    if ("error" in t) {
      problems.push({ where: `target "${a}"`, text: t.error });
      const hint = t.hint ?? TARGET_HINT;
      if (!hints.includes(hint)) hints.push(hint);
    } else out.push(t);
  }
  if (problems.length) {
    const only = problems.length === 1 ? problems[0]?.text : undefined;
    // Each failure's hint comes from what failed; several different ones are all given.
    throw invalid(
      "ERR_EGRESS_TARGET",
      only ?? `${problems.length} invalid targets`,
      only ? [] : problems,
      hints.join("; "),
    );
  }
  return out;
}

const sameRule = (a: OutboundRule, b: OutboundRule) =>
  a.host === b.host && a.ports === b.ports && a.protocol === b.protocol;

/** How a kernel change reads: "3 set element(s) changed", "1 service's objects updated", "table replaced". */
export function changeText(r: { kind: string; changes: number }): string {
  switch (r.kind) {
    case "none":
      return "no kernel change needed";
    case "elements":
      return `${r.changes} set element(s) changed`;
    case "objects":
      return `${r.changes} object(s) updated`;
    default:
      return "table replaced";
  }
}

/** "; still resolving: a.example, b.example" when a request answered before its names resolved. */
export function pendingText(r: { pending?: string[] }): string {
  return r.pending?.length
    ? `; still resolving: ${r.pending.join(", ")} (applied when DNS answers)`
    : "";
}

/**
 * Saves one service's new policy (`next`; null removes it) and makes it take effect. With
 * egressd running, the daemon applies that one service (it checks it against the others it has
 * loaded; nothing here reads their files); if it refuses, the file goes back to `previous` and
 * nothing has changed. Without egressd, `localChecks` (which may read the other files) decide,
 * and the change waits for egressd or `egressctl apply`. Call inside `ctx.store.locked`.
 */
export async function commitChange(
  ctx: Ctx,
  service: string,
  previous: ServicePolicy | null,
  next: ServicePolicy | null,
  localChecks: () => Promise<void> = async () => undefined,
): Promise<{ applied: boolean; note: string }> {
  const call = await ctx.daemon();
  if (!call) await localChecks();
  const save = (p: ServicePolicy | null) =>
    p ? ctx.store.writeService(p) : ctx.store.removeService(service);
  await save(next);
  if (!call) {
    return {
      applied: false,
      note: "saved; egressd is not running, so this takes effect when egressd starts (or run: egressctl apply)",
    };
  }
  try {
    const r = (await call({ op: "service", service })) as ApplySummary;
    return { applied: true, note: `applied by egressd (${changeText(r)})${pendingText(r)}` };
  } catch (err) {
    if (!(err instanceof EgressError)) throw err;
    // The daemon keeps enforcing what it had: put the file back, so disk and kernel agree.
    await save(previous);
    throw new EgressError(err.code, `not changed: egressd refused it: ${err.message}`, {
      exitCode: err.exitCode,
      problems: err.problems,
      hint: err.hint ?? "fix the problem, then retry",
    });
  }
}

/** Refuses root as a service's user or group (by id, so a name that resolves to 0 is caught too). */
function refuseRoot(service: string, kind: "user" | "group", spec: string | number): never {
  const id = kind === "user" ? "uid 0" : "gid 0";
  throw new EgressError(
    "ERR_EGRESS_ROOT",
    `refusing to register ${service} as ${kind} ${String(spec)} (${id}): ${ROOT_REASON}`,
    {
      hint: `run the service as its own unprivileged user: egressctl register ${service} --user ${service} --create-user`,
    },
  );
}

/** The policy file of a service being registered: its allowances kept, the rest from the flags. */
function registered(
  service: string,
  existing: ServicePolicy | null,
  user: string | number,
  group: string | number | undefined,
  mode: Mode,
  dns: DnsMode,
): ServicePolicy {
  return {
    name: service,
    user,
    ...(group !== undefined ? { group } : {}),
    mode,
    dns,
    outbound: existing?.outbound ?? [],
    inbound: existing?.inbound ?? [],
  };
}

/** The error (or, with --force or in audit mode, the warning) for listeners the policy would cut off. */
function listenersProblem(
  service: string,
  user: string | number,
  uid: number,
  cut: readonly Listener[],
  existing: boolean,
): { message: string; hint: string } {
  const ports = cut.map(listenerText).join(", ");
  const declare = cut.map((l) => `egressctl allow-in ${service} ${l.port}/${l.protocol}`);
  return {
    message: `uid ${uid} listens on ports ${service} does not declare: ${ports}; once ${service} is enforced they stop accepting new connections`,
    hint: existing
      ? `declare them first (${declare.join("; ")}), or add --force to register anyway`
      : `register in audit mode first (egressctl register ${service} --user ${String(user)} --mode audit), declare them (${declare.join("; ")}), then register again without --mode audit; or add --force to register anyway`,
  };
}

export async function register(
  ctx: Ctx,
  service: string,
  opts: {
    user: string;
    group?: string;
    createUser?: boolean;
    mode?: string;
    dns?: string;
    force?: boolean;
  },
): Promise<Result> {
  checkServiceName(service);
  const mode = (opts.mode ?? "enforce") as Mode;
  if (mode !== "enforce" && mode !== "audit") {
    throw invalid(
      "ERR_EGRESS_MODE",
      `invalid mode "${opts.mode}"`,
      [{ where: "--mode", text: "use enforce or audit" }],
      "enforce refuses what is not allowed; audit only logs and counts it",
    );
  }
  if (opts.dns !== undefined && !DNS_MODES.includes(opts.dns as DnsMode)) {
    throw invalid(
      "ERR_EGRESS_DNS_MODE",
      `invalid DNS mode "${opts.dns}"`,
      [{ where: "--dns", text: "use proxy, system or none" }],
      "proxy: egressd answers the service's lookups (allowed names only); system: it may reach the configured resolvers; none: no DNS",
    );
  }
  const user = parsePrincipal(opts.user, "--user");
  const group = opts.group === undefined ? undefined : parsePrincipal(opts.group, "--group");
  if (opts.createUser && typeof user === "number") {
    throw invalid(
      "ERR_EGRESS_CREATE_USER",
      `--create-user needs a user name, not the uid "${user}"`,
      [{ where: "--user", text: "give the name of the account to create" }],
      "--create-user makes a system account of that name; an existing uid needs no --create-user",
    );
  }
  if (user === 0) refuseRoot(service, "user", user);
  if (group === 0) refuseRoot(service, "group", group);
  return ctx.store.locked(async () => {
    // Every refusal comes before --create-user creates anything.
    const found = (await ctx.users.users([user])).get(user);
    if (!found && !opts.createUser) {
      throw new EgressError(
        "ERR_EGRESS_UNKNOWN_USER",
        `user "${user}" does not exist on this host`,
        {
          hint: `add --create-user to create a locked system account, or create it with useradd --system ${user}`,
        },
      );
    }
    if (found?.id === 0) refuseRoot(service, "user", user);
    if (group !== undefined) {
      const g = (await ctx.users.groups([group])).get(group);
      if (!g) {
        throw new EgressError(
          "ERR_EGRESS_UNKNOWN_GROUP",
          `group "${group}" does not exist on this host`,
          {
            hint: `create it (groupadd --system ${group}) or pass a numeric gid`,
          },
        );
      }
      if (g.id === 0) refuseRoot(service, "group", group);
    }
    const existing = await ctx.store.loadService(service);
    const dns = (opts.dns as DnsMode | undefined) ?? existing?.dns ?? "proxy";
    const wild = (existing?.outbound ?? []).filter((o) => o.host.startsWith("*."));
    if (wild.length && dns !== "proxy") {
      throw invalid(
        "ERR_EGRESS_WILDCARD_MODE",
        `${service} allows ${wild.map(formatTarget).join(", ")}, and wildcards need DNS-aware mode`,
        [],
        `revoke them first (egressctl revoke ${service} ${wild.map(formatTarget).join(" ")}), or keep --dns proxy`,
      );
    }
    const policy = registered(service, existing, user, group, mode, dns);
    // A uid that already serves ports the policy does not declare would stop serving them.
    const cut = found
      ? undeclaredListeners(await ctx.sockets.listeners(found.id), policy.inbound)
      : [];
    const warnings: string[] = [];
    if (cut.length && found) {
      const p = listenersProblem(service, user, found.id, cut, existing !== null);
      if (mode === "enforce" && !opts.force)
        throw new EgressError("ERR_EGRESS_LISTENERS", p.message, { hint: p.hint });
      warnings.push(
        mode === "audit"
          ? `warning: ${p.message}; declare them with allow-in before switching to enforce mode`
          : `warning: ${p.message} (registered anyway: --force)`,
      );
    }
    const uid = found ?? (await ctx.users.createUser(String(user)));
    const created = !found;
    const effect = await commitChange(ctx, service, existing, policy, async () => {
      const others = (await ctx.store.loadServices()).filter((p) => p.name !== service);
      const [{ resolvePrincipals }, { checkDistinctOwners }] = await Promise.all([
        oneShot(),
        import("../rules/compile.ts"),
      ]);
      checkDistinctOwners(
        await resolvePrincipals([...others, policy], ctx.users, (n) => ctx.store.serviceFile(n)),
      );
    });
    const verb = existing ? "updated" : "registered";
    return {
      exitCode: 0,
      text: `${verb} ${service}: user ${String(user)} (uid ${uid.id})${created ? ", created" : ""}, mode ${mode}, dns ${dns}\n${effect.note}\n`,
      data: {
        service,
        action: verb,
        uid: uid.id,
        createdUser: created,
        policy,
        applied: effect.applied,
        undeclaredListeners: cut,
      },
      warnings,
    };
  });
}

export async function unregister(ctx: Ctx, service: string): Promise<Result> {
  return ctx.store.locked(async () => {
    const previous = await requireService(ctx, service);
    const effect = await commitChange(ctx, service, previous, null);
    return {
      exitCode: 0,
      text: `unregistered ${service}\n${effect.note}\n`,
      data: { service, action: "unregistered", applied: effect.applied },
    };
  });
}

export async function allow(
  ctx: Ctx,
  service: string,
  targets: readonly string[],
): Promise<Result> {
  checkServiceName(service);
  const rules = parseTargets(targets);
  return ctx.store.locked(async () => {
    const p = await requireService(ctx, service);
    const wild = rules.filter((r) => r.host.startsWith("*."));
    if (wild.length && p.dns !== "proxy") {
      throw invalid(
        "ERR_EGRESS_WILDCARD_MODE",
        `${service} is not DNS-aware (its dns is "${p.dns}"), so it cannot allow ${wild.map(formatTarget).join(", ")}`,
        [],
        `wildcards need "dns": "proxy", where egressd answers the service's own lookups: egressctl register ${service} --user ${String(p.user)} --dns proxy; or allow each name`,
      );
    }
    const added = rules.filter(
      (r, i) =>
        !p.outbound.some((o) => sameRule(o, r)) && rules.findIndex((x) => sameRule(x, r)) === i,
    );
    const already = rules.filter((r) => p.outbound.some((o) => sameRule(o, r)));
    const effect = added.length
      ? await commitChange(ctx, service, p, { ...p, outbound: [...p.outbound, ...added] })
      : { applied: false, note: "nothing changed" };
    const lines = [
      ...(added.length ? [`${service}: allowed ${added.map(formatTarget).join(", ")}`] : []),
      ...(already.length
        ? [`${service}: already allowed ${already.map(formatTarget).join(", ")}`]
        : []),
      effect.note,
    ];
    return {
      exitCode: 0,
      text: lines.join("\n") + "\n",
      data: {
        service,
        added: added.map(formatTarget),
        unchanged: already.map(formatTarget),
        applied: effect.applied,
      },
    };
  });
}

export async function revoke(
  ctx: Ctx,
  service: string,
  targets: readonly string[],
): Promise<Result> {
  checkServiceName(service);
  const rules = parseTargets(targets);
  return ctx.store.locked(async () => {
    const p = await requireService(ctx, service);
    const missing = rules.filter((r) => !p.outbound.some((o) => sameRule(o, r)));
    if (missing.length) {
      throw invalid(
        "ERR_EGRESS_NOT_ALLOWED",
        `${service} does not allow ${missing.map(formatTarget).join(", ")}; nothing was revoked`,
        [],
        p.outbound.length
          ? `its allowances: ${p.outbound.map(formatTarget).join(", ")}`
          : `${service} has no outbound allowances`,
      );
    }
    const effect = await commitChange(ctx, service, p, {
      ...p,
      outbound: p.outbound.filter((o) => !rules.some((r) => sameRule(o, r))),
    });
    return {
      exitCode: 0,
      text: `${service}: revoked ${rules.map(formatTarget).join(", ")}\n${effect.note}\n`,
      data: { service, removed: rules.map(formatTarget), applied: effect.applied },
    };
  });
}

function policyText(p: ServicePolicy): string {
  const head = `${p.name}  user ${String(p.user)}${p.group !== undefined ? `  group ${String(p.group)}` : ""}  mode ${p.mode}  dns ${p.dns}`;
  const out = p.outbound.map((o) => `  out ${formatTarget(o)}`);
  const inb = p.inbound.map(
    (r) =>
      `  in  ${r.ports}/${r.protocol}${r.from?.length ? ` from ${r.from.join(", ")}` : " from anywhere"}`,
  );
  const none = out.length + inb.length ? [] : ["  (no allowances: everything it sends is refused)"];
  return [head, ...out, ...inb, ...none].join("\n");
}

export async function list(ctx: Ctx, service?: string): Promise<Result> {
  const policies = service ? [await requireService(ctx, service)] : await ctx.store.loadServices();
  return {
    exitCode: 0,
    text: policies.length
      ? policies.map(policyText).join("\n\n") + "\n"
      : "no services registered\n",
    data: { services: policies },
  };
}

const SIGN: Record<string, string> = { missing: "+", extra: "-", changed: "~", reordered: "~" };

/** One line per change: "+" added, "-" removed, "~" changed. */
export function changeLines(findings: readonly Finding[]): string[] {
  return findings.map((f) => {
    const sign = SIGN[f.kind.split("-").pop() ?? ""] ?? "?";
    const part = f.kind.split("-")[0];
    const where =
      part === "rule" || part === "element" || part === "rules"
        ? `${part} in ${f.object}`
        : f.object;
    const detail =
      f.kind.endsWith("changed") || f.kind.endsWith("reordered")
        ? `${f.found ?? ""} -> ${f.expected ?? ""}`
        : (f.expected ?? f.found ?? "");
    return `  ${sign} ${where}${detail ? `: ${detail}` : ""}`;
  });
}

function nameWarnings(p: Plan): string[] {
  const out: string[] = [];
  for (const sp of p.stateProblems) out.push(`warning: saved state: ${sp.where}: ${sp.text}`);
  let dropped = false;
  for (const n of p.names) {
    for (const [type, e] of Object.entries(n.errors ?? {})) {
      const keep = n.addresses.length
        ? `allowing its ${n.addresses.length} known address(es)`
        : "it allows nothing until it resolves";
      out.push(
        `warning: ${n.name} (${n.services.join(", ")}) did not resolve (${type}): ${e.message}; ${keep}`,
      );
    }
    for (const d of n.dropped) {
      out.push(`warning: ${n.name}: not allowing ${d.address} (${d.reason})`);
      dropped = true;
    }
  }
  if (dropped) out.push(`hint: ${DROPPED_HINT}`);
  return out;
}

function dryRunText(table: string, changes: readonly Finding[]): string {
  return changes.length
    ? `dry run: ${changes.length} change(s) would be made to table ${table}:\n${changeLines(changes).join("\n")}\n`
    : `dry run: table ${table} is already as the policy says; nothing would change\n`;
}

export async function apply(ctx: Ctx, opts: { dryRun?: boolean }): Promise<Result> {
  const call = await ctx.daemon();
  if (call) {
    // The daemon owns the kernel table and the DNS state while it runs: ask it.
    if (opts.dryRun) {
      const r = (await call({ op: "apply", dryRun: true })) as {
        changes: Finding[];
        table: string;
      };
      return {
        exitCode: 0,
        text: dryRunText(r.table, r.changes),
        data: { dryRun: true, daemon: true, ...r },
      };
    }
    const r = (await call({ op: "apply" })) as ApplySummary;
    return {
      exitCode: 0,
      text: `applied by egressd: ${r.kind === "none" ? "the kernel already matched the policy" : changeText(r)}${pendingText(r)}\n`,
      data: { dryRun: false, daemon: true, ...r },
    };
  }
  const { applyPlan, pendingChanges, plan } = await oneShot();
  const p = await plan(ctx);
  const summary = { table: `inet ${p.ruleset.table}`, services: p.services, names: p.names };
  if (opts.dryRun) {
    const changes = await pendingChanges(ctx.nft, p.ruleset);
    return {
      exitCode: 0,
      text: dryRunText(summary.table, changes),
      data: { dryRun: true, ...summary, changes },
      warnings: nameWarnings(p),
    };
  }
  await applyPlan(ctx, p);
  const failed = p.names.filter((n) => n.errors && !n.addresses.length).length;
  return {
    exitCode: 0,
    text: `applied table inet ${p.ruleset.table}: ${p.services.length} service(s), ${p.names.length} name(s)${failed ? ` (${failed} unresolved)` : ""} through ${ctx.nft.backend}\n`,
    data: { dryRun: false, ...summary, nft: { backend: ctx.nft.backend, detail: ctx.nft.detail } },
    warnings: nameWarnings(p),
  };
}

export async function requireDaemon(ctx: Ctx, what: string): Promise<Call> {
  const call = await ctx.daemon();
  if (!call) {
    throw new EgressError(
      "ERR_EGRESS_NOT_RUNNING",
      `egressd is not running, so there is no live ${what} to show`,
      {
        exitCode: 3,
        hint: "start it (systemctl start egressd); egressctl list shows the policy as written",
      },
    );
  }
  return call;
}

const time = (ms: number | null | undefined) =>
  ms ? new Date(ms).toISOString().replace(/\.\d+Z$/, "Z") : "never";

interface StatusData {
  daemon: {
    pid: number;
    table: string | null;
    lastApply: ApplySummary | null;
    lastAudit: { at: number; findings: number; repaired: boolean; remaining: number } | null;
    lastError: { code: string; message: string; at: number } | null;
    policyError: { message: string; problems?: { where: string; text: string }[] } | null;
    policyErrors?: {
      file: string | null;
      message: string;
      problems?: { where: string; text: string }[];
    }[];
    starting?: boolean;
    resolving?: number;
    nft?: { backend: string; detail: string };
    warnings?: string[];
    metrics?: { listen: string | null; error: string | null };
  };
  services: {
    name: string;
    uid: number;
    gid?: number;
    mode: string;
    dns?: {
      mode: string;
      proxyPort?: number | null;
      queriesAllowed?: number;
      queriesRefused?: number;
      queriesFailed?: number;
      lastRefused?: { name: string; at: number }[];
      addressesRemoved?: number;
      lastRemoved?: { name: string; address: string; reason: string }[];
      learned?: number;
    };
    refused: { packets: number; bytes: number } | null;
    inbound: { ports: string; protocol: string; from?: string[] }[];
    names: {
      name: string;
      addresses: { address: string; current: boolean; expires: number | null }[];
      resolving: boolean;
      A: FamilyStatus | null;
      AAAA: FamilyStatus | null;
    }[];
  }[];
}

interface FamilyStatus {
  addresses: string[];
  ttl: number | null;
  lastAnswer: number | null;
  nextRefresh: number;
  failures: number;
  lastError: { code: string; message: string } | null;
  dropped: { address: string; reason: string }[];
  chain: string[];
}

function statusText(s: StatusData): string {
  const d = s.daemon;
  const lines = [
    `egressd running (pid ${d.pid}), table ${d.table ?? "-"}, last apply ${time(d.lastApply?.at)}${d.lastApply ? ` (${d.lastApply.kind})` : ""}${d.nft ? `, nft via ${d.nft.backend}` : ""}`,
  ];
  for (const w of d.warnings ?? []) lines.push(`  warning: ${w}`);
  const a = d.lastAudit;
  const auditResult = (x: NonNullable<typeof a>) =>
    x.findings
      ? `${x.findings} difference(s)${x.repaired ? (x.remaining ? `, repair left ${x.remaining}` : ", repaired") : ""}`
      : "in sync";
  lines.push(a ? `  last audit ${time(a.at)}: ${auditResult(a)}` : "  no audit yet");
  if (d.lastError)
    lines.push(
      `  last error: ${d.lastError.message} (${d.lastError.code}, ${time(d.lastError.at)})`,
    );
  if (d.starting)
    lines.push("  starting: applying the saved ruleset; changes sent now are applied after it");
  if (d.resolving) lines.push(`  resolving: ${d.resolving} lookup(s) on the wire`);
  if (d.metrics?.error) lines.push(`  metrics endpoint NOT listening: ${d.metrics.error}`);
  else if (d.metrics?.listen) lines.push(`  metrics on ${d.metrics.listen}`);
  const errors = d.policyErrors ?? (d.policyError ? [{ file: null, ...d.policyError }] : []);
  for (const pe of errors) {
    lines.push(
      `  policy on disk NOT applied${pe.file ? ` (${pe.file})` : ""}: ${pe.message}; still enforcing the last good policy`,
    );
    for (const p of pe.problems ?? []) lines.push(`    ${p.where}: ${p.text}`);
  }
  for (const svc of s.services) {
    lines.push(
      "",
      `${svc.name}  uid ${svc.uid}${svc.gid !== undefined ? `  gid ${svc.gid}` : ""}  ${svc.mode}  ${svc.mode === "audit" ? "would have refused" : "refused"} ${svc.refused?.packets ?? 0} packets`,
    );
    const dns = svc.dns;
    if (dns?.mode === "proxy") {
      const last = dns.lastRefused?.length
        ? ` (last: ${[...new Set(dns.lastRefused.map((x) => x.name))].slice(0, 5).join(", ")})`
        : "";
      lines.push(
        dns.proxyPort
          ? `  dns proxy on port ${dns.proxyPort}: ${dns.queriesAllowed ?? 0} allowed, ${dns.queriesRefused ?? 0} refused${last}, ${dns.queriesFailed ?? 0} failed; ${dns.learned ?? 0} learned address(es)`
          : "  dns proxy NOT listening: its lookups fail (see the log for why)",
      );
      const removed = dns.lastRemoved?.[0];
      if (dns.addressesRemoved && removed)
        lines.push(
          `  dns answers: ${dns.addressesRemoved} refused address(es) removed (last: ${removed.name} ${removed.address}, ${removed.reason})`,
        );
    } else if (dns) lines.push(`  dns ${dns.mode}`);
    for (const r of svc.inbound)
      lines.push(`  in  ${r.ports}/${r.protocol} from ${r.from?.join(", ") || "anywhere"}`);
    for (const n of svc.names) {
      const addrs = n.addresses.map((a) =>
        a.current ? a.address : `${a.address} (until ${time(a.expires)})`,
      );
      lines.push(
        `  ${n.name}: ${addrs.join(", ") || "(no addresses)"}${n.resolving ? " (resolving)" : ""}`,
      );
      for (const [type, f] of [
        ["A", n.A],
        ["AAAA", n.AAAA],
      ] as const) {
        if (!f) continue;
        const state = f.lastError
          ? `${f.lastError.code}${f.failures > 1 ? ` x${f.failures}` : ""}: ${f.lastError.message}${f.addresses.length ? ", keeping the last-known addresses" : ""}`
          : f.lastAnswer === null
            ? "not answered yet"
            : f.addresses.length
              ? `${f.addresses.length} address(es), TTL ${f.ttl ?? "?"} s`
              : "no records (NODATA)";
        lines.push(
          `    ${type.padEnd(4)} ${state}; answered ${time(f.lastAnswer)}, next ${time(f.nextRefresh)}`,
        );
        for (const d of f.dropped) lines.push(`         not allowing ${d.address}: ${d.reason}`);
      }
    }
  }
  return lines.join("\n") + "\n";
}

export async function status(ctx: Ctx, service?: string): Promise<Result> {
  if (service) checkServiceName(service);
  const call = await requireDaemon(ctx, "status");
  const data = (await call({ op: "status", ...(service ? { service } : {}) })) as StatusData;
  return { exitCode: 0, text: statusText(data), data };
}

/** The Prometheus text the metrics endpoint serves (read through the control socket). */
export async function metrics(ctx: Ctx): Promise<Result> {
  const call = await requireDaemon(ctx, "metrics");
  const r = (await call({ op: "metrics" })) as { text: string; listen: string | null };
  return { exitCode: 0, text: r.text, data: r };
}

/**
 * The destinations the kernel recorded as refused, through the daemon (it knows which service a
 * uid is and which names an address came from). Without a daemon: exit 3, nothing is read.
 */
export async function refused(ctx: Ctx, service?: string): Promise<Result> {
  if (service) checkServiceName(service);
  const call = await requireDaemon(ctx, "refused-destination record");
  const r = (await call({ op: "refused", ...(service ? { service } : {}) })) as {
    entries: RefusedEntry[];
    record: RefusedConfig | null;
  };
  const off = r.record !== null && r.record.size <= 0;
  const text = off
    ? 'the refused-destination record is off ("refused": {"size": 0} in egressd.json)'
    : formatRefused(r.entries, service);
  return { exitCode: 0, text: `${text}\n`, data: r };
}

export async function refresh(ctx: Ctx, service?: string): Promise<Result> {
  if (service) checkServiceName(service);
  const call = await requireDaemon(ctx, "DNS state");
  const r = (await call({ op: "refresh", ...(service ? { service } : {}) })) as ApplySummary & {
    names: string[];
  };
  return {
    exitCode: 0,
    text: `re-resolved ${r.names.length} name(s); ${r.kind === "none" ? "no change" : changeText(r)}${pendingText(r)}\n`,
    data: r,
  };
}

/** One line per finding, the ones that may open the firewall marked with "!". */
export function findingLines(findings: readonly Finding[]): string[] {
  return findings.map((f) => {
    const [part, what] = [f.kind.split("-")[0], f.kind.split("-").slice(1).join("-")];
    const where =
      part === "rule" || part === "element" || part === "rules"
        ? `${part} in ${f.object}`
        : f.object;
    const detail =
      what === "changed" || what === "reordered"
        ? `expected ${f.expected ?? ""}, found ${f.found ?? ""}`
        : (f.expected ?? f.found ?? "");
    const why =
      f.kind === "element-extra" && f.opens ? "  (allows traffic the policy does not)" : "";
    return `${f.opens ? "!" : " "} ${what.padEnd(9)} ${where}${detail ? `: ${detail}` : ""}${why}`;
  });
}

export async function audit(ctx: Ctx, opts: { repair?: boolean }): Promise<Result> {
  const repair = Boolean(opts.repair);
  const call = await ctx.daemon();
  let table: string;
  let r: { findings: Finding[]; repaired: boolean; remaining: number };
  if (call) {
    r = (await call({ op: "audit", repair })) as typeof r;
    table = "the table egressd applied";
  } else {
    // Compare with what was applied: the saved resolutions, not new DNS answers.
    const { auditTable, plan } = await oneShot();
    const p = await plan(ctx, "missing");
    const a = await auditTable(ctx.nft, p.ruleset, repair, Date.now(), ctx.state);
    r = { findings: a.findings, repaired: a.repaired, remaining: a.remaining.length };
    table = `table inet ${p.ruleset.table}`;
  }
  const lines: string[] = [];
  if (!r.findings.length)
    lines.push(`in sync: the kernel holds ${table} exactly as the policy says`);
  else {
    const opening = r.findings.filter((f) => f.opens).length;
    lines.push(
      `drift: ${r.findings.length} difference(s) from ${table}${opening ? `, ${opening} of them may let through traffic the policy refuses (!)` : ""}:`,
    );
    lines.push(...findingLines(r.findings));
    if (r.repaired) {
      lines.push(
        r.remaining
          ? `repair applied, but a second audit still finds ${r.remaining} difference(s)`
          : "repaired: the desired table was re-applied in one transaction; a second audit finds it in sync",
      );
    } else lines.push("run egressctl audit --repair to put it back");
  }
  const exitCode = r.findings.length ? (r.repaired && r.remaining ? 3 : 1) : 0;
  return { exitCode, text: lines.join("\n") + "\n", data: { inSync: !r.findings.length, ...r } };
}
