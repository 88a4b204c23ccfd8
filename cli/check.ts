/** egressctl check: validates policy and daemon config files offline, for configuration management. */
import { readConfigFiles } from "../agent/store/config-files.fs.ts";
import { checkOwners, checkTexts, type FileKind, type Finding } from "../rules/check.ts";
import { EgressError } from "../rules/errors.ts";
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
  if (report.services.length) {
    const specs = {
      users: report.services.map((s) => s.policy.user),
      groups: report.services.flatMap((s) =>
        s.policy.group === undefined ? [] : [s.policy.group],
      ),
    };
    try {
      const owners = checkOwners(report.services, await lookUp(ctx, specs));
      problems.push(...owners.problems);
      warnings.push(...owners.warnings);
    } catch (err) {
      if (!(err instanceof EgressError)) throw err;
      warnings.push({
        file: targets.join(", "),
        path: null,
        text: `users and groups not checked: ${err.message}`,
      });
    }
  }
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
