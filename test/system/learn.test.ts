/**
 * Learning mode, end to end: a DNS-aware service runs in audit mode for a window, what it does
 * outside its policy is recorded (the kernel's refused-destination record, the proxy's answers),
 * `learn --show` proposes an allowlist by name, and `learn --apply` enforces exactly that.
 */
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { withSandbox, type Attempt } from "../helpers/sandbox.ts";
import { CIDR_HOST, DB, METADATA, SVC_UID, WORLD } from "./world.ts";

const test = suite("learning mode: audit for a while, then an allowlist by name");

const UNUSED = "198.51.100.99";
const LEARN_WORLD = {
  ...WORLD,
  addresses: [...WORLD.addresses, UNUSED],
  records: { ...WORLD.records, "unused.example.test": { A: [UNUSED], ttl: 60 } },
  config: { resolvers: ["127.0.0.1:53"], dns: { queryTimeoutMs: 1000 } },
};

const resolveConnect = (name: string, port: number, count = 1): Attempt => ({
  proto: "resolve-connect",
  host: "127.0.0.1",
  port: 53,
  name,
  connectPort: port,
  count,
  timeoutMs: 2000,
});
const lookup = (name: string): Attempt => ({ proto: "resolve", host: "127.0.0.1", port: 53, name });
const connect = (host: string, port: number): Attempt => ({
  proto: "tcp",
  host,
  port,
  timeoutMs: 2000,
});

interface Shown {
  learning: { active: boolean } | null;
  proposal: {
    outbound: {
      rule: { host: string; ports: string; protocol: string };
      by: string;
      packets: number;
      addresses: string[];
      flagged?: string;
    }[];
    inbound: { rule: { ports: string; protocol: string } }[];
    unused: string[];
  };
}

test("a DNS-aware service's lookups and connections become an allowlist of names; --apply enforces exactly that", async () => {
  await withSandbox(LEARN_WORLD, async (sb) => {
    await sb.ok("register", "svc-web", "--user", String(SVC_UID), "--dns", "proxy");
    await sb.ok("allow", "svc-web", "other.example.test:443");
    await sb.startDaemon();
    const started = await sb.ok("learn", "svc-web", "--for", "1h");
    assert.match(started, "svc-web: learning from ");
    await sb.serveAs(SVC_UID, [{ proto: "tcp", host: "::", port: 9090 }]);

    // In audit mode everything goes through: names outside the policy are answered.
    const during = await sb.probe(SVC_UID, [
      resolveConnect("api.example.test", 443, 3),
      resolveConnect("other.example.test", 443),
      resolveConnect("metadata.example.test", 80),
      connect(DB, 5432),
      lookup("unused.example.test"),
    ]);
    assert.equal(
      during.map((r) => r.result),
      ["ok:3/3", "ok:1/1", "ok:1/1", "connected", `NOERROR:${UNUSED}`],
      JSON.stringify(during),
    );

    const shown = JSON.parse(await sb.ok("--json", "learn", "svc-web", "--show")) as Shown;
    assert.is(shown.learning?.active, true);
    const line = (o: Shown["proposal"]["outbound"][number]) =>
      `${o.by} ${o.rule.host}:${o.rule.ports}/${o.rule.protocol}${o.flagged ? " flagged" : ""}`;
    assert.equal(
      shown.proposal.outbound.map(line),
      [
        "name api.example.test:443/tcp",
        "name metadata.example.test:80/tcp flagged",
        `address ${DB}:5432/tcp`,
      ],
      "names where a lookup explains the address, the literal where none does; other.example.test is allowed already; metadata flagged",
    );
    const api = shown.proposal.outbound[0];
    assert.ok((api?.packets ?? 0) >= 3, `three connections' packets at least: ${api?.packets}`);
    assert.equal(
      shown.proposal.inbound.map((i) => `${i.rule.ports}/${i.rule.protocol}`),
      ["9090/tcp"],
    );
    assert.equal(shown.proposal.unused, ["unused.example.test"]);
    const text = await sb.ok("learn", "svc-web", "--show");
    assert.match(text, "allow api.example.test:443");
    assert.match(text, "flagged, not proposed");

    const applied = await sb.ok("learn", "svc-web", "--apply");
    assert.match(applied, "svc-web: learning ended; enforced in enforce mode");
    const listed = JSON.parse(await sb.ok("--json", "list", "svc-web")) as {
      services: {
        outbound: { host: string; ports: string }[];
        inbound: { ports: string }[];
        learning?: unknown;
      }[];
    };
    const policy = listed.services[0];
    assert.ok(policy);
    assert.equal(policy.outbound.map((o) => `${o.host}:${o.ports}`).sort(), [
      `${DB}:5432`,
      "api.example.test:443",
      "other.example.test:443",
    ]);
    assert.equal(
      policy.inbound.map((i) => i.ports),
      ["9090"],
    );
    assert.is(policy.learning, undefined, "the window is gone from the file");

    // Enforced: what was proposed connects, the flagged and the unused do not.
    const after = await sb.probe(SVC_UID, [
      resolveConnect("api.example.test", 443),
      connect(DB, 5432),
      connect(METADATA, 80),
      lookup("unused.example.test"),
      resolveConnect("other.example.test", 443),
      connect(CIDR_HOST, 8443),
    ]);
    const results = after.map((r) => r.result);
    assert.is(results[0], "ok:1/1", JSON.stringify(after));
    assert.is(results[1], "connected");
    assert.is.not(results[2], "connected", "metadata stays refused");
    assert.match(results[3] ?? "", /^NXDOMAIN/, "an unlisted name is not answered any more");
    assert.is(results[4], "ok:1/1", "what was allowed before stays allowed");
    assert.is(results[5], "ECONNREFUSED", "a destination never seen is refused");
  });
});

test("learn --stop ends the window: what audit mode let through is refused again, the policy file is as before", async () => {
  await withSandbox(LEARN_WORLD, async (sb) => {
    await sb.ok("register", "svc-web", "--user", String(SVC_UID), "--dns", "proxy");
    await sb.ok("allow", "svc-web", "api.example.test:443");
    const before = await sb.ok("--json", "list", "svc-web");
    await sb.startDaemon();
    assert.match(await sb.ok("learn", "svc-web"), "no --for given: it learns until");
    const during = await sb.probe(SVC_UID, [connect(DB, 5432)]);
    assert.is(during[0]?.result, "connected", "audit mode lets it through while learning");

    assert.match(
      await sb.ok("learn", "svc-web", "--stop"),
      "svc-web: learning stopped; enforced in enforce mode",
    );
    assert.is(
      await sb.ok("--json", "list", "svc-web"),
      before,
      "the window is gone, nothing added",
    );
    const after = await sb.probe(SVC_UID, [
      connect(DB, 5432),
      resolveConnect("api.example.test", 443),
    ]);
    assert.equal(
      after.map((r) => r.result),
      ["ECONNREFUSED", "ok:1/1"],
      "enforced again: the unlisted destination is refused, the allowed name still works",
    );
    assert.match(
      await sb.ok("learn", "svc-web", "--stop"),
      "svc-web is not learning; nothing changed",
    );
  });
});

test.run();
