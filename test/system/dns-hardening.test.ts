/**
 * The DNS path and the files around it, attacked as an unlucky operator and as a hostile
 * resolver or daemon user would: per-family answers, deadlines, the address filter, narrowing
 * config, tampered state, planted links.
 */
import {
  chmodSync,
  lchownSync,
  mkdirSync,
  readFileSync,
  statSync,
  symlinkSync,
  writeFileSync,
  chownSync,
  linkSync,
} from "node:fs";
import { join } from "node:path";
import { execa } from "execa";
import ipaddr from "ipaddr.js";
import { suite } from "uvu";
import * as assert from "uvu/assert";
import {
  eventually,
  HOST_ADDRESSES,
  LINK,
  withSandbox,
  type Records,
  type Sandbox,
} from "../helpers/sandbox.ts";
import { API4, DB, METADATA, OTHER, SVC_UID, UNMANAGED_UID, WORLD } from "./world.ts";

const test = suite(
  "DNS and state hardening: per-family answers, deadlines, the address filter, safe files",
);

const [X, Y] = API4 as [string, string];
const CONFIG = {
  resolvers: ["127.0.0.1:53"],
  dns: { queryTimeoutMs: 1000 },
  refresh: { minTtlSeconds: 1, maxTtlSeconds: 30, graceSeconds: 2 },
};

/** One set element as text: "a", "a/len", "a-b", or its JSON for anything else (concatenations, maps). */
function elementText(e: unknown): string {
  if (typeof e === "string" || typeof e === "number") return String(e);
  const o = e as Record<string, unknown>;
  if (o.elem) return elementText((o.elem as { val: unknown }).val);
  if (o.prefix) {
    const p = o.prefix as { addr: string; len: number };
    return `${p.addr}/${p.len}`;
  }
  if (o.range) return (o.range as unknown[]).map(elementText).join("-");
  return JSON.stringify(e);
}

/** The elements of one of egressd's sets, parsed from `nft -j list set`. */
async function setElements(sb: Sandbox, set: string): Promise<string[]> {
  const j = await sb.nftJson("list", "set", "inet", "egressd", set);
  const found = j.nftables.find((o) => "set" in o)?.set as { elem?: unknown[] } | undefined;
  return (found?.elem ?? []).map(elementText);
}

/** Every set and map of egressd's table with its elements, from `nft -j list table`. */
async function allSets(sb: Sandbox): Promise<Map<string, string[]>> {
  const j = await sb.nftJson("list", "table", "inet", "egressd");
  const out = new Map<string, string[]>();
  for (const o of j.nftables) {
    const s = (o.set ?? o.map) as { name: string; elem?: unknown[] } | undefined;
    if (s) out.set(s.name, (s.elem ?? []).map(elementText));
  }
  return out;
}

interface FamilyJson {
  lastError: { code: string; message: string } | null;
  addresses: string[];
  dropped: { address: string; reason: string }[];
}
interface StatusJson {
  daemon: { lastAudit: { at: number } | null };
  services: {
    names: { name: string; addresses: { address: string }[]; A: FamilyJson; AAAA: FamilyJson }[];
  }[];
}
async function status(sb: Sandbox): Promise<StatusJson> {
  return JSON.parse(await sb.ok("--json", "status")) as StatusJson;
}

