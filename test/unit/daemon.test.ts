/**
 * The Daemon with fake nft, DNS, clock and proxies: what it sends to the kernel, in what order,
 * and what it answers, without a kernel. (System tests prove the real thing in namespaces.)
 */
import { writeFileSync } from "node:fs";
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { parseLive } from "../../rules/live.ts";
import type { Ruleset } from "../../rules/ruleset.ts";
import { harness, listing, type Harness } from "../helpers/fake-daemon.ts";

const test = suite("the daemon, with every effect faked");

const sec = (n: number) => n * 1000;
const FAST = { refresh: { minTtlSeconds: 1, maxTtlSeconds: 60, graceSeconds: 0 } };
/** svc-web (uid 2001) in DNS mode `dns`, allowed one literal address. */
const svcWeb = (dns: "proxy" | "system" | "none") => ({
  name: "svc-web",
  user: 2001,
  dns,
  outbound: [{ host: "198.51.100.1", ports: "443" }],
});

async function settle(): Promise<void> {
  for (let i = 0; i < 20; i++) await new Promise((r) => setImmediate(r));
}

async function until(cond: () => boolean, what: string): Promise<void> {
  for (let i = 0; i < 2000 && !cond(); i++) await new Promise((r) => setTimeout(r, 1));
  if (!cond()) throw new Error(`not reached: ${what}`);
}

/** The table the daemon believes the kernel holds (what it last applied). */
const appliedBy = (h: Harness): Ruleset => (h.daemon as unknown as { applied: Ruleset }).applied;

async function started(h: Harness): Promise<void> {
  await h.daemon.start();
  await settle();
}

test("a refresh whose answer lost an address deletes exactly that element, once its grace is over", async () => {
  const h = await harness(FAST);
  try {
    await h.service({
      name: "svc-web",
      user: 2001,
      dns: "system",
      outbound: [{ host: "api.example.test", ports: "443" }],
    });
    h.resolver.answers.set("api.example.test", { 4: ["192.0.2.1", "192.0.2.2"], ttl: 1 });
    await started(h);
    await h.daemon.refresh();
    const before = h.nft.batches.length;
    h.resolver.answers.set("api.example.test", { 4: ["192.0.2.1"], ttl: 1 });
    h.clock.now += sec(2);
    const r = await h.daemon.refresh();
    assert.is(r.kind, "elements");
    const sent = h.nft.commands().slice(-1);
    assert.equal(sent, ['delete element s_svc_web_tcp443_4 ["192.0.2.2"]']);
    assert.is(h.nft.batches.length, before + 1, "one transaction");
    // Nothing changed: nothing sent.
    h.clock.now += sec(2);
    assert.is((await h.daemon.refresh()).kind, "none");
    assert.is(h.nft.batches.length, before + 1);
  } finally {
    await h.done();
  }
});

test("an address added to the host since the last refresh is refused from the next answer, shown in status and logged", async () => {
  const h = await harness(FAST);
  try {
    await h.service({
      name: "svc-web",
      user: 2001,
      dns: "system",
      outbound: [{ host: "api.example.test", ports: "443" }],
    });
    h.resolver.answers.set("api.example.test", { 4: ["192.0.2.1", "192.0.2.2"], ttl: 1 });
    await started(h);
    await h.daemon.refresh();
    assert.ok(
      h.nft.commands().some((c) => c.includes("s_svc_web_tcp443_4") && c.includes("192.0.2.2")),
      "allowed while the host does not have it",
    );
    h.host.add("192.0.2.2");
    h.clock.now += sec(2);
    await h.daemon.refresh();
    assert.equal(h.nft.commands().slice(-1), ['delete element s_svc_web_tcp443_4 ["192.0.2.2"]']);
    type Status = {
      services: { names: { A: { addresses: string[]; dropped: unknown[] } }[] }[];
    };
    const a = ((await h.daemon.status()) as Status).services[0]?.names[0]?.A;
    assert.equal(a?.addresses, ["192.0.2.1"]);
    assert.equal(a?.dropped, [{ address: "192.0.2.2", reason: "an address of this host" }]);
    assert.ok(
      h.logs.some((l) => l.code === "ERR_EGRESS_ADDRESS_REFUSED" && l.address === "192.0.2.2"),
      "logged with the reason",
    );
  } finally {
    await h.done();
  }
});

