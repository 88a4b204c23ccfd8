/**
 * The validators compiled ahead of time (ajv standalone code): scripts/build.mjs bundles the
 * module made here in place of rules/validators.ts, with the same names, schemas and options.
 */
import { Ajv, type Options } from "ajv";
import { Ajv2020 } from "ajv/dist/2020.js";
import standaloneModule from "ajv/dist/standalone/index.js";
import { NFT_BATCH_SCHEMA } from "../rules/nft-schema.ts";
import { CONFIG_SCHEMA, SERVICE_SCHEMA } from "../rules/policy.ts";
import { VALIDATORS, type ValidatorName } from "../rules/validators.ts";

// A CommonJS module: its default import is module.exports, whose `default` is the function.
const standalone = standaloneModule.default;

const SCHEMAS: Record<ValidatorName, object> = {
  service: SERVICE_SCHEMA,
  config: CONFIG_SCHEMA,
  batch: NFT_BATCH_SCHEMA,
  batchReport: NFT_BATCH_SCHEMA,
};

/** One validator as standalone CommonJS code (`module.exports = validate`). */
export function standaloneCode(name: ValidatorName): string {
  const { draft, options } = VALIDATORS[name];
  const opts: Options = { ...options, code: { source: true } };
  const ajv = draft === "2020" ? new Ajv2020(opts) : new Ajv(opts);
  return standalone(ajv, ajv.compile(SCHEMAS[name]));
}

/** The ES module that replaces rules/validators.ts, in the bundles, for the importer `module`. */
export function validatorsModule(module: string): string {
  const names = (Object.keys(VALIDATORS) as ValidatorName[]).filter(
    (n) => VALIDATORS[n].module === module,
  );
  if (!names.length) throw new Error(`no validator in rules/validators.ts names ${module}`);
  const makers = names.map(
    (n) =>
      `  ${n}: () => {\n    const module = { exports: {} };\n    ${standaloneCode(n)}\n    return module.exports;\n  },`,
  );
  return [
    "// Generated at build time by scripts/validators.build.ts (ajv standalone code).",
    `const make = {\n${makers.join("\n")}\n};`,
    "const made = new Map();",
    "export function validator(name) {",
    "  if (!make[name]) throw new Error(`validator ${name} is not built for this module`);",
    "  let v = made.get(name);",
    "  if (!v) made.set(name, (v = make[name]()));",
    "  return v;",
    "}",
    "",
  ].join("\n");
}