test("a name with A records is reachable over IPv4 when its AAAA query is refused, fails or times out", async () => {
  const records: Records = {
    ...WORLD.records,
    "refused.example.test": { A: [X], rcodes: { AAAA: "REFUSED" } },
    "servfail.example.test": { A: [Y], rcodes: { AAAA: "SERVFAIL" } },
    "silent.example.test": { A: [OTHER], rcodes: { AAAA: "DROP" } },
  };
  await withSandbox({ ...WORLD, records, config: CONFIG }, async (sb) => {
    await sb.ok("register", "svc-web", "--user", String(SVC_UID));
    await sb.ok(
      "allow",
      "svc-web",
      "refused.example.test:443",
      "servfail.example.test:443",
      "silent.example.test:443",
    );
    const r = await sb.egressctl("apply");
    assert.is(r.exitCode, 0, r.stderr);
    assert.match(r.stderr, "refused.example.test (svc-web) did not resolve (AAAA)");
    assert.not.match(r.stdout, "unresolved", "every name has addresses");
    for (const host of [X, Y, OTHER])
      assert.is(await sb.try1(SVC_UID, "tcp", host, 443), "connected", host);

    await sb.startDaemon();
    await eventually(
      async () => (await status(sb)).services[0]?.names.every((n) => n.AAAA.lastError) ?? false,
      15_000,
      "each AAAA failure shows in status",
    );
    const byName = new Map((await status(sb)).services[0]?.names.map((n) => [n.name, n]));
    assert.is(byName.get("refused.example.test")?.AAAA.lastError?.code, "REFUSED");
    assert.is(byName.get("servfail.example.test")?.AAAA.lastError?.code, "SERVFAIL");
    assert.is(byName.get("silent.example.test")?.AAAA.lastError?.code, "TIMEOUT");
    assert.equal(byName.get("refused.example.test")?.A.addresses, [X]);
    assert.is(byName.get("refused.example.test")?.A.lastError, null);
    const text = await sb.ok("status");
    assert.match(text, "AAAA REFUSED");
    assert.match(text, "A    1 address(es)");
  });
});

test("a resolver that truncates and then stalls on TCP holds up neither apply, allow, status, the audit nor other names", async () => {
  const records = (rot: string): Records => ({
    ...WORLD.records,
    "slow.example.test": { A: [OTHER], truncate: true, tcp: "stall" },
    "slow2.example.test": { A: [DB], truncate: true, tcp: "stall" },
    "rot.example.test": { A: [rot], ttl: 1 },
  });
  // The same stalling resolver listed six times: a lookup of a stalled name costs six query
  // deadlines (6 s), twice a control request's own deadline (2 x queryTimeoutMs + 1 s = 3 s),
  // so requests must answer before DNS does and say what is still resolving.
  const config = {
    ...CONFIG,
    resolvers: Array<string>(6).fill("127.0.0.1:53"),
    audit: { schedule: "*/2 * * * * *", repair: true },
  };
  const CONTROL_DEADLINE = 2 * CONFIG.dns.queryTimeoutMs + 1000;
  await withSandbox({ ...WORLD, records: records(X), config }, async (sb) => {
    await sb.ok("register", "svc-web", "--user", String(SVC_UID));
    await sb.ok("allow", "svc-web", "rot.example.test:443", "slow.example.test:443");
    let t0 = Date.now();
    const once = await sb.egressctl("apply");
    const onceMs = Date.now() - t0;
    assert.is(once.exitCode, 0, once.stderr);
    // Six deadlines of 1 s for the stalled name (A and AAAA side by side), plus start-up.
    assert.ok(onceMs < 10_000, `one-shot apply finished (${onceMs} ms)`);
    assert.match(once.stderr, "no TCP answer from 127.0.0.1:53");

    const d = await sb.startDaemon();
    t0 = Date.now();
    const allowed = await sb.ok("allow", "svc-web", "slow2.example.test:443");
    const allowMs = Date.now() - t0;
    assert.ok(allowMs < 2 * CONTROL_DEADLINE, `allow answered (${allowMs} ms)`);
    assert.match(
      allowed,
      "; still resolving: slow2.example.test (applied when DNS answers)",
      "allow says what it did not wait for",
    );
    t0 = Date.now();
    const text = await sb.ok("status");
    const statusMs = Date.now() - t0;
    assert.ok(statusMs < CONTROL_DEADLINE, `status answered (${statusMs} ms)`);
    assert.match(
      text,
      /slow2\.example\.test: .*\(resolving\)/,
      `status shows it pending:\n${text}`,
    );
    assert.match(text, /resolving: \d+ lookup\(s\) on the wire/);
    await eventually(
      async () => {
        const slow = (await status(sb)).services[0]?.names.find(
          (n) => n.name === "slow2.example.test",
        );
        return (
          slow?.A.lastError?.code === "TIMEOUT" && /no TCP answer/.test(slow.A.lastError.message)
        );
      },
      15_000,
      "the stalled TCP retry is a timeout",
    );

    const allowedAt = Date.now();
    await eventually(
      async () => ((await status(sb)).daemon.lastAudit?.at ?? 0) > allowedAt,
      15_000,
      "the scheduled audit keeps running",
    );
    sb.setRecords(records(Y));
    await eventually(
      async () => (await sb.try1(SVC_UID, "tcp", Y, 443)) === "connected",
      15_000,
      "another name keeps refreshing",
    );
    assert.is(d.child.exitCode, null);
  });
});