test("kernel changes never overlap: reload, refresh, audit and learned addresses run one at a time", async () => {
  const h = await harness(FAST);
  try {
    await h.service({
      name: "svc-web",
      user: 2001,
      outbound: [
        { host: "*.example.test", ports: "443" },
        { host: "api.example.test", ports: "443" },
      ],
    });
    h.resolver.answers.set("api.example.test", { 4: ["192.0.2.1"] });
    await started(h);
    h.nft.live = listing(
      parseLive(null, "egressd") ?? {
        family: "inet",
        table: "egressd",
        counters: [],
        sets: [],
        chains: [],
      },
      h.clock.now,
    );
    h.nft.hold();
    const jobs = [
      h.daemon.reload(),
      h.daemon.refresh(),
      h.daemon.allowLearned("svc-web", "a.example.test", ["192.0.2.50"], 60),
      h.daemon.audit(true),
      h.daemon.allowLearned("svc-web", "b.example.test", ["192.0.2.51"], 60),
    ];
    await settle();
    h.nft.release();
    await Promise.allSettled(jobs);
    assert.is(h.nft.maxInFlight, 1, "never two transactions at once");
  } finally {
    await h.done();
  }
});

test("the audit reports an element the kernel holds and the policy does not, and repairs it by deleting it alone", async () => {
  const h = await harness(FAST);
  try {
    await h.service({
      name: "svc-web",
      user: 2001,
      outbound: [{ host: "198.51.100.1", ports: "443" }],
    });
    await started(h);
    const applied = appliedBy(h);
    const tampered = structuredClone(applied);
    tampered.sets
      .find((s) => s.name === "s_svc_web_lit4")
      ?.elem.push({ concat: ["203.0.113.66", "tcp", 22] });
    h.nft.live = listing(tampered, h.clock.now);
    const r = await h.daemon.audit(true);
    const extra = r.findings.find((f) => f.kind === "element-extra");
    assert.ok(extra, JSON.stringify(r.findings));
    assert.is(extra?.opens, true);
    assert.match(extra?.found ?? "", "203.0.113.66 . tcp . 22");
    assert.equal(h.nft.commands().slice(-1), [
      'delete element s_svc_web_lit4 [{"concat":["203.0.113.66","tcp",22]}]',
    ]);
  } finally {
    await h.done();
  }
});

test("queries arriving while a proxy transaction is in flight join the next one: two transactions for ten answers", async () => {
  const h = await harness(FAST);
  try {
    await h.service({
      name: "svc-web",
      user: 2001,
      outbound: [{ host: "*.cdn.example.test", ports: "443" }],
    });
    await started(h);
    assert.ok(h.proxies.port("svc-web"), "its proxy listens");
    const before = h.nft.batches.length;
    h.nft.hold();
    const first = h.daemon.allowLearned("svc-web", "n0.cdn.example.test", ["198.51.100.10"], 60);
    await until(() => h.nft.inFlight > 0, "the first transaction is in flight");
    const rest = Array.from({ length: 9 }, (_, i) =>
      h.daemon.allowLearned("svc-web", `n${i + 1}.cdn.example.test`, [`198.51.100.${11 + i}`], 60),
    );
    await settle();
    h.nft.release();
    await Promise.all([first, ...rest]);
    assert.is(h.nft.batches.length, before + 2);
    const last = JSON.stringify(h.nft.batches.at(-1));
    for (let i = 11; i <= 19; i++) assert.match(last, `198.51.100.${i}`);
    // The same address again while its element lives: answered at once, nothing sent.
    await h.daemon.allowLearned("svc-web", "n0.cdn.example.test", ["198.51.100.10"], 60);
    assert.is(h.nft.batches.length, before + 2);
  } finally {
    await h.done();
  }
});

test("proxy ports: one per service, distinct, a busy port skipped by every service, placed in one pass", async () => {
  const h = await harness({ ...FAST, dns: { proxyPortRange: "20000-20999" } });
  try {
    for (let i = 0; i < 300; i++)
      await h.service({ name: `svc-${i}`, user: 10_000 + i, dns: "proxy", outbound: [] });
    for (const p of [20000, 20001, 20005]) h.proxies.busy.add(p);
    await started(h);
    const ports = [...h.proxies.listening.values()].map((l) => l.port);
    assert.is(ports.length, 300);
    assert.is(new Set(ports).size, 300, "distinct");
    for (const p of [20000, 20001, 20005]) assert.not.ok(ports.includes(p), `busy ${p} skipped`);
    // Each busy port is tried once, not once per service.
    assert.is(h.proxies.attempts, 303);
  } finally {
    await h.done();
  }
});

