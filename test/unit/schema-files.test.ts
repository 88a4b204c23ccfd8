import { readFileSync } from "node:fs";
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { Ajv } from "ajv";
import { renderSchemas } from "../../scripts/schemas.ts";

const test = suite("the JSON Schemas shipped in docs/schema");

test("the committed schema files are exactly what scripts/schemas.ts generates", () => {
  for (const [name, text] of Object.entries(renderSchemas())) {
    assert.is(
      readFileSync(`docs/schema/${name}`, "utf8"),
      text,
      `docs/schema/${name} is stale: run node --import tsx scripts/schemas.ts`,
    );
  }
});

test("a standard validator accepts the SPEC's example policy and rejects a misspelt key", () => {
  const ajv = new Ajv({ allErrors: true });
  const service = ajv.compile(JSON.parse(renderSchemas()["service.schema.json"] ?? "{}") as object);
  const example = {
    name: "svc-web",
    user: "svc-web",
    mode: "enforce",
    outbound: [{ host: "api.example.com", ports: "443", protocol: "tcp" }],
    inbound: [{ ports: "8080", protocol: "tcp", from: ["192.0.2.0/24"] }],
  };
  assert.ok(service(example), JSON.stringify(service.errors));
  assert.not.ok(
    service({ ...example, outbound: [{ host: "a.example", ports: "1", prot: "tcp" }] }),
  );
  const config = ajv.compile(JSON.parse(renderSchemas()["egressd.schema.json"] ?? "{}") as object);
  assert.ok(config({ table: "egressd", audit: { schedule: "*/5 * * * *" } }));
  assert.not.ok(config({ refresh: { maxTTLSeconds: 60 } }));
});

test.run();
