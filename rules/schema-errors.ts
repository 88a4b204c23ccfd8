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

function describe(e: ErrorObject): { path: string; text: string } {
  const p = e.params as Record<string, unknown>;
  switch (e.keyword) {
    case "additionalProperties":
      return {
        path: jsonPath(e.instancePath, String(p.additionalProperty)),
        text:
          `unknown key "${String(p.additionalProperty)}"` +
          (e.parentSchema?.properties
            ? ` (allowed: ${Object.keys(e.parentSchema.properties as object).join(", ")})`
            : ""),
      };
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