test("a learned address is one element added to its service's set; nothing else in the transaction", async () => {
  const h = await harness(FAST);
  try {
    for (let i = 0; i < 50; i++)
      await h.service({
        name: `svc-${i}`,
        user: 10_000 + i,
        dns: "proxy",
        outbound: [{ host: `*.s${i}.example.test`, ports: "443" }],
      });
    await started(h);
    const before = h.nft.batches.length;
    await h.daemon.allowLearned("svc-7", "a.s7.example.test", ["198.51.100.77"], 60);
    assert.is(h.nft.batches.length, before + 1);
    const commands = (h.nft.batches.at(-1) as { nftables: Record<string, unknown>[] }).nftables;
    assert.is(commands.length, 1, JSON.stringify(commands));
    assert.match(JSON.stringify(commands[0]), '"add":{"element"');
    assert.match(JSON.stringify(commands[0]), '"name":"s_svc_7_tcp443_4"');
    assert.match(JSON.stringify(commands[0]), "198.51.100.77");
  } finally {
    await h.done();
  }
});

test("when the kernel refuses learned addresses, every waiting answer fails (the proxy answers SERVFAIL)", async () => {
  const h = await harness(FAST);
  try {
    await h.service({
      name: "svc-web",
      user: 2001,
      outbound: [{ host: "*.cdn.example.test", ports: "443" }],
    });
    await started(h);
    h.nft.fail = true;
    const r = await Promise.allSettled([
      h.daemon.allowLearned("svc-web", "a.cdn.example.test", ["198.51.100.10"], 60),
      h.daemon.allowLearned("svc-web", "b.cdn.example.test", ["198.51.100.11"], 60),
    ]);
    assert.equal(
      r.map((x) => x.status),
      ["rejected", "rejected"],
    );
  } finally {
    await h.done();
  }
});

test("a control request answers within its deadline and names what is still resolving", async () => {
  const h = await harness({ ...FAST, dns: { queryTimeoutMs: 100 } });
  try {
    await h.service(svcWeb("system"));
    await started(h);
    await h.service({
      name: "svc-web",
      user: 2001,
      dns: "system",
      outbound: [{ host: "slow.example.test", ports: "443" }],
    });
    h.resolver.stall.add("slow.example.test");
    const t0 = Date.now();
    const r = await h.daemon.reload();
    assert.ok(Date.now() - t0 < 5000, "answered");
    assert.equal(r.pending, ["slow.example.test"]);
    assert.is(r.kind, "objects", "the policy change itself is applied");
  } finally {
    await h.done();
  }
});

test("at start the saved state is enforced before any DNS query", async () => {
  const h = await harness(FAST);
  try {
    await h.service({
      name: "svc-web",
      user: 2001,
      dns: "system",
      outbound: [{ host: "api.example.test", ports: "443" }],
    });
    h.resolver.answers.set("api.example.test", { 4: ["192.0.2.1"] });
    await started(h);
    await h.daemon.refresh();
    await h.daemon.stop();
    // A new daemon on the same dirs, a minute later (the name is due), with DNS now failing.
    h.clock.now += sec(61);
    const { Daemon } = await import("../../agent/daemon.ts");
    const deps = (h.daemon as unknown as { deps: ConstructorParameters<typeof Daemon>[0] }).deps;
    h.resolver.answers.clear();
    const calls: string[] = [];
    const again = new Daemon({
      ...deps,
      nft: {
        ...h.nft,
        backend: "nft",
        detail: "fake",
        listTable: async () => null,
        listCounters: h.nft.listCounters.bind(h.nft),
        listSet: h.nft.listSet.bind(h.nft),
        check: h.nft.check.bind(h.nft),
        apply: async (b) => void calls.push(`apply ${JSON.stringify(b).includes("192.0.2.1")}`),
      },
      resolver: () => ({
        resolve: async (n, f) => (calls.push(`dns ${n}/${f}`), h.resolver.resolve(n, f)),
      }),
    });
    try {
      await again.start();
      await settle();
      // Past the 5 ms a due name's timer would wait: no timer runs before begin().
      await new Promise((r) => setTimeout(r, 50));
      assert.is(calls[0], "apply true", calls.join("\n"));
      assert.not.ok(
        calls.some((c) => c.startsWith("dns ")),
        "start() enforces the saved state without asking DNS: " + calls.join(" "),
      );
      again.begin(); // what egressd does after telling systemd it is ready
      // Then DNS (its first query may wait for file reads: a few ticks under load).
      await until(() => calls.some((c) => c.startsWith("dns ")), "then DNS");
    } finally {
      await again.stop();
    }
  } finally {
    await h.done();
  }
});

