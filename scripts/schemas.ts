/**
 * Writes the JSON Schemas of the policy files, docs/schema/service.schema.json and
 * docs/schema/egressd.schema.json, from the schemas egressd validates with (rules/policy.ts),
 * so editors and configuration management check what egressd checks. A unit test keeps the
 * committed files equal to this output. Usage: node --import tsx scripts/schemas.ts [OUTDIR]
 */
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { CONFIG_SCHEMA, SERVICE_SCHEMA } from "../rules/policy.ts";

const DRAFT = "http://json-schema.org/draft-07/schema#";

/** The files, by name, as they are committed (2-space JSON and a final newline). */
export function renderSchemas(): Record<string, string> {
  const doc = (title: string, description: string, schema: object) =>
    JSON.stringify({ $schema: DRAFT, title, description, ...schema }, null, 2) + "\n";
  return {
    "service.schema.json": doc(
      "egressd service policy",
      "One service's allowlist: /etc/egressd/services.d/<service>.json. The schema checks the structure; `egressctl check` also checks the values (addresses, ports, names) and the files together.",
      SERVICE_SCHEMA,
    ),
    "egressd.schema.json": doc(
      "egressd daemon configuration",
      "/etc/egressd/egressd.json. Every key is optional. The schema checks the structure; `egressctl check` also checks the values (resolvers, cron schedules).",
      CONFIG_SCHEMA,
    ),
  };
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) {
  const out = process.argv[2] ?? "docs/schema";
  mkdirSync(out, { recursive: true });
  for (const [name, text] of Object.entries(renderSchemas())) writeFileSync(join(out, name), text);
  console.log(`wrote ${Object.keys(renderSchemas()).join(" and ")} under ${out}`);
}
