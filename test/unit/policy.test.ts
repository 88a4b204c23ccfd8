import { suite } from "uvu";
import * as assert from "uvu/assert";
import { EgressError } from "../../rules/errors.ts";
import {
  serviceToJSON,
  validateConfig,
  validateService,
  DEFAULT_CONFIG,
} from "../../rules/policy.ts";

const test = suite("policy validation");

function problemsOf(fn: () => unknown): { where: string; text: string }[] {
  try {
    fn();
  } catch (err) {
    assert.instance(err, EgressError);
    assert.is((err as EgressError).exitCode, 2);
    return [...(err as EgressError).problems];
  }
  throw new Error("expected a validation error");
}

const FILE = "/etc/egressd/services.d/svc-web.json";

test("the SPEC's example policy is valid and keeps its meaning", () => {
  const p = validateService(
    {
      name: "svc-web",
      user: "svc-web",
      mode: "enforce",
      dns: "system",
      outbound: [
        { host: "api.example.com", ports: "443", protocol: "tcp" },
        { host: "10.0.0.0/8", ports: "5432", protocol: "tcp" },
      ],
      inbound: [{ ports: "8080", protocol: "tcp", from: ["192.0.2.0/24"] }],
    },
    FILE,
    "svc-web",
  );
  assert.is(p.outbound.length, 2);
  assert.equal(p.inbound[0]?.from, ["192.0.2.0/24"]);
  // Written back, it reads the same.
  assert.equal(validateService(JSON.parse(serviceToJSON(p)), FILE, "svc-web"), p);
});

test("defaults fill in mode, dns and protocol; integer ports are accepted", () => {
  const p = validateService(
    { name: "svc-web", user: 2001, outbound: [{ host: "a.example", ports: 443 }] },
    FILE,
  );
  assert.is(p.mode, "enforce");
  assert.is(p.dns, "proxy");
  assert.equal(p.outbound, [{ host: "a.example", ports: "443", protocol: "tcp" }]);
});

test("a wildcard is valid only for a DNS-aware service, and the problem names the mode and the fix", () => {
  const ok = validateService(
    { name: "svc-web", user: 2001, outbound: [{ host: "*.CDN.example.com", ports: "443" }] },
    FILE,
  );
  assert.equal(ok.outbound[0]?.host, "*.cdn.example.com");
  const problems = problemsOf(() =>
    validateService(
      {
        name: "svc-web",
        user: 2001,
        dns: "system",
        outbound: [{ host: "*.cdn.example.com", ports: "443" }],
      },
      FILE,
    ),
  );
  assert.is(problems[0]?.where, `${FILE}: $.outbound[0].host`);
  assert.match(problems[0]?.text ?? "", `this service's dns is "system": set "dns": "proxy"`);
});

test("every problem is reported at once, each with the file and a JSON path", () => {
  const problems = problemsOf(() =>
    validateService(
      {
        name: "svc-web",
        user: "svc-web",
        mdoe: "audit",
        dns: "maybe",
        outbound: [
          { host: "api.example.com", ports: "443", protocl: "tcp" },
          { host: "x.example", ports: "99999" },
        ],
      },
      FILE,
    ),
  );
  const text = problems.map((p) => `${p.where}: ${p.text}`).join("\n");
  assert.match(text, `${FILE}: $.mdoe: unknown key "mdoe"`);
  assert.match(text, `${FILE}: $.dns: must be one of "proxy", "system", "none"`);
  assert.match(text, `${FILE}: $.outbound[0].protocl: unknown key "protocl"`);
  assert.match(text, `${FILE}: $.outbound[1].ports`);
  assert.ok(problems.length >= 4, text);
});

test("semantic problems name the path too: bad host, bad CIDR, bad port, wrong file name", () => {
  const problems = problemsOf(() =>
    validateService(
      {
        name: "svc-api",
        user: "svc-web",
        outbound: [
          { host: "10.0.0.1/8", ports: "443" },
          { host: "ok.example", ports: "0" },
        ],
        inbound: [{ ports: "8080", from: ["192.0.2.0/33"] }],
      },
      FILE,
      "svc-web",
    ),
  );
  const text = problems.map((p) => `${p.where}: ${p.text}`).join("\n");
  assert.match(text, "$.name");
  assert.match(text, '$.outbound[0].host: invalid address "10.0.0.1/8"');
  assert.match(text, '$.outbound[1].ports: invalid port "0"');
  assert.match(text, "$.inbound[0].from[0]");
});