test("DNS answers of every forbidden class never reach a set and are never connectable", async () => {
  const bad4 = [
    "127.0.0.1",
    METADATA,
    "100.100.100.200",
    "168.63.129.16",
    HOST_ADDRESSES.v4,
    LINK.host4,
    "0.0.0.0",
    "240.0.0.1",
    "224.0.0.1",
    "255.255.255.255",
  ];
  const bad6 = [
    "::1",
    "64:ff9b::7f00:1",
    "64:ff9b::cb00:7101", // NAT64 of the host's own 203.0.113.1
    "fd00:ec2::254",
    "fe80::1",
    "::ffff:7f00:1",
    "2002:7f00:1::1",
    "2001:0:4136:e378:8000:63bf:80ff:fffe",
    HOST_ADDRESSES.v6,
    "fec0::1",
    "ff02::1",
  ];
  const records: Records = {
    ...WORLD.records,
    "bad.example.test": { A: [...bad4, X], AAAA: bad6, ttl: 60 },
  };
  await withSandbox({ ...WORLD, records, config: CONFIG }, async (sb) => {
    // Listeners on every local address, run by an unmanaged uid on the host.
    await sb.serveAs(UNMANAGED_UID, [
      { proto: "tcp", host: "0.0.0.0", port: 8443 },
      { proto: "tcp", host: "::", port: 8444 },
    ]);
    await sb.ok("register", "svc-web", "--user", String(SVC_UID));
    await sb.ok(
      "allow",
      "svc-web",
      "bad.example.test:8443",
      "bad.example.test:8444",
      "bad.example.test:80",
    );
    const d = await sb.startDaemon();
    await eventually(
      async () => (await setElements(sb, "s_svc_web_tcp8443_4")).includes(X),
      15_000,
      "the one global address is allowed",
    );
    // Every address set of the service, parsed element by element: the one global IPv4 and
    // nothing else; no IPv6 element at all.
    const sets = [...(await allSets(sb))].filter(([n]) => n.startsWith("s_svc_web_"));
    assert.ok(sets.length >= 4, sets.map(([n]) => n).join(" "));
    const forbidden = new Set([...bad4, ...bad6].map((a) => ipaddr.parse(a).toNormalizedString()));
    for (const [set, elems] of sets) {
      for (const e of elems)
        assert.not.ok(forbidden.has(ipaddr.parse(e).toNormalizedString()), `${e} in ${set}`);
      assert.equal(elems, set.endsWith("_4") ? [X] : [], set);
    }

    for (const [host, port] of [
      ["127.0.0.1", 8443],
      [HOST_ADDRESSES.v4, 8443],
      [LINK.host4, 8443],
      ["::1", 8444],
      [HOST_ADDRESSES.v6, 8444],
    ] as const) {
      assert.is(await sb.try1(UNMANAGED_UID, "tcp", host, port), "connected", `${host} listens`);
      assert.is(await sb.try1(SVC_UID, "tcp", host, port), "ECONNREFUSED", `${host} refused`);
    }
    assert.is(await sb.try1(SVC_UID, "tcp", METADATA, 80), "ECONNREFUSED");

    const name = (await status(sb)).services[0]?.names[0];
    const reasons = new Map(
      [...(name?.A.dropped ?? []), ...(name?.AAAA.dropped ?? [])].map((x) => [x.address, x.reason]),
    );
    assert.is(reasons.get(HOST_ADDRESSES.v4), "an address of this host");
    assert.is(reasons.get("64:ff9b::7f00:1"), "NAT64 of 127.0.0.1: loopback");
    assert.is(reasons.get("fd00:ec2::254"), "cloud metadata");
    assert.is(reasons.get("64:ff9b::cb00:7101"), "NAT64 of 203.0.113.1: an address of this host");
    assert.is(reasons.size, bad4.length + bad6.length, [...reasons.keys()].join(" "));
    const logged = d.lines.filter(
      (l) => l.code === "ERR_EGRESS_ADDRESS_REFUSED" && l.address === "127.0.0.1",
    );
    assert.is(logged.length, 1, "each dropped address is logged once per name");
    assert.match(String(logged[0]?.hint), "allow it by IP or CIDR");
  });
});

