/** egressctl check: validates policy and daemon config files offline, for configuration management. */
import { readConfigFiles } from "../agent/store/config-files.fs.ts";
import { checkOwners, checkTexts, type FileKind, type Finding } from "../rules/check.ts";
import { EgressError } from "../rules/errors.ts";
import { listenerText, undeclaredListeners } from "../rules/listeners.ts";
import type { ServicePolicy } from "../rules/policy.ts";
import type { Ctx, Result } from "./commands.ts";

const at = (f: Finding) => (f.path ? `${f.file}: ${f.path}` : f.file);

/** The ids of the users and groups the services name (numeric ids stand for themselves). */
async function lookUp(
  ctx: Ctx,
  specs: { users: (string | number)[]; groups: (string | number)[] },
) {
  const ids = (m: Map<string | number, { id: number }>) =>
    new Map([...m].map(([k, v]) => [k, v.id] as const));
  return {
    users: ids(await ctx.users.users(specs.users)),
    groups: ids(await ctx.users.groups(specs.groups)),
  };
}

/**
 * Files written by configuration management skip register's look at the socket table: warn
 * here when an enforced service's uid already listens on ports its policy does not declare.
 */
async function listenerWarnings(
  ctx: Ctx,
  services: readonly { file: string; policy: ServicePolicy }[],
  uids: Map<string | number, number>,
): Promise<Finding[]> {
  const out: Finding[] = [];
  for (const { file, policy } of services) {
    const uid = uids.get(policy.user);
    if (policy.mode !== "enforce" || uid === undefined || uid === 0) continue;
    const cut = undeclaredListeners(await ctx.sockets.listeners(uid), policy.inbound);
    if (cut.length)
      out.push({
        file,
        path: "$.inbound",
        text: `uid ${uid} listens on ports this policy does not declare: ${cut.map(listenerText).join(", ")}; once enforced they stop accepting new connections`,
      });
  }
  return out;
}

/**
 * The checks that read the host (user database, socket table). They are advisory for files
 * that may be meant for another moment: when the host cannot answer, they become a warning.
 */
async function ownerFindings(
  ctx: Ctx,
  services: readonly { file: string; policy: ServicePolicy }[],
  where: string,
): Promise<{ problems: Finding[]; warnings: Finding[] }> {
  const out = { problems: [] as Finding[], warnings: [] as Finding[] };
  if (!services.length) return out;
  const skipped = (what: string, err: unknown) => {
    if (!(err instanceof EgressError)) throw err;
    out.warnings.push({ file: where, path: null, text: `${what} not checked: ${err.message}` });
  };
  let ids: Awaited<ReturnType<typeof lookUp>>;
  try {
    ids = await lookUp(ctx, {
      users: services.map((s) => s.policy.user),
      groups: services.flatMap((s) => (s.policy.group === undefined ? [] : [s.policy.group])),
    });
  } catch (err) {
    skipped("users and groups", err);
    return out;
  }
  const owners = checkOwners(services, ids);
  out.problems.push(...owners.problems);
  out.warnings.push(...owners.warnings);
  try {
    out.warnings.push(...(await listenerWarnings(ctx, services, ids.users)));
  } catch (err) {
    skipped("listening sockets", err);
  }
  return out;
}

/**
 * Checks `paths` (default: the config dir) without touching the kernel, the daemon or any
 * file: every problem of every file at once, each with its file and JSON path.
 */
export async function check(
  ctx: Ctx,
  paths: readonly string[],
  opts: { kind?: FileKind } = {},
): Promise<Result> {
  const targets = paths.length ? paths : [ctx.store.configDir];
  const { inputs, unreadable } = await readConfigFiles(targets, opts.kind);
  const report = checkTexts(inputs);
  const problems = [...unreadable, ...report.problems];
  const warnings = [...report.warnings];
  const owners = await ownerFindings(ctx, report.services, targets.join(", "));
  problems.push(...owners.problems);
  warnings.push(...owners.warnings);
  if (!inputs.length && !unreadable.length) {
    warnings.push({
      file: targets.join(", "),
      path: null,
      text: "no egressd.json and no service policies (*.json) found",
    });
  }
  const invalidFiles = new Set(problems.map((p) => p.file));
  const files = [
    ...report.files.map((f) => ({ ...f, valid: !invalidFiles.has(f.file) })),
    ...unreadable.map((u) => ({ file: u.file, kind: null, valid: false })),
  ];
  if (problems.length) {
    throw new EgressError(
      "ERR_EGRESS_CHECK",
      `${invalidFiles.size} of ${files.length} file(s) invalid; nothing was changed`,
      {
        exitCode: 2,
        problems: [
          ...problems.map((p) => ({ where: at(p), text: p.text })),
          ...warnings.map((w) => ({ where: at(w), text: `(warning) ${w.text}` })),
        ],
        hint: "fix each problem at the file and JSON path shown, then run egressctl check again",
        details: { files, problems, warnings },
      },
    );
  }
  const describe = (f: (typeof files)[number]) =>
    f.kind === "config" ? "daemon config" : "service" in f ? `service ${f.service}` : "service";
  return {
    exitCode: 0,
    text:
      files.map((f) => `ok  ${f.file} (${describe(f)})`).join("\n") +
      `${files.length ? "\n" : ""}${files.length} file(s) valid; nothing was changed\n`,
    data: { valid: true, files, problems: [], warnings },
    warnings: warnings.map((w) => `warning: ${at(w)}: ${w.text}`),
  };
}
