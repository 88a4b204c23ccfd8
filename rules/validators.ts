/**
 * The JSON Schema validators, by name. From source (tests, scripts) each one is compiled by ajv
 * on first use; the bundles built by scripts/build.mjs replace this module with the same
 * validators compiled at build time (ajv standalone code, scripts/validators.build.ts), so
 * egressctl and egressd never load ajv's compiler nor spend start-up time compiling. Each
 * module that imports this one gets, in the bundles, only the validators whose `module` it is:
 * the nft batch validators (the large ones) load with the nft adapters, not with every command.
 */
import { Ajv, type Options, type ValidateFunction } from "ajv";
import { Ajv2020 } from "ajv/dist/2020.js";

/** How each validator is compiled; the build uses the same table. */
export const VALIDATORS = {
  /** A service policy file (rules/policy.ts SERVICE_SCHEMA): every problem reported. */
  // verbose: errors carry their schema, whose description and allowed keys the messages quote.
  service: {
    module: "rules/policy.ts",
    draft: "07",
    options: { allErrors: true, strict: true, verbose: true },
  },
  /** The daemon config (rules/policy.ts CONFIG_SCHEMA). */
  config: {
    module: "rules/policy.ts",
    draft: "07",
    options: { allErrors: true, strict: true, verbose: true },
  },
  /** An nft batch (rules/nft-schema.ts): stops at the first error, the fast path. */
  batch: {
    module: "rules/nft-schema.ts",
    draft: "2020",
    options: { allErrors: false, strict: true, inlineRefs: false },
  },
  /** An nft batch again, every error, only once the fast one has failed. */
  batchReport: {
    module: "rules/nft-schema.ts",
    draft: "2020",
    options: { allErrors: true, strict: true, inlineRefs: false },
  },
} as const satisfies Record<string, { module: string; draft: "07" | "2020"; options: Options }>;

export type ValidatorName = keyof typeof VALIDATORS;

const compiled = new Map<ValidatorName, ValidateFunction>();

/** The validator `name` for `schema`, compiled on first use. */
export function validator(name: ValidatorName, schema: object): ValidateFunction {
  let v = compiled.get(name);
  if (!v) {
    const { draft, options } = VALIDATORS[name];
    // Compiling fast matters here (it happens at run time); the build optimises instead.
    const opts: Options = { ...options, code: { optimize: false } };
    v = (draft === "2020" ? new Ajv2020(opts) : new Ajv(opts)).compile(schema);
    compiled.set(name, v);
  }
  return v;
}