test("a learning window runs the service in audit mode, and when it ends the daemon enforces it again by itself", async () => {
  const h = await harness(FAST);
  try {
    const end = new Date(h.clock.now + 60).toISOString();
    await h.service({
      name: "svc-web",
      user: 2001,
      dns: "system",
      outbound: [{ host: "192.0.2.1", ports: "443" }],
      learning: { since: new Date(h.clock.now).toISOString(), until: end },
    });
    await started(h);
    const mode = async () =>
      (
        (await h.daemon.status()) as {
          services: { mode: string; learning?: { active: boolean } }[];
        }
      ).services[0];
    assert.is((await mode())?.mode, "audit", "learning: audit mode");
    assert.is((await mode())?.learning?.active, true);
    const batches = h.nft.batches.length;
    h.clock.now += 200; // the window is over; the daemon's timer fires within ~65 ms
    await until(() => h.logs.some((l) => /learning window over/.test(l.msg)), "window end logged");
    await until(() => h.nft.batches.length > batches, "re-applied");
    assert.is((await mode())?.mode, "enforce", "its written mode again");
    assert.is((await mode())?.learning?.active, false);
  } finally {
    await h.done();
  }
});

test("files edited by hand: a few are applied one by one, many at once are one reload, and nothing twice", async () => {
  const h = await harness(FAST);
  try {
    await h.service({ name: "svc-0", user: 2000, dns: "system", outbound: [] });
    await started(h);
    const write = (i: number) =>
      writeFileSync(
        h.store.serviceFile(`svc-${i}`),
        JSON.stringify({
          name: `svc-${i}`,
          user: 2000 + i,
          dns: "system",
          outbound: [{ host: `192.0.2.${i}`, ports: "443" }],
        }),
      );
    let before = h.nft.batches.length;
    for (let i = 1; i <= 2; i++) write(i);
    await h.daemon.noticeChanges();
    assert.is(h.nft.batches.length - before, 2, "two files: one transaction each");
    before = h.nft.batches.length;
    for (let i = 3; i <= 40; i++) write(i);
    await h.daemon.noticeChanges();
    assert.is(h.nft.batches.length - before, 1, "38 files: one reload, one transaction");
    assert.ok(h.logs.some((l) => l.msg === "38 policy file(s) changed on disk"));
    assert.is(((await h.daemon.status()) as { services: unknown[] }).services.length, 41);
    before = h.nft.batches.length;
    const logged = h.logs.length;
    await h.daemon.noticeChanges();
    assert.is(h.nft.batches.length, before, "nothing changed since: nothing applied");
    assert.not.ok(
      h.logs.slice(logged).some((l) => /changed on disk|policy applied/.test(l.msg)),
      "and nothing logged",
    );
  } finally {
    await h.done();
  }
});

const recordListing = (elem: unknown[]) => ({
  nftables: [
    {
      set: {
        family: "inet",
        name: "refused4",
        table: "egressd",
        type: ["uid", "ipv4_addr", "inet_proto", "inet_service"],
        size: 65536,
        flags: ["timeout"],
        timeout: 3600,
        elem,
        stmt: [{ counter: null }],
      },
    },
  ],
});
const recorded = (
  uid: number,
  address: string,
  port: number,
  packets: number,
  expires: number,
) => ({
  elem: {
    val: { concat: [uid, address, "tcp", port] },
    expires,
    counter: { packets, bytes: packets * 60 },
  },
});