test("an address added to the host while the daemon runs is refused from DNS answers at the next refresh", async () => {
  const NEW = "192.0.2.99";
  const records: Records = { ...WORLD.records, "grow.example.test": { A: [X, NEW], ttl: 1 } };
  await withSandbox({ ...WORLD, records, config: CONFIG }, async (sb) => {
    // A local listener on every address, run by an unmanaged uid.
    await sb.serveAs(UNMANAGED_UID, [{ proto: "tcp", host: "0.0.0.0", port: 8080 }]);
    await sb.ok("register", "svc-web", "--user", String(SVC_UID));
    await sb.ok("allow", "svc-web", "grow.example.test:8080");
    await sb.startDaemon();
    await eventually(
      async () => (await setElements(sb, "s_svc_web_tcp8080_4")).includes(NEW),
      15_000,
      "a global address the host does not have is allowed",
    );
    // The host now owns NEW: allowing it would open the local listener to the service.
    await sb.ip("addr", "add", `${NEW}/32`, "dev", "lo");
    assert.is(await sb.try1(UNMANAGED_UID, "tcp", NEW, 8080), "connected", "NEW is local now");
    const t0 = Date.now();
    await eventually(
      async () => !(await setElements(sb, "s_svc_web_tcp8080_4")).includes(NEW),
      10_000,
      "the next refresh (TTL 1 s) refuses it",
    );
    const took = Date.now() - t0;
    assert.ok(took < 5_000, `within a refresh or two (${took} ms)`);
    assert.equal(await setElements(sb, "s_svc_web_tcp8080_4"), [X], "the other address stays");
    assert.is(await sb.try1(SVC_UID, "tcp", NEW, 8080), "ECONNREFUSED", "the local listener");
    assert.is(await sb.try1(SVC_UID, "tcp", X, 8080), "connected");
    const name = (await status(sb)).services[0]?.names.find((n) => n.name === "grow.example.test");
    assert.equal(name?.A.dropped, [{ address: NEW, reason: "an address of this host" }]);
  });
});

test("turning allowPrivateAddresses off removes a held private address in the same transaction", async () => {
  const PRIV = "10.9.9.9";
  const records: Records = { ...WORLD.records, "db.internal.test": { A: [PRIV], ttl: 3600 } };
  await withSandbox(
    {
      ...WORLD,
      addresses: [...WORLD.addresses, PRIV],
      listen: [...WORLD.listen, { proto: "tcp", host: PRIV, port: 5432 }],
      records,
      config: CONFIG,
    },
    async (sb) => {
      await sb.ok("register", "svc-web", "--user", String(SVC_UID));
      await sb.ok("allow", "svc-web", "db.internal.test:5432");
      await sb.startDaemon();
      assert.is(await sb.try1(SVC_UID, "tcp", PRIV, 5432), "connected");
      sb.writeConfig({ ...CONFIG, refresh: { ...CONFIG.refresh, allowPrivateAddresses: false } });
      await sb.ok("apply");
      // No waiting: the narrowing is in the transaction that applied it.
      assert.not.ok((await setElements(sb, "s_svc_web_tcp5432_4")).includes(PRIV));
      assert.is(await sb.try1(SVC_UID, "tcp", PRIV, 5432), "ECONNREFUSED");
    },
  );
});

