import { suite } from "uvu";
import * as assert from "uvu/assert";
import { withSandbox } from "../helpers/sandbox.ts";
import {
  API4,
  API6,
  AUDIT_UID,
  CIDR_HOST,
  DB,
  METADATA,
  OTHER,
  SVC_UID,
  UNMANAGED_UID,
  V6HOST,
  WORLD,
} from "./world.ts";

const test = suite("outbound enforcement (real nft, real sockets, in a namespace)");

test("every A and AAAA address of an allowed name is reachable on the allowed port; other ports and hosts are refused at once", async () => {
  await withSandbox(WORLD, async (sb) => {
    await sb.ok("register", "svc-web", "--user", String(SVC_UID));
    await sb.ok("allow", "svc-web", "api.example.test:443");
    await sb.ok("apply");
    const results = await sb.probe(SVC_UID, [
      ...API4.map((host) => ({ proto: "tcp" as const, host, port: 443 })),
      { proto: "tcp", host: API6, port: 443 },
      ...API4.map((host) => ({ proto: "tcp" as const, host, port: 8080 })),
      { proto: "tcp", host: API6, port: 8080 },
      { proto: "tcp", host: OTHER, port: 443 },
    ]);
    const by = (host: string, port: number) =>
      results.find((r) => r.host === host && r.port === port)?.result;
    for (const host of [...API4, API6])
      assert.is(by(host, 443), "connected", `${host}:443 should be allowed`);
    // A TCP reset, not a silent drop: the client learns at once (a drop would end in "timeout").
    for (const host of [...API4, API6])
      assert.is(by(host, 8080), "ECONNREFUSED", `${host}:8080 should be refused`);
    assert.is(by(OTHER, 443), "ECONNREFUSED");
  });
});

test("a UDP allowance lets datagrams through; other UDP ports are refused", async () => {
  await withSandbox(WORLD, async (sb) => {
    await sb.ok("register", "svc-web", "--user", String(SVC_UID));
    await sb.ok("allow", "svc-web", `${DB}:5353/udp`);
    await sb.ok("apply");
    assert.is(await sb.try1(SVC_UID, "udp", DB, 5353), "reply");
    assert.is(await sb.try1(SVC_UID, "udp", DB, 5354), "EPERM");
    assert.is(
      await sb.try1(SVC_UID, "tcp", DB, 5432),
      "ECONNREFUSED",
      "a UDP allowance does not open TCP",
    );
  });
});

test("an IPv6 literal and a CIDR allowance match exactly their address and port", async () => {
  await withSandbox(WORLD, async (sb) => {
    await sb.ok("register", "svc-web", "--user", String(SVC_UID));
    await sb.ok("allow", "svc-web", `[${V6HOST}]:443`, "198.51.100.64/26:8443");
    await sb.ok("apply");
    const r = await sb.probe(SVC_UID, [
      { proto: "tcp", host: V6HOST, port: 443 },
      { proto: "tcp", host: V6HOST, port: 444 },
      { proto: "tcp", host: CIDR_HOST, port: 8443 },
      { proto: "tcp", host: CIDR_HOST, port: 8444 },
      { proto: "tcp", host: OTHER, port: 443 },
    ]);
    assert.equal(
      r.map((x) => x.result),
      ["connected", "ECONNREFUSED", "connected", "ECONNREFUSED", "ECONNREFUSED"],
    );
  });
});

test("audit mode lets refused traffic through and counts it; an unmanaged uid is untouched", async () => {
  await withSandbox(WORLD, async (sb) => {
    await sb.ok("register", "svc-audit", "--user", String(AUDIT_UID), "--mode", "audit");
    await sb.ok("register", "svc-web", "--user", String(SVC_UID));
    await sb.ok("apply");
    assert.is(await sb.try1(AUDIT_UID, "tcp", OTHER, 443), "connected");
    assert.is(await sb.try1(SVC_UID, "tcp", OTHER, 443), "ECONNREFUSED");
    assert.is(await sb.try1(UNMANAGED_UID, "tcp", OTHER, 443), "connected");
    const counters = await sb.nftJson("list", "counters", "table", "inet", "egressd");
    const packets = (name: string) =>
      Number(counters.nftables.find((o) => o.counter?.name === name)?.counter?.packets ?? -1);
    assert.ok(packets("s_svc_audit") >= 1, `audit counter: ${packets("s_svc_audit")}`);
    assert.ok(packets("s_svc_web") >= 1, `enforce counter: ${packets("s_svc_web")}`);
  });
});

test("a service can use the configured resolver, unless its policy says dns none", async () => {
  await withSandbox(WORLD, async (sb) => {
    await sb.ok("register", "svc-web", "--user", String(SVC_UID), "--dns", "system");
    await sb.ok("register", "svc-nodns", "--user", String(AUDIT_UID));
    const file = sb.servicesFile("svc-nodns");
    const { writeFileSync, readFileSync } = await import("node:fs");
    writeFileSync(file, readFileSync(file, "utf8").replace('"dns": "proxy"', '"dns": "none"'));
    await sb.ok("apply");
    const [allowed] = await sb.probe(SVC_UID, [
      { proto: "dns", host: "127.0.0.1", port: 53, name: "api.example.test" },
    ]);
    assert.is(allowed?.result, `answer:${API4.join(",")}`);
    const [denied] = await sb.probe(AUDIT_UID, [
      { proto: "dns", host: "127.0.0.1", port: 53, name: "api.example.test" },
    ]);
    assert.is(denied?.result, "EPERM");
    // Loopback is governed by the allowlist too: the resolver's port is open, nothing else on 127.0.0.1.
    assert.is(await sb.try1(SVC_UID, "tcp", "127.0.0.1", 22), "ECONNREFUSED");
  });
});