test("refused(): the kernel's record by service, with the names the daemon knows each address by", async () => {
  const h = await harness(FAST);
  try {
    await h.service({
      name: "svc-web",
      user: 2001,
      dns: "system",
      outbound: [{ host: "api.example.test", ports: "443" }],
    });
    await h.service({
      name: "svc-db",
      user: 2002,
      outbound: [
        { host: "198.51.100.1", ports: "5432" },
        { host: "*.cdn.example.test", ports: "443" },
      ],
    });
    h.resolver.answers.set("api.example.test", { 4: ["192.0.2.1"] });
    await started(h);
    await h.daemon.refresh();
    // svc-db's DNS proxy learned an address for a name it may look up.
    await h.daemon.allowLearned("svc-db", "a.cdn.example.test", ["203.0.113.9"], 60);
    h.nft.setListings.set(
      "refused4",
      recordListing([
        recorded(2001, "192.0.2.1", 80, 3, 3590),
        recorded(2002, "203.0.113.9", 80, 40, 3000),
        recorded(4242, "203.0.113.10", 443, 99, 3000),
      ]),
    );
    h.nft.setListings.set("refused6", null);
    const all = await h.daemon.refused();
    assert.equal(
      all.map((e) => [
        e.service,
        `${e.address}:${e.port}/${e.protocol}`,
        e.packets,
        e.lastSeenSeconds,
        e.names,
      ]),
      [
        ["svc-db", "203.0.113.9:80/tcp", 40, 600, ["a.cdn.example.test"]],
        ["svc-web", "192.0.2.1:80/tcp", 3, 10, ["api.example.test"]],
      ],
      "most packets first; a uid no service has is left out",
    );
    assert.equal(
      (await h.daemon.refused("svc-web")).map((e) => e.address),
      ["192.0.2.1"],
    );
    const err = await h.daemon.refused("svc-nope").catch((e: unknown) => e);
    assert.match(String((err as Error).message), 'service "svc-nope" is not registered');
  } finally {
    await h.done();
  }
});

test("refused(): with the record off the table has no record sets and the answer is empty", async () => {
  const h = await harness({ ...FAST, refused: { size: 0 } });
  try {
    await h.service({
      name: "svc-db",
      user: 2002,
      outbound: [{ host: "198.51.100.1", ports: "5432" }],
    });
    await started(h);
    assert.ok(!JSON.stringify(h.nft.batches).includes("refused"));
    h.nft.setListings.set(
      "refused4",
      recordListing([recorded(2002, "203.0.113.9", 443, 40, 3000)]),
    );
    assert.equal(await h.daemon.refused(), []);
  } finally {
    await h.done();
  }
});

test("memory: one copy of the table; the applied table is made of the services' compiled parts, and a change to one service leaves the others' objects as they were", async () => {
  const h = await harness(FAST);
  type Parts = { sets: object[]; chains: object[] };
  type Inside = {
    applied: { sets: object[]; chains: object[] } | null;
    parts: Map<string, { parts: Parts }>;
  };
  const inside = () => h.daemon as unknown as Inside;
  const shared = (svc: string) => {
    const { applied, parts } = inside();
    const p = parts.get(svc)?.parts;
    assert.ok(applied && p, `${svc} compiled and applied`);
    // Identity, not equality: a copy of the table (structuredClone, JSON round trip) fails here.
    for (const s of p.sets) assert.ok(applied.sets.includes(s), `${svc}: a set is its own copy`);
    for (const c of p.chains)
      assert.ok(applied.chains.includes(c), `${svc}: a chain is its own copy`);
    return p;
  };
  try {
    for (const [name, user] of [
      ["svc-a", 2001],
      ["svc-b", 2002],
    ] as const) {
      await h.service({
        name,
        user,
        dns: "system",
        outbound: [
          { host: "api.example.test", ports: "443" },
          { host: "192.0.2.9", ports: "5432" },
        ],
      });
    }
    h.resolver.answers.set("api.example.test", { 4: ["192.0.2.1"], ttl: 30 });
    await started(h);
    // No batch or JSON text stays behind: no string in the daemon is longer than a digest or a
    // name, right after the whole table was sent (several kilobytes).
    const sent = Math.max(...h.nft.batches.map((b) => JSON.stringify(b).length));
    assert.ok(sent > 1000, `the full batch is ${sent} characters`);
    const seen = new Set<unknown>();
    const longest = (v: unknown, depth: number): number => {
      if (typeof v === "string") return v.length;
      if (!v || typeof v !== "object" || seen.has(v) || depth > 12) return 0;
      seen.add(v);
      if (v === h.nft || v === h.resolver) return 0; // the fakes record what they were sent
      const values = v instanceof Map ? [...v.keys(), ...v.values()] : Object.values(v);
      return Math.max(0, ...values.map((x) => longest(x, depth + 1)));
    };
    assert.ok(longest(h.daemon, 0) < 300, "no batch or JSON text is kept");
    await h.daemon.refresh();
    shared("svc-a");
    const b = shared("svc-b");

    await h.service({
      name: "svc-a",
      user: 2001,
      dns: "system",
      outbound: [{ host: "192.0.2.10", ports: "80" }],
    });
    await h.daemon.applyService("svc-a");
    assert.is(inside().parts.get("svc-b")?.parts, b, "svc-b's parts are the same objects");
    shared("svc-a");
    shared("svc-b");
  } finally {
    await h.done();
  }
});

