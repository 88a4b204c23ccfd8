/** Turns ajv errors into Problems with a file, a readable JSON path and what was expected. */
import type { ErrorObject } from "ajv";
import type { Problem } from "./errors.ts";

/** JSON Pointer "/outbound/0/ports" -> "$.outbound[0].ports". */
export function jsonPath(pointer: string, extra?: string): string {
  const parts = pointer === "" ? [] : pointer.slice(1).split("/");
  if (extra !== undefined) parts.push(extra);
  let out = "$";
  for (const raw of parts) {
    const part = raw.replace(/~1/g, "/").replace(/~0/g, "~");
    out += /^[0-9]+$/.test(part)
      ? `[${part}]`
      : /^[A-Za-z_][A-Za-z0-9_]*$/.test(part)
        ? `.${part}`
        : `[${JSON.stringify(part)}]`;
  }
  return out;
}

/** Edit distance between two short strings (insertions, deletions, substitutions). */
function distance(a: string, b: string): number {
  let prev = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const row = [i];
    for (let j = 1; j <= b.length; j++)
      row[j] = Math.min(
        (prev[j] ?? 0) + 1,
        (row[j - 1] ?? 0) + 1,
        (prev[j - 1] ?? 0) + (a[i - 1] === b[j - 1] ? 0 : 1),
      );
    prev = row;
  }
  return prev[b.length] ?? 0;
}

/** The allowed key a misspelt one most likely meant: another case, 1-2 edits away, or cut short. */
export function closest(key: string, allowed: readonly string[]): string | undefined {
  const lower = key.toLowerCase();
  const same = allowed.find((k) => k.toLowerCase() === lower);
  if (same) return same;
  const scored = allowed
    .map((k) => ({ k, d: distance(lower, k.toLowerCase()) }))
    .filter((x) => x.d <= 2 && x.d < x.k.length / 2)
    .sort((a, b) => a.d - b.d);
  return (
    scored[0]?.k ??
    (lower.length >= 3 ? allowed.find((k) => k.toLowerCase().startsWith(lower)) : undefined)
  );
}

function describe(e: ErrorObject): { path: string; text: string } {
  const p = e.params as Record<string, unknown>;
  switch (e.keyword) {
    case "additionalProperties": {
      const key = String(p.additionalProperty);
      const allowed = Object.keys((e.parentSchema?.properties as object | undefined) ?? {});
      const near = closest(key, allowed);
      return {
        path: jsonPath(e.instancePath, key),
        text:
          `unknown key "${key}"` +
          (allowed.length
            ? ` (${near ? `did you mean "${near}"? ` : ""}allowed: ${allowed.join(", ")})`
            : ""),
      };
    }
    case "required":
      return {
        path: jsonPath(e.instancePath, String(p.missingProperty)),
        text: `missing required key "${String(p.missingProperty)}"`,
      };
    case "enum":
      return {
        path: jsonPath(e.instancePath),
        text: `must be one of ${(p.allowedValues as unknown[]).map((v) => JSON.stringify(v)).join(", ")}`,
      };
    case "type":
      return { path: jsonPath(e.instancePath), text: `must be ${String(p.type)}` };
    case "pattern":
      return {
        path: jsonPath(e.instancePath),
        text:
          (e.parentSchema?.description as string | undefined) ?? `must match ${String(p.pattern)}`,
      };
    default:
      return { path: jsonPath(e.instancePath), text: e.message ?? e.keyword };
  }
}

/** ajv errors as problems located in `file`. anyOf/oneOf noise is folded into one line. */
export function ajvProblems(
  file: string,
  errors: readonly ErrorObject[] | null | undefined,
): Problem[] {
  const out: Problem[] = [];
  const seen = new Set<string>();
  const unions = new Set(
    (errors ?? [])
      .filter((e) => e.keyword === "anyOf" || e.keyword === "oneOf")
      .map((e) => e.instancePath),
  );
  for (const e of errors ?? []) {
    // Inside a union, report only the union itself: each branch's complaint is noise.
    if (e.keyword !== "anyOf" && e.keyword !== "oneOf" && unions.has(e.instancePath)) continue;
    const d =
      e.keyword === "anyOf" || e.keyword === "oneOf"
        ? {
            path: jsonPath(e.instancePath),
            text: (e.parentSchema?.description as string | undefined) ?? "has the wrong form",
          }
        : describe(e);
    const key = `${d.path}\u0000${d.text}`;
    if (seen.has(key)) continue;
    seen.add(key);
    out.push({ where: `${file}: ${d.path}`, text: d.text });
  }
  return out;
}