test("a tampered state file starts enforcing without its network, loopback, unknown name and far expiry", async () => {
  const records: Records = { ...WORLD.records, "api.example.test": { rcode: "DROP" } };
  const listen = [...WORLD.listen, { proto: "tcp" as const, host: "127.0.0.1", port: 443 }];
  await withSandbox({ ...WORLD, listen, records, config: CONFIG }, async (sb) => {
    await sb.ok("register", "svc-web", "--user", String(SVC_UID));
    await sb.ok("allow", "svc-web", "api.example.test:443", "api.example.test:80");
    mkdirSync(sb.stateDir, { recursive: true });
    const now = Date.now();
    const file = join(sb.stateDir, "state.json");
    writeFileSync(
      file,
      JSON.stringify({
        version: 2,
        savedAt: now,
        names: {
          "api.example.test": {
            4: {
              current: ["0.0.0.0/0", "127.0.0.1", X],
              until: { [OTHER]: now + 10 * 365 * 86_400_000 },
              nextRefresh: now + 365 * 86_400_000,
            },
            6: { current: [], until: {} },
          },
          "evil.example.test": { 4: { current: [DB], until: {} }, 6: { current: [], until: {} } },
        },
      }),
      { mode: 0o600 },
    );
    const d = await sb.startDaemon();
    await d.waitFor((l) => l.msg === "applied from saved state, before any DNS query");
    assert.is(await sb.try1(SVC_UID, "tcp", X, 443), "connected", "the sound entry is used");
    // Each would connect had its entry been loaded: OTHER by its far expiry, Y and METADATA
    // only through 0.0.0.0/0, the loopback listener through 127.0.0.1.
    for (const [host, port] of [
      [OTHER, 443],
      [Y, 443],
      ["127.0.0.1", 443],
      [METADATA, 80],
    ] as const)
      assert.is(await sb.try1(SVC_UID, "tcp", host, port), "ECONNREFUSED", host);
    // The kernel holds X alone in both of the name's sets, and DB (the unknown name's) nowhere.
    const sets = await allSets(sb);
    assert.equal(sets.get("s_svc_web_tcp443_4"), [X]);
    assert.equal(sets.get("s_svc_web_tcp80_4"), [X]);
    for (const [set, elems] of sets) assert.not.ok(elems.includes(DB), `${DB} in ${set}`);
    const warnings = d.lines.filter((l) => l.code === "ERR_EGRESS_STATE").map((l) => l.msg);
    for (const expected of [
      '"0.0.0.0/0" is a network, not an address',
      "127.0.0.1: loopback",
      `${OTHER} expires`,
      'names["evil.example.test"]: not a name any service allows',
    ])
      assert.ok(
        warnings.some((w) => w.includes(expected) && w.includes(file)),
        `${expected} in\n${warnings.join("\n")}`,
      );
  });
});

test("a malformed state file starts from empty state, not from an error loop", async () => {
  await withSandbox({ ...WORLD, config: CONFIG }, async (sb) => {
    await sb.ok("register", "svc-web", "--user", String(SVC_UID));
    await sb.ok("allow", "svc-web", "api.example.test:443");
    mkdirSync(sb.stateDir, { recursive: true });
    writeFileSync(join(sb.stateDir, "state.json"), "{ this is not json", { mode: 0o600 });
    const d = await sb.startDaemon();
    await eventually(
      async () => (await sb.try1(SVC_UID, "tcp", X, 443)) === "connected",
      15_000,
      "DNS refills it",
    );
    assert.ok(
      d.lines.some((l) => l.code === "ERR_EGRESS_STATE"),
      "says why",
    );
    assert.ok(
      JSON.parse(readFileSync(join(sb.stateDir, "state.json"), "utf8")).version === 2,
      "rewritten",
    );
  });
});