test("a change the kernel refuses is not reported, and no later refresh applies it: status and the generation stay on the policy the kernel holds", async () => {
  const h = await harness(FAST);
  type Status = { services: { name: string; outbound: number }[]; daemon: { lastError: unknown } };
  const outbound = async () =>
    ((await h.daemon.status()) as Status).services.map((s) => [s.name, s.outbound]);
  try {
    await h.service({
      name: "svc-web",
      user: 2001,
      dns: "system",
      outbound: [{ host: "192.0.2.1", ports: "443" }],
    });
    await started(h);
    assert.equal(await outbound(), [["svc-web", 1]]);
    const generation = h.daemon.generation;
    const sent = h.nft.batches.length;

    // The file changes; the kernel refuses the transaction (and the retry from a fresh listing).
    await h.service({
      name: "svc-web",
      user: 2001,
      dns: "system",
      outbound: [
        { host: "192.0.2.1", ports: "443" },
        { host: "198.51.100.7", ports: "443" },
      ],
    });
    h.nft.fail = true;
    const refused = await h.daemon.applyService("svc-web").then(
      () => null,
      (e: Error) => e.message,
    );
    assert.match(String(refused), /fake nft refuses/);
    assert.equal(await outbound(), [["svc-web", 1]], "status shows what the kernel holds");
    assert.is(h.daemon.generation, generation, "no new generation for a policy not applied");
    assert.is(h.nft.batches.length, sent, "nothing reached the kernel");

    // The kernel works again: the next commit (a refresh) does not apply the refused policy
    // behind the operator's back.
    h.nft.fail = false;
    await h.daemon.refresh();
    assert.not.ok(
      h.nft.commands().some((c) => c.includes("198.51.100.7")),
      "the refused change stays out of the kernel",
    );
    assert.equal(await outbound(), [["svc-web", 1]]);

    // Applied again, the kernel takes it: now status and the generation move.
    await h.daemon.applyService("svc-web");
    assert.equal(await outbound(), [["svc-web", 2]]);
    assert.is(h.daemon.generation, generation + 1);
    assert.ok(
      h.nft.commands().some((c) => c.includes("198.51.100.7")),
      "the new address went to the kernel",
    );
  } finally {
    await h.done();
  }
});

/**
 * svc-web allowing each name (one A record, TTL 1 s), resolved and applied, with the refresh
 * timer running (as in egressd after begin()).
 */
async function refreshing(names: Record<string, string>): Promise<Harness> {
  const h = await harness({ ...FAST, dns: { queryTimeoutMs: 100 } });
  await h.service({
    name: "svc-web",
    user: 2001,
    dns: "system",
    outbound: Object.keys(names).map((host) => ({ host, ports: "443" })),
  });
  for (const [name, address] of Object.entries(names))
    h.resolver.answers.set(name, { 4: [address], ttl: 1 });
  await started(h);
  await h.daemon.refresh();
  h.daemon.begin();
  await settle();
  return h;
}