test("a misspelt key names the key it most likely meant and every allowed one", () => {
  const config = problemsOf(() =>
    validateConfig({ refresh: { maxTTLSeconds: 60 } }, "/etc/egressd/egressd.json"),
  );
  assert.equal(
    config.map((p) => p.text),
    [
      'unknown key "maxTTLSeconds" (did you mean "maxTtlSeconds"? allowed: minTtlSeconds, maxTtlSeconds, graceSeconds, maxAddressesPerName, allowPrivateAddresses)',
    ],
  );
  const service = problemsOf(() =>
    validateService(
      { name: "svc-web", user: 2001, outbound: [{ host: "a.example", ports: "443", prot: "tcp" }] },
      FILE,
    ),
  );
  assert.equal(
    service.map((p) => p.text),
    ['unknown key "prot" (did you mean "protocol"? allowed: host, ports, protocol)'],
  );
});

test("a policy file that names root as user or group is rejected, as register refuses it", () => {
  const problems = problemsOf(() =>
    validateService({ name: "svc-web", user: "root", group: 0 }, FILE),
  );
  assert.equal(
    problems.map((p) => p.where),
    [`${FILE}: $.user`, `${FILE}: $.group`],
  );
  assert.match(problems[0]?.text ?? "", '"root" is root: root can remove any firewall');
});

test("the daemon config takes SPEC §3's example and fills defaults for what is missing", () => {
  const c = validateConfig(
    {
      table: "egressd",
      resolvers: ["127.0.0.53:53"],
      refresh: {
        minTtlSeconds: 30,
        maxTtlSeconds: 3600,
        graceSeconds: 300,
        maxAddressesPerName: 64,
        allowPrivateAddresses: true,
      },
      audit: { schedule: "*/5 * * * *", repair: true },
      log: { level: "info" },
    },
    "/etc/egressd/egressd.json",
  );
  assert.equal(c.refresh, DEFAULT_CONFIG.refresh);
  assert.equal(validateConfig({}, "x").audit, DEFAULT_CONFIG.audit);
  assert.is(
    validateConfig({ audit: { schedule: "*/2 * * * * *" } }, "x").audit.schedule,
    "*/2 * * * * *",
  );
});

test("a bad daemon config is rejected with every problem located", () => {
  const problems = problemsOf(() =>
    validateConfig(
      {
        tabel: "x",
        table: "bad-name",
        resolvers: ["not-an-ip", "[2001:db8::53]:53", "127.0.0.1:99999"],
        refresh: { minTtlSeconds: 100, maxTtlSeconds: 10 },
        audit: { schedule: "every five minutes" },
      },
      "/etc/egressd/egressd.json",
    ),
  );
  const text = problems.map((p) => `${p.where}: ${p.text}`).join("\n");
  assert.match(text, '$.tabel: unknown key "tabel"');
  assert.match(text, "$.table");
  assert.match(text, '$.resolvers[0]: resolver "not-an-ip"');
  assert.match(text, "$.resolvers[2]");
  assert.match(text, "$.refresh.minTtlSeconds");
  assert.match(text, '$.audit.schedule: "every five minutes" is not a cron expression');
  assert.not.match(text, "$.resolvers[1]");
});

test("the refused record: on by default, size 0 turns it off, out-of-range values are named with their path", () => {
  assert.equal(validateConfig({}, "/etc/egressd/egressd.json").refused, {
    size: 65536,
    timeoutSeconds: 3600,
  });
  assert.equal(validateConfig({ refused: { size: 0 } }, "x.json").refused, {
    size: 0,
    timeoutSeconds: 3600,
  });
  const problems = problemsOf(() =>
    validateConfig(
      { refused: { size: -1, timeoutSeconds: 0, sise: 3 } },
      "/etc/egressd/egressd.json",
    ),
  );
  const text = problems.map((p) => `${p.where}: ${p.text}`).join("\n");
  assert.match(text, "/etc/egressd/egressd.json: $.refused.size: must be >= 0");
  assert.match(text, "$.refused.timeoutSeconds: must be >= 1");
  assert.match(text, 'unknown key "sise" (did you mean "size"?');
});

test.run();
