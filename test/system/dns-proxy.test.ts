/**
 * DNS-aware enforcement ("dns": "proxy"): each service's own lookups go through egressd, which
 * answers only allowed names and returns an answer only once the kernel allows its addresses.
 * Real services, real DNS server (whose answers rotate per query), real redirect in the kernel.
 */
import { existsSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { suite } from "uvu";
import * as assert from "uvu/assert";
import {
  eventually,
  withSandbox,
  type Attempt,
  type Records,
  type Sandbox,
} from "../helpers/sandbox.ts";
import { API4, AUDIT_UID, METADATA, SVC_UID, UNMANAGED_UID, WORLD } from "./world.ts";

const test = suite("DNS-aware mode: the proxy answers allowed names, after the kernel allows them");

/** A load balancer of seven addresses, one per answer, TTL 5. */
const ROT = Array.from({ length: 7 }, (_, i) => `203.0.113.${100 + i}`);
const CDN_A = "198.51.100.31";
const CDN_BC = "198.51.100.32";
const CDN_APEX = "198.51.100.33";
const EVIL = "198.51.100.40";
const HINT = "198.51.100.50";
const ONE = "198.51.100.60";
const HOLD = "198.51.100.71";
const MIXED = "198.51.100.80";

const RECORDS: Records = {
  ...WORLD.records,
  "rot.example.test": { A: ROT, rotate: true, ttl: 5 },
  "a.cdn.example.test": { A: [CDN_A], ttl: 60 },
  "b.c.cdn.example.test": { A: [CDN_BC], ttl: 60 },
  "cdn.example.test": { A: [CDN_APEX], ttl: 60 },
  "evil.example.test": { A: [EVIL], ttl: 60 },
  "https.example.test": { HTTPS: { ipv4hint: [HINT] }, ttl: 60 },
  "txt.example.test": { TXT: "v=hello", ttl: 60 },
  "one.example.test": { A: [ONE], ttl: 60 },
  "x.hold.example.test": { A: [HOLD], ttl: 1 },
  // One good address among three the filter refuses: cloud metadata, loopback, metadata in NAT64.
  "x.mixed.example.test": {
    A: [MIXED, METADATA, "127.0.0.2"],
    AAAA: ["64:ff9b::a9fe:a9fe"],
    ttl: 60,
  },
};

const tcp = (host: string, port = 443) => ({ proto: "tcp" as const, host, port });
const PROXY_WORLD = {
  ...WORLD,
  addresses: [...WORLD.addresses, ...ROT, CDN_A, CDN_BC, CDN_APEX, EVIL, HINT, ONE, HOLD, MIXED],
  listen: [
    ...WORLD.listen,
    ...[...ROT, CDN_A, CDN_BC, CDN_APEX, EVIL, HINT, ONE, MIXED].map((h) => tcp(h)),
    { proto: "tcp-echo" as const, host: HOLD, port: 7000 },
  ],
  records: RECORDS,
  config: {
    resolvers: ["127.0.0.1:53"],
    dns: { queryTimeoutMs: 1000 },
    refresh: { minTtlSeconds: 1, maxTtlSeconds: 30, graceSeconds: 2 },
  },
};

const ask = (name: string, extra: Partial<Attempt> = {}): Attempt => ({
  proto: "resolve",
  host: "127.0.0.1",
  port: 53,
  name,
  ...extra,
});

async function one(sb: Sandbox, uid: number, a: Attempt): Promise<string> {
  const [r] = await sb.probe(uid, [a]);
  return r?.result ?? "none";
}

interface DnsStatus {
  mode: string;
  proxyPort: number | null;
  queriesAllowed: number;
  queriesRefused: number;
  lastRefused: { name: string }[];
  addressesRemoved: number;
  lastRemoved: { name: string; address: string; reason: string }[];
  learned: number;
}
async function dnsStatus(sb: Sandbox, service: string): Promise<DnsStatus> {
  const st = JSON.parse(await sb.ok("--json", "status", service)) as {
    services: { dns: DnsStatus }[];
  };
  return st.services[0]?.dns as DnsStatus;
}

/** The elements of a set as nft prints them, one line. */
async function setText(sb: Sandbox, set: string): Promise<string> {
  return (await sb.nft("list", "set", "inet", "egressd", set)).replace(/\s+/g, " ");
}

test("a name rotating among seven addresses: resolve-then-connect succeeds every time, over UDP, TCP, IPv6 and to any resolver address", async () => {
  await withSandbox(PROXY_WORLD, async (sb) => {
    await sb.ok("register", "svc-web", "--user", String(SVC_UID));
    await sb.ok("allow", "svc-web", "rot.example.test:443");
    await sb.startDaemon();
    const rounds = (extra: Partial<Attempt>): Attempt => ({
      proto: "resolve-connect",
      host: "127.0.0.1",
      port: 53,
      name: "rot.example.test",
      connectPort: 443,
      count: 21,
      ...extra,
    });
    const results = await sb.probe(SVC_UID, [
      rounds({}),
      rounds({ transport: "tcp" }),
      rounds({ host: "192.0.2.53" }), // a resolver that does not exist: redirected all the same
      rounds({ host: "::1" }),
    ]);
    for (const r of results) assert.is(r.result, "ok:21/21", `${r.host} ${JSON.stringify(r)}`);
    // Every one of those lookups was answered by the proxy and counted as allowed.
    assert.is((await dnsStatus(sb, "svc-web")).queriesAllowed, 4 * 21);
    // The same lookups from an unmanaged uid go to the real resolver, untouched.
    assert.match(await one(sb, UNMANAGED_UID, ask("evil.example.test")), `NOERROR:${EVIL}`);
  });
});

test("a wildcard allows names below it at any depth, not the apex; an unlisted name gets NXDOMAIN and never leaves the host", async () => {
  await withSandbox(PROXY_WORLD, async (sb) => {
    await sb.ok("register", "svc-web", "--user", String(SVC_UID));
    await sb.ok("allow", "svc-web", "*.cdn.example.test:443", "txt.example.test:443");
    await sb.startDaemon();
    const before = await dnsStatus(sb, "svc-web");
    assert.is(await one(sb, SVC_UID, ask("A.CDN.example.test")), `NOERROR:${CDN_A}`);
    assert.is(await one(sb, SVC_UID, ask("b.c.cdn.example.test.")), `NOERROR:${CDN_BC}`);
    assert.is(await sb.try1(SVC_UID, "tcp", CDN_A, 443), "connected");
    assert.is(await sb.try1(SVC_UID, "tcp", CDN_BC, 443), "connected");
    assert.is(await one(sb, SVC_UID, ask("cdn.example.test")), "NXDOMAIN:", "not the apex");
    assert.is(await one(sb, SVC_UID, ask("evil.example.test")), "NXDOMAIN:");
    assert.is(await sb.try1(SVC_UID, "tcp", CDN_APEX, 443), "ECONNREFUSED");
    assert.is(await sb.try1(SVC_UID, "tcp", EVIL, 443), "ECONNREFUSED");
    // Other record types of an allowed name are forwarded.
    assert.is(await one(sb, SVC_UID, ask("txt.example.test", { qtype: "TXT" })), "NOERROR:");
    const log = sb.dnsLog();
    assert.ok(log.includes("txt.example.test TXT"), log.join("\n"));
    assert.ok(log.includes("a.cdn.example.test A"), "allowed names are forwarded");
    assert.not.ok(
      log.some((l) => l.startsWith("evil.example.test")),
      "the unlisted name never left",
    );
    assert.not.ok(
      log.some((l) => l.startsWith("cdn.example.test")),
      "nor the apex",
    );
    const st = await dnsStatus(sb, "svc-web");
    // Three allowed queries (two A below the wildcard, one TXT), two refused.
    assert.is(st.queriesAllowed - before.queriesAllowed, 3);
    assert.is(st.queriesRefused - before.queriesRefused, 2);
    assert.equal(
      st.lastRefused.map((r) => r.name),
      ["evil.example.test", "cdn.example.test"],
    );
    assert.match(
      await sb.ok("status", "svc-web"),
      "3 allowed, 2 refused (last: evil.example.test, cdn.example.test)",
    );
  });
});

test("unlisted names can be answered REFUSED; a service in audit mode gets them forwarded, logged as would-refuse", async () => {
  await withSandbox(
    { ...PROXY_WORLD, config: { ...PROXY_WORLD.config, dns: { unlistedNames: "refused" } } },
    async (sb) => {
      await sb.ok("register", "svc-web", "--user", String(SVC_UID));
      await sb.ok("register", "svc-audit", "--user", String(AUDIT_UID), "--mode", "audit");
      const d = await sb.startDaemon();
      assert.is(await one(sb, SVC_UID, ask("evil.example.test")), "REFUSED:");
      assert.is(await one(sb, AUDIT_UID, ask("evil.example.test")), `NOERROR:${EVIL}`);
      const line = await d.waitFor(
        (l) => l.code === "ERR_EGRESS_DNS_REFUSED" && l.service === "svc-audit",
      );
      assert.is(line.audit, true);
      assert.match(line.msg, "would refuse");
      assert.is(sb.dnsLog().filter((l) => l.startsWith("evil.example.test")).length, 1);
    },
  );
});

test("a service reaches no proxy port directly, neither another service's nor its own", async () => {
  await withSandbox(PROXY_WORLD, async (sb) => {
    await sb.ok("register", "svc-a", "--user", String(SVC_UID));
    await sb.ok("register", "svc-b", "--user", String(AUDIT_UID));
    await sb.ok("allow", "svc-a", "one.example.test:443");
    await sb.startDaemon();
    const a = (await dnsStatus(sb, "svc-a")).proxyPort as number;
    const b = (await dnsStatus(sb, "svc-b")).proxyPort as number;
    assert.ok(a > 0 && b > 0 && a !== b, `${a} ${b}`);
    for (const port of [a, b]) {
      assert.is(await one(sb, SVC_UID, ask("one.example.test", { port })), "EPERM", `UDP ${port}`);
      assert.is(
        await one(sb, SVC_UID, ask("one.example.test", { port, transport: "tcp" })),
        "ECONNREFUSED",
        `TCP ${port}`,
      );
    }
    // Through its own redirect it works.
    assert.is(await one(sb, SVC_UID, ask("one.example.test")), `NOERROR:${ONE}`);
  });
});

test("an answer whose kernel update fails is SERVFAIL, and its address stays refused", async () => {
  await withSandbox(PROXY_WORLD, async (sb) => {
    const flag = join(sb.dir, "nft-fails");
    const wrapper = join(sb.dir, "nft-failing");
    // Batches (-f) fail while the flag file exists; listings still work.
    writeFileSync(
      wrapper,
      `#!/bin/sh\nfor a in "$@"; do [ "$a" = "-f" ] && [ -e ${flag} ] && { echo "Error: injected failure" >&2; exit 1; }; done\nexec nft "$@"\n`,
      { mode: 0o755 },
    );
    await sb.ok("register", "svc-web", "--user", String(SVC_UID));
    await sb.ok("allow", "svc-web", "*.example.test:443");
    await sb.startDaemon({ EGRESSD_NFT: wrapper });
    writeFileSync(flag, "");
    assert.is(await one(sb, SVC_UID, ask("one.example.test")), "SERVFAIL:");
    assert.is(await sb.try1(SVC_UID, "tcp", ONE, 443), "ECONNREFUSED");
    rmSync(flag);
    assert.ok(!existsSync(flag));
    assert.is(await one(sb, SVC_UID, ask("one.example.test")), `NOERROR:${ONE}`);
    assert.is(await sb.try1(SVC_UID, "tcp", ONE, 443), "connected");
  });
});

test("HTTPS records: their ipv4hint addresses are allowed before the answer, like A records", async () => {
  await withSandbox(PROXY_WORLD, async (sb) => {
    await sb.ok("register", "svc-web", "--user", String(SVC_UID));
    await sb.ok("allow", "svc-web", "*.example.test:443");
    await sb.startDaemon();
    assert.is(await sb.try1(SVC_UID, "tcp", HINT, 443), "ECONNREFUSED", "not before the lookup");
    assert.is(
      await one(sb, SVC_UID, ask("https.example.test", { qtype: "HTTPS" })),
      `NOERROR:${HINT}`,
    );
    assert.is(await sb.try1(SVC_UID, "tcp", HINT, 443), "connected");
    // A CNAME chain: the final addresses are allowed.
    assert.is(await one(sb, SVC_UID, ask("www.example.test")), `NOERROR:${API4[0]}`);
    assert.is(await sb.try1(SVC_UID, "tcp", API4[0] as string, 443), "connected");
  });
});

test("learned addresses expire in the kernel after their timeout with the daemon stopped; open connections survive", async () => {
  await withSandbox(PROXY_WORLD, async (sb) => {
    await sb.ok("register", "svc-web", "--user", String(SVC_UID));
    await sb.ok("allow", "svc-web", "*.hold.example.test:7000");
    const d = await sb.startDaemon();
    assert.is(await one(sb, SVC_UID, ask("x.hold.example.test")), `NOERROR:${HOLD}`);
    assert.match(
      await setText(sb, "s_svc_web_tcp7000_4"),
      new RegExp(`${HOLD.replace(/\./g, "\\.")} timeout 3s`),
    );
    // Learned elements are desired state: the audit finds nothing to report.
    const audit = await sb.egressctl("audit");
    assert.is(audit.exitCode, 0, audit.stdout);
    assert.is(await d.stop("SIGTERM"), 0);
    // A connection opened now is held past the element's expiry, while new ones get refused.
    const [held, later] = await Promise.all([
      sb.probe(SVC_UID, [{ proto: "hold", host: HOLD, port: 7000, holdMs: 6000, timeoutMs: 3000 }]),
      (async () => {
        await eventually(
          async () => (await sb.try1(SVC_UID, "tcp", HOLD, 7000)) === "ECONNREFUSED",
          15_000,
          "new connections refused once the element expired",
        );
        return setText(sb, "s_svc_web_tcp7000_4");
      })(),
    ]);
    assert.is(held[0]?.result, "held");
    assert.not.match(later, HOLD);
    // Fail-closed: with the daemon down the redirect stays and nothing answers, so the
    // service's lookups of an allowed name fail, over UDP and TCP, to any resolver address,
    // and none of them reaches the resolver.
    const asked = () => sb.dnsLog().filter((l) => l.startsWith("x.hold.example.test")).length;
    assert.is(asked(), 1, "the one lookup made while the daemon ran");
    const down = await sb.probe(
      SVC_UID,
      [{}, { transport: "tcp" as const }, { host: "192.0.2.53" }].map((x) =>
        ask("x.hold.example.test", { timeoutMs: 2000, ...x }),
      ),
    );
    for (const r of down) assert.is(r.result, "ECONNREFUSED", JSON.stringify(r));
    assert.is(asked(), 1, "no lookup of the service reached the resolver");
    // The resolver itself is up: an unmanaged uid's lookup reaches it.
    assert.is(await one(sb, UNMANAGED_UID, ask("x.hold.example.test")), `NOERROR:${HOLD}`);
    assert.is(asked(), 2);
  });
});

test("a restart keeps each proxy's port and what was learned; a repair re-adds learned addresses with their remaining lifetime", async () => {
  await withSandbox(
    { ...PROXY_WORLD, config: { ...PROXY_WORLD.config, refresh: { graceSeconds: 600 } } },
    async (sb) => {
      await sb.ok("register", "svc-web", "--user", String(SVC_UID));
      await sb.ok("allow", "svc-web", "*.cdn.example.test:443");
      const first = await sb.startDaemon();
      const port = (await dnsStatus(sb, "svc-web")).proxyPort;
      assert.is(await one(sb, SVC_UID, ask("a.cdn.example.test")), `NOERROR:${CDN_A}`);
      assert.is(await first.stop("SIGTERM"), 0);
      await sb.startDaemon();
      assert.is((await dnsStatus(sb, "svc-web")).proxyPort, port, "the same port");
      assert.is(await sb.try1(SVC_UID, "tcp", CDN_A, 443), "connected", "no new lookup needed");
      assert.is((await dnsStatus(sb, "svc-web")).learned, 1);

      await sb.nft("delete", "table", "inet", "egressd");
      const r = await sb.egressctl("audit", "--repair");
      assert.is(r.exitCode, 1, r.stdout);
      const set = await setText(sb, "s_svc_web_tcp443_4");
      // The lifetime left (TTL 60 s clamped, + 600 s grace = 11 min at the lookup), not a fresh one.
      const left = /expires (\d+)m/.exec(set);
      assert.ok(left && Number(left[1]) >= 9 && Number(left[1]) <= 10, set);
      assert.is(await sb.try1(SVC_UID, "tcp", CDN_A, 443), "connected");
      assert.is(
        await one(sb, SVC_UID, ask("a.cdn.example.test")),
        `NOERROR:${CDN_A}`,
        "redirect back",
      );
    },
  );
});

test("a DNS-aware service cannot ride a DNS flow another socket opened: not to the resolver, not to another service's proxy", async () => {
  await withSandbox(PROXY_WORLD, async (sb) => {
    await sb.ok("register", "svc-a", "--user", String(SVC_UID));
    await sb.ok("register", "svc-b", "--user", String(AUDIT_UID));
    await sb.ok("allow", "svc-b", "evil.example.test:443");
    await sb.startDaemon();
    // An unmanaged uid's lookup opens a flow to the real resolver (no redirect for it)...
    const toResolver = ask("evil.example.test", { sourcePort: 40054 });
    assert.is(await one(sb, UNMANAGED_UID, toResolver), `NOERROR:${EVIL}`, "unmanaged uid");
    // ...which svc-a, binding the same source port, would ride past its proxy.
    assert.is(await one(sb, SVC_UID, toResolver), "EPERM", "svc-a in the unmanaged flow");
    // svc-b's lookup is redirected to svc-b's proxy, which allows the name...
    const toB = ask("evil.example.test", { sourcePort: 40055 });
    assert.is(await one(sb, AUDIT_UID, toB), `NOERROR:${EVIL}`, "svc-b through its proxy");
    // ...and svc-a in that flow would be answered under svc-b's policy.
    assert.is(await one(sb, SVC_UID, toB), "EPERM", "svc-a in svc-b's flow");
    // Its own lookups still work, and evil stays unknown to it.
    assert.is(await one(sb, SVC_UID, ask("evil.example.test")), "NXDOMAIN:");
    assert.is(await one(sb, SVC_UID, ask("evil.example.test", { transport: "tcp" })), "NXDOMAIN:");
  });
});

test("switching a service to DNS-aware mode also catches the UDP DNS flow it already had open", async () => {
  await withSandbox(PROXY_WORLD, async (sb) => {
    await sb.ok("register", "svc-web", "--user", String(SVC_UID), "--dns", "system");
    await sb.startDaemon();
    const sameFlow = ask("evil.example.test", { sourcePort: 40053 });
    assert.is(
      await one(sb, SVC_UID, sameFlow),
      `NOERROR:${EVIL}`,
      "system mode: the resolver answers",
    );
    await sb.ok("register", "svc-web", "--user", String(SVC_UID), "--dns", "proxy");
    // The same 5-tuple again: without the conntrack flush it would still reach the resolver.
    assert.is(await one(sb, SVC_UID, sameFlow), "NXDOMAIN:");
  });
});

test("an answer loses the addresses the filter refuses (metadata, loopback, IPv4 inside IPv6): the service never gets or reaches them, status counts them, the log says it once", async () => {
  await withSandbox(PROXY_WORLD, async (sb) => {
    await sb.ok("register", "svc-web", "--user", String(SVC_UID));
    // A wildcard: the refresh loop never asks it, so only the proxy's path sees the answer.
    await sb.ok("allow", "svc-web", "*.mixed.example.test:443", "*.mixed.example.test:80");
    const d = await sb.startDaemon();
    assert.is(await one(sb, SVC_UID, ask("x.mixed.example.test")), `NOERROR:${MIXED}`);
    assert.is(await one(sb, SVC_UID, ask("x.mixed.example.test", { qtype: "AAAA" })), "NOERROR:");
    assert.is(await one(sb, SVC_UID, ask("x.mixed.example.test")), `NOERROR:${MIXED}`);
    assert.is(
      sb.dnsLog().filter((l) => l === "x.mixed.example.test A").length,
      2,
      "asked upstream",
    );
    assert.is(await sb.try1(SVC_UID, "tcp", MIXED, 443), "connected");
    assert.is.not(
      await sb.try1(SVC_UID, "tcp", METADATA, 80),
      "connected",
      "metadata stays refused",
    );
    assert.not.match(await setText(sb, "s_svc_web_tcp80_4"), METADATA);

    const st = await dnsStatus(sb, "svc-web");
    assert.is(st.addressesRemoved, 5, "two from each A answer, one from the AAAA answer");
    assert.equal(
      st.lastRemoved.slice(0, 3).map((r) => r.address),
      ["127.0.0.2", "169.254.169.254", "64:ff9b::a9fe:a9fe"],
      JSON.stringify(st.lastRemoved),
    );
    assert.match(
      await sb.ok("status", "svc-web"),
      "dns answers: 5 refused address(es) removed (last: x.mixed.example.test 127.0.0.2, loopback",
    );
    const logged = d.lines.filter(
      (l) => l.code === "ERR_EGRESS_ADDRESS_REFUSED" && l.service === "svc-web",
    );
    assert.is(logged.length, 1, "once a minute per name, however often it is asked");
  });
});

test.run();
