/**
 * `egressctl check`, the deciding part: validates policy and daemon config texts as egressd
 * would load them, then across files (one owner and one inbound port per service), and
 * collects every problem of every file (pure: the files are read elsewhere).
 */
import { EgressError, type Problem } from "./errors.ts";
import { checkInboundOverlap } from "./inbound.ts";
import { parseJsonText } from "./json-text.ts";
import { ROOT_REASON, validateConfig, validateService, type ServicePolicy } from "./policy.ts";

export type FileKind = "service" | "config";

export interface CheckInput {
  file: string;
  kind: FileKind;
  text: string;
  /** The service name the file name implies (services.d/<name>.json); absent for other names. */
  expectedName?: string;
}

/** One problem: the file, the JSON path inside it (null for the whole file) and what to fix. */
export interface Finding {
  file: string;
  path: string | null;
  text: string;
}

export interface CheckReport {
  files: { file: string; kind: FileKind; valid: boolean; service?: string }[];
  problems: Finding[];
  warnings: Finding[];
  /** The valid service policies, for the checks that need the user database. */
  services: { file: string; policy: ServicePolicy }[];
}

/** Splits a validator's "FILE: $.path" location into file and path. */
function finding(file: string, p: Problem): Finding {
  const prefix = `${file}: `;
  const path = p.where.startsWith(prefix) ? p.where.slice(prefix.length) : null;
  return { file, path, text: p.text };
}

function problemsOf(err: unknown, file: string): Finding[] {
  if (!(err instanceof EgressError) || err.exitCode !== 2) throw err;
  return err.problems.length
    ? err.problems.map((p) => finding(file, p))
    : [{ file, path: null, text: err.message }];
}

/** Validates every text, then the valid services together. */
export function checkTexts(inputs: readonly CheckInput[]): CheckReport {
  const report: CheckReport = { files: [], problems: [], warnings: [], services: [] };
  for (const input of inputs) {
    let found: Finding[] = [];
    let service: string | undefined;
    try {
      const raw = parseJsonText(input.text, input.file);
      if (input.kind === "config") validateConfig(raw, input.file);
      else {
        const policy = validateService(raw, input.file, input.expectedName);
        service = policy.name;
        report.services.push({ file: input.file, policy });
      }
    } catch (err) {
      found = problemsOf(err, input.file);
    }
    report.problems.push(...found);
    report.files.push({
      file: input.file,
      kind: input.kind,
      valid: found.length === 0,
      ...(service ? { service } : {}),
    });
  }
  const byName = new Map<string, string>();
  for (const { file, policy } of report.services) {
    const other = byName.get(policy.name);
    if (other !== undefined)
      report.problems.push({
        file,
        path: "$.name",
        text: `service ${policy.name} is also defined in ${other}: one file per service`,
      });
    else byName.set(policy.name, file);
  }
  try {
    checkInboundOverlap(report.services.map((s) => s.policy));
  } catch (err) {
    const fileOf = (p: Problem) =>
      report.services.find((s) => p.where === `service ${s.policy.name}`)?.file ?? p.where;
    if (!(err instanceof EgressError)) throw err;
    for (const p of err.problems)
      report.problems.push({ file: fileOf(p), path: "$.inbound", text: p.text });
  }
  return report;
}

/**
 * The owner checks that need the user database: `ids` maps each user or group spec that
 * exists to its id (numeric specs are their own id). A name that does not exist is a warning
 * (configuration management may create it later in the same run); root, and two services
 * sharing an owner, are problems.
 */
export function checkOwners(
  services: readonly { file: string; policy: ServicePolicy }[],
  ids: { users: Map<string | number, number>; groups: Map<string | number, number> },
): { problems: Finding[]; warnings: Finding[] } {
  const problems: Finding[] = [];
  const warnings: Finding[] = [];
  for (const key of ["user", "group"] as const) {
    const owner = new Map<number, string>();
    const map = key === "user" ? ids.users : ids.groups;
    for (const { file, policy } of services) {
      const spec = policy[key];
      if (spec === undefined) continue;
      const id = typeof spec === "number" ? spec : map.get(spec);
      const path = `$.${key}`;
      if (id === undefined) {
        warnings.push({
          file,
          path,
          text: `${key} "${spec}" does not exist on this host: egressd refuses the policy until it does`,
        });
        continue;
      }
      if (id === 0 && spec !== 0 && spec !== "root") {
        problems.push({
          file,
          path,
          text: `"${spec}" is ${key === "user" ? "uid" : "gid"} 0: ${ROOT_REASON}`,
        });
        continue;
      }
      const other = owner.get(id);
      if (other !== undefined) {
        problems.push({
          file,
          path,
          text: `${key === "user" ? "uid" : "gid"} ${id} is already the ${key} of service ${other}: each service needs its own ${key}`,
        });
      } else owner.set(id, policy.name);
    }
  }
  return { problems, warnings };
}