test("a link planted in the state dir never makes root write, chown or read through it", async () => {
  await withSandbox({ ...WORLD, config: CONFIG }, async (sb) => {
    const DAEMON_UID = 64_998;
    await sb.ok("register", "svc-web", "--user", String(SVC_UID));
    await sb.ok("allow", "svc-web", `${DB}:5432`);
    // The state dir belongs to the daemon's user, who plants links in it.
    mkdirSync(sb.stateDir, { recursive: true });
    chownSync(sb.stateDir, DAEMON_UID, DAEMON_UID);
    const precious = join(sb.dir, "precious");
    writeFileSync(precious, "root's file\n", { mode: 0o600 });
    const before = statSync(precious);
    const file = join(sb.stateDir, "state.json");
    symlinkSync(precious, file);
    lchownSync(file, DAEMON_UID, DAEMON_UID);

    const r = await sb.egressctl("apply");
    assert.is(r.exitCode, 3, `${r.stdout}\n${r.stderr}`);
    assert.match(r.stderr, `refusing ${file}: a symbolic link`);
    const after = statSync(precious);
    assert.is(readFileSync(precious, "utf8"), "root's file\n", "not written");
    assert.equal(
      [after.uid, after.gid, after.mode],
      [before.uid, before.gid, before.mode],
      "not chowned",
    );
    assert.is(
      (await sb.exec("nft", ["list", "table", "inet", "egressd"])).exitCode,
      1,
      "nothing applied",
    );

    // A FIFO, a hard link to a root-owned file: refused too, and nothing hangs.
    await execa("rm", [file]);
    await execa("mkfifo", [file]);
    const fifo = await sb.egressctl("apply");
    assert.is(fifo.exitCode, 3, fifo.stderr);
    assert.match(fifo.stderr, "a FIFO");
    await execa("rm", [file]);
    linkSync(precious, file);
    const hard = await sb.egressctl("apply");
    assert.is(hard.exitCode, 3, hard.stderr);
    assert.match(hard.stderr, "hard links");
    assert.is(readFileSync(precious, "utf8"), "root's file\n");

    // A FIFO at the daemon's lock file: root's apply looks there for a running daemon, and
    // must refuse it at once rather than wait forever for a writer.
    await execa("rm", [file]);
    const pidFile = join(sb.stateDir, "egressd.pid");
    await execa("mkfifo", [pidFile]);
    chownSync(pidFile, DAEMON_UID, DAEMON_UID);
    const t0 = Date.now();
    const lock = await sb.egressctl("apply");
    const took = Date.now() - t0;
    assert.is(lock.exitCode, 3, `${lock.stdout}\n${lock.stderr}`);
    assert.match(lock.stderr, `refusing ${pidFile}: a FIFO`);
    assert.ok(took < 5_000, `refused promptly, not after a deadline (${took} ms)`);
    assert.is(
      (await sb.exec("nft", ["list", "table", "inet", "egressd"])).exitCode,
      1,
      "nothing applied",
    );
    // A hard link there (to a file the daemon's user could not write) is refused the same way.
    await execa("rm", [pidFile]);
    linkSync(precious, pidFile);
    const hardLock = await sb.egressctl("apply");
    assert.is(hardLock.exitCode, 3, hardLock.stderr);
    assert.match(hardLock.stderr, `refusing ${pidFile}: a file with 2 hard links`);
    assert.is(readFileSync(precious, "utf8"), "root's file\n");
    await execa("rm", [pidFile]);

    // With the files gone, root's apply writes a state file the daemon's user owns.
    await sb.ok("apply");
    const st = statSync(file);
    assert.equal([st.uid, st.mode & 0o777], [DAEMON_UID, 0o600]);
    chmodSync(sb.stateDir, 0o700);
  });
});

test.run();