test("a name that resolves to 169.254.169.254 is not allowed, and apply says why", async () => {
  await withSandbox(WORLD, async (sb) => {
    await sb.ok("register", "svc-web", "--user", String(SVC_UID));
    await sb.ok("allow", "svc-web", "metadata.example.test:80");
    const r = await sb.egressctl("apply");
    assert.is(r.exitCode, 0, r.stderr);
    assert.match(r.stderr, `not allowing ${METADATA} (cloud metadata)`);
    assert.is(await sb.try1(SVC_UID, "tcp", METADATA, 80), "ECONNREFUSED");
    assert.is(
      await sb.try1(UNMANAGED_UID, "tcp", METADATA, 80),
      "connected",
      "the host itself is reachable: the refusal is egressd's",
    );
  });
});

test("a CNAME chain is followed to its addresses", async () => {
  await withSandbox(WORLD, async (sb) => {
    await sb.ok("register", "svc-web", "--user", String(SVC_UID));
    await sb.ok("allow", "svc-web", "www.example.test:443");
    await sb.ok("apply");
    assert.is(await sb.try1(SVC_UID, "tcp", API4[0] as string, 443), "connected");
    assert.is(await sb.try1(SVC_UID, "tcp", API4[1] as string, 443), "ECONNREFUSED");
  });
});

test("revoke takes effect on the next apply", async () => {
  await withSandbox(WORLD, async (sb) => {
    await sb.ok("register", "svc-web", "--user", String(SVC_UID));
    await sb.ok("allow", "svc-web", `${DB}:5432`, "api.example.test:443");
    await sb.ok("apply");
    assert.is(await sb.try1(SVC_UID, "tcp", DB, 5432), "connected");
    await sb.ok("revoke", "svc-web", `${DB}:5432`);
    await sb.ok("apply");
    assert.is(await sb.try1(SVC_UID, "tcp", DB, 5432), "ECONNREFUSED");
    assert.is(
      await sb.try1(SVC_UID, "tcp", API4[0] as string, 443),
      "connected",
      "the other allowance stays",
    );
  });
});

test("other tables in the namespace survive every apply, byte for byte", async () => {
  await withSandbox(WORLD, async (sb) => {
    await sb.nftScript(
      "table inet other { chain out { type filter hook output priority 10; policy accept; counter; }; }\n" +
        "table ip natlike { set s { type ipv4_addr; elements = { 192.0.2.99 }; }; }\n",
    );
    const before = [
      await sb.nft("list", "table", "inet", "other"),
      await sb.nft("list", "table", "ip", "natlike"),
    ];
    await sb.ok("register", "svc-web", "--user", String(SVC_UID));
    await sb.ok("apply");
    await sb.ok("allow", "svc-web", "api.example.test:443");
    await sb.ok("apply");
    await sb.ok("unregister", "svc-web");
    await sb.ok("apply");
    const after = [
      await sb.nft("list", "table", "inet", "other"),
      await sb.nft("list", "table", "ip", "natlike"),
    ];
    // The counter in inet other moves with traffic; compare everything but its values.
    const strip = (s: string) => s.replace(/packets \d+ bytes \d+/g, "counter");
    assert.equal(after.map(strip), before.map(strip));
  });
});

test("apply --dry-run prints what would change and changes nothing", async () => {
  await withSandbox(WORLD, async (sb) => {
    await sb.ok("register", "svc-web", "--user", String(SVC_UID));
    await sb.ok("allow", "svc-web", "api.example.test:443");
    let r = await sb.egressctl("apply", "--dry-run");
    assert.is(r.exitCode, 0, r.stderr);
    assert.match(r.stdout, "+ table inet egressd");
    assert.is(
      (await sb.exec("nft", ["list", "table", "inet", "egressd"])).exitCode,
      1,
      "no table after a dry run",
    );
    await sb.ok("apply");
    const before = await sb.nft("list", "table", "inet", "egressd");
    await sb.ok("allow", "svc-web", `${DB}:5432`);
    await sb.ok("revoke", "svc-web", "api.example.test:443");
    r = await sb.egressctl("apply", "--dry-run");
    assert.is(r.exitCode, 0, r.stderr);
    assert.match(r.stdout, `+ element in set s_svc_web_lit4: ${DB} . tcp . 5432`);
    assert.match(r.stdout, `- element in set s_svc_web_tcp443_4: ${API4[0]}`);
    assert.is(await sb.nft("list", "table", "inet", "egressd"), before);
    const json = await sb.egressctl("--json", "apply", "--dry-run");
    const data = JSON.parse(json.stdout) as { changes: { kind: string }[] };
    assert.ok(data.changes.some((c) => c.kind === "element-missing"));
    await sb.ok("apply");
    r = await sb.egressctl("apply", "--dry-run");
    assert.match(r.stdout, "nothing would change");
  });
});

test.run();
