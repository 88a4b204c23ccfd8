import { createRequire } from "node:module";
import { join } from "node:path";
import { suite } from "uvu";
import * as assert from "uvu/assert";
import type { ValidateFunction } from "ajv";
import { bundles, thinProblems } from "../../scripts/bundles.mjs";
import { standaloneCode } from "../../scripts/validators.build.ts";
import { validator, VALIDATORS, type ValidatorName } from "../../rules/validators.ts";
import { CONFIG_SCHEMA, SERVICE_SCHEMA } from "../../rules/policy.ts";
import { NFT_BATCH_SCHEMA } from "../../rules/nft-schema.ts";
import { ROOT } from "../helpers/sandbox.ts";

const test = suite("bundles: validators compiled at build time, a thin egressctl");

const SCHEMAS = {
  service: SERVICE_SCHEMA,
  config: CONFIG_SCHEMA,
  batch: NFT_BATCH_SCHEMA,
  batchReport: NFT_BATCH_SCHEMA,
};

/** Evaluates one validator's standalone code the way the bundle runs it. */
function aheadOfTime(name: ValidatorName): ValidateFunction {
  const module = { exports: {} as ValidateFunction };
  const require = createRequire(join(ROOT, "package.json"));
  new Function("module", "require", standaloneCode(name))(module, require);
  return module.exports;
}

const SAMPLES: Record<ValidatorName, unknown[]> = {
  service: [
    { name: "svc-web", user: "www-data", outbound: [{ host: "api.example.com", ports: "443" }] },
    { name: "svc-web", user: 0, mode: "audit", inbound: [{ ports: 8080, from: ["10.0.0.0/8"] }] },
    { name: "Svc", user: "x", mdoe: "enforce" },
    { name: "svc", outbound: [{ host: "", ports: "99999-1", protocol: "sctp" }] },
    "not an object",
  ],
  config: [
    {},
    { table: "egressd", refresh: { minTtlSeconds: 30 }, log: { level: "debug" } },
    { table: "1bad", refresh: { minTtl: 3 }, audit: { repair: "yes" } },
  ],
  batch: [
    { nftables: [{ add: { table: { family: "inet", name: "egressd" } } }] },
    { nftables: [{ add: { table: { family: "ip", name: "egressd" } } }] },
    { nftables: [{ flush: { ruleset: null } }] },
    { nftables: [{ add: { counter: { family: "inet", table: "t", name: "c", extra: 1 } } }] },
  ],
  batchReport: [],
};
SAMPLES.batchReport = SAMPLES.batch;

test("each validator compiled at build time accepts and rejects exactly as the run-time one, with the same errors", () => {
  for (const name of Object.keys(VALIDATORS) as ValidatorName[]) {
    const built = aheadOfTime(name);
    const runtime = validator(name, SCHEMAS[name]);
    for (const doc of SAMPLES[name]) {
      const ok = runtime(doc);
      assert.is(built(doc), ok, `${name}: ${JSON.stringify(doc)}`);
      assert.equal(built.errors ?? null, runtime.errors ?? null, `${name} errors`);
    }
    assert.ok(
      SAMPLES[name].some((d) => !runtime(d)),
      `${name}: the samples include a rejected document`,
    );
  }
});

test("egressctl carries no daemon code, and its start-up neither the compiler, DNS, nft nor ajv; neither program carries ajv's compiler", async () => {
  const meta = await bundles({ version: "test", write: false });
  assert.equal(thinProblems(meta), []);
  // The check itself notices a fat bundle: pretend the entry carried the daemon and ajv.
  const entry = meta.egressctl.outputs["dist/egressctl.js"];
  assert.ok(entry);
  entry.inputs["agent/daemon.ts"] = { bytesInOutput: 1 };
  entry.inputs["node_modules/ajv/dist/compile/index.js"] = { bytesInOutput: 1 };
  const problems = thinProblems(meta);
  assert.ok(problems.some((p) => p.includes("the daemon: agent/daemon.ts")));
  assert.ok(problems.some((p) => p.includes("ajv's compiler")));
});

test.run();