test("a stalled lookup holds back no other name: a refresh applies the answers that came back, the stalled one when it ends", async () => {
  const h = await refreshing({ "api.example.test": "192.0.2.1", "slow.example.test": "192.0.2.9" });
  try {
    // Both names fall due together; one of them now stalls (its resolver never answers).
    h.resolver.stall.add("slow.example.test");
    h.resolver.answers.set("api.example.test", { 4: ["192.0.2.2"], ttl: 1 });
    h.clock.now += sec(2);
    const before = h.nft.batches.length;
    let hang: NodeJS.Timeout | undefined;
    const ended = await Promise.race([
      h.daemon.housekeep().then(() => true),
      new Promise<boolean>((r) => (hang = setTimeout(() => r(false), 5000))),
    ]);
    clearTimeout(hang);
    assert.ok(ended, "the refresh ended though a lookup is still running");
    assert.ok(
      h.nft
        .commands()
        .slice(before)
        .some((c) => c.includes("192.0.2.2")),
      "the answer that came back is in the kernel while the other lookup is still running",
    );
    const calls = h.resolver.calls.length;
    // The stalled lookup is not asked again while it runs, and does not spin the timer.
    const d = h.daemon as unknown as { refreshDue: () => Promise<void> };
    const refreshDue = d.refreshDue.bind(h.daemon);
    let wakes = 0;
    d.refreshDue = () => (wakes++, refreshDue());
    await new Promise((r) => setTimeout(r, 300));
    assert.is(h.resolver.calls.length, calls, "no lookup asked twice while it runs");
    assert.ok(wakes <= 1, `the refresh timer woke ${wakes} times in 300 ms`);
  } finally {
    await h.done();
  }
});

test("status warns when the host's name service would route a DNS-aware service's lookups around its proxy, and only then", async () => {
  const h = await harness(FAST);
  try {
    await h.service(svcWeb("system"));
    await started(h);
    const warnings = async () =>
      ((await h.daemon.status()) as { daemon: { warnings: string[] } }).daemon.warnings;
    const fedora = "hosts: files myhostname resolve [!UNAVAIL=return] dns\n";
    h.nameService = { nsswitch: fedora, nscdRunning: false };
    assert.equal(await warnings(), [], "no DNS-aware service: nothing to bypass");

    await h.service(svcWeb("proxy"));
    await h.daemon.applyService("svc-web");
    const [w, ...rest] = await warnings();
    assert.match(w ?? "", "systemd-resolved");
    assert.equal(rest, []);
    h.nameService = { nsswitch: "hosts: files dns\n", nscdRunning: true };
    assert.match((await warnings()).join("\n"), "nscd is running");
    h.nameService = { nsswitch: "hosts: files dns\n", nscdRunning: false };
    assert.equal(await warnings(), [], "Debian's default");
    h.nameService = null;
    assert.equal(await warnings(), [], "no nsswitch.conf: nothing to warn about, no error");
  } finally {
    await h.done();
  }
});

test("nothing reaches the kernel after stop(): a lookup that ends after it is not applied", async () => {
  const h = await refreshing({ "slow.example.test": "192.0.2.9" });
  try {
    h.resolver.stall.add("slow.example.test");
    h.resolver.answers.set("slow.example.test", { 4: ["192.0.2.10"], ttl: 1 });
    h.clock.now += sec(2);
    await h.daemon.housekeep(); // the refresh gives up waiting; the lookup still runs
    await h.daemon.stop();
    const batches = h.nft.batches.length;
    h.resolver.release("slow.example.test");
    await settle();
    await new Promise((r) => setTimeout(r, 50));
    assert.is(h.nft.batches.length, batches, "no transaction after stop()");
    assert.not.ok(
      h.nft.commands().some((c) => c.includes("192.0.2.10")),
      "the late answer is not applied",
    );
  } finally {
    await h.done();
  }
});

test("answers recorded while a refresh waits for a stalled lookup are not drift: the audit compares the kernel with what egressd applied", async () => {
  const h = await refreshing({ "api.example.test": "192.0.2.1", "slow.example.test": "192.0.2.9" });
  try {
    // The kernel holds what egressd applied.
    h.nft.live = listing(appliedBy(h), h.clock.now);
    h.resolver.stall.add("slow.example.test");
    h.resolver.answers.set("api.example.test", { 4: ["192.0.2.2"], ttl: 1 });
    h.clock.now += sec(2);
    const refresh = h.daemon.housekeep(); // records api's answer, waits for slow's up to 250 ms
    await settle();
    const record = await h.daemon.audit(true);
    assert.equal(record.findings, [], "a change on its way is not drift");
    assert.not.ok(
      h.nft.commands().some((c) => c.includes("192.0.2.2")),
      "the audit did not apply it either",
    );
    await refresh;
    assert.ok(
      h.nft.commands().some((c) => c.includes("192.0.2.2")),
      "the refresh's own commit applies it",
    );
    h.resolver.release("slow.example.test");
  } finally {
    await h.done();
  }
});

test.run();
