/**
 * The Daemon with fake nft, DNS, clock and proxies: what it sends to the kernel, in what order,
 * and what it answers, without a kernel. (System tests prove the real thing in namespaces.)
 */
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { parseLive } from "../../rules/live.ts";
import { harness, listing, type Harness } from "../helpers/fake-daemon.ts";

const test = suite("the daemon, with every effect faked");

const sec = (n: number) => n * 1000;
const FAST = { refresh: { minTtlSeconds: 1, maxTtlSeconds: 60, graceSeconds: 0 } };

async function settle(): Promise<void> {
  for (let i = 0; i < 20; i++) await new Promise((r) => setImmediate(r));
}

async function until(cond: () => boolean, what: string): Promise<void> {
  for (let i = 0; i < 2000 && !cond(); i++) await new Promise((r) => setTimeout(r, 1));
  if (!cond()) throw new Error(`not reached: ${what}`);
}

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
    const applied = (h.daemon as unknown as { applied: import("../../rules/ruleset.ts").Ruleset })
      .applied;
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
    await h.service({
      name: "svc-web",
      user: 2001,
      dns: "system",
      outbound: [{ host: "198.51.100.1", ports: "443" }],
    });
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
      await settle();
      assert.ok(
        calls.some((c) => c.startsWith("dns ")),
        "then DNS",
      );
    } finally {
      await again.stop();
    }
  } finally {
    await h.done();
  }
});

test.run();
