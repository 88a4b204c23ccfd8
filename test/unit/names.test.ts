import { suite } from "uvu";
import * as assert from "uvu/assert";
import type { Resolution } from "../../agent/dns/dns.client.ts";
import { backoffSeconds, NameTable, type RefreshSettings } from "../../agent/dns/names.ts";

const test = suite("DNS bookkeeping: per-family TTL, grace, fail-static, backoff (injected clock)");

const S: RefreshSettings = {
  minTtlSeconds: 30,
  maxTtlSeconds: 3600,
  graceSeconds: 300,
  maxAddressesPerName: 64,
  allowPrivateAddresses: true,
};
const ok = (addresses: string[], ttl = 60): Resolution => ({
  ok: true,
  answer: { addresses, ttl, chain: [] },
});
const fail = (
  code: "SERVFAIL" | "TIMEOUT" | "NXDOMAIN" | "REFUSED" | "UNREACHABLE",
): Resolution => ({ ok: false, code, message: code });
const sec = (n: number) => n * 1000;
const T0 = 1_700_000_000_000;
const N = "api.example.test";

function table(settings = S) {
  const t = new NameTable(settings);
  t.track([N], T0);
  return t;
}

test("a new name is due at once for both families; after an answer each is due when its TTL runs out", () => {
  const t = table();
  assert.equal(t.dueForRefresh(T0), [
    { name: N, family: 4 },
    { name: N, family: 6 },
  ]);
  t.observe(N, 4, ok(["192.0.2.1"], 120), T0);
  t.observe(N, 6, ok(["2001:db8::1"], 600), T0);
  assert.equal(t.dueForRefresh(T0 + sec(119)), []);
  assert.equal(t.dueForRefresh(T0 + sec(120)), [{ name: N, family: 4 }]);
  assert.equal(t.dueForRefresh(T0 + sec(600)).length, 2);
});

test("TTLs are clamped to minTtlSeconds..maxTtlSeconds", () => {
  const t = table();
  t.observe(N, 4, ok(["192.0.2.1"], 1), T0);
  assert.is(t.get(N)?.[4].nextRefresh, T0 + sec(30));
  t.observe(N, 4, ok(["192.0.2.1"], 86_400), T0);
  assert.is(t.get(N)?.[4].nextRefresh, T0 + sec(3600));
});

test("a name whose AAAA query fails still gets its A addresses, and the other way round", () => {
  for (const code of ["REFUSED", "SERVFAIL", "TIMEOUT"] as const) {
    const t = table();
    t.observe(N, 4, ok(["192.0.2.1"]), T0);
    t.observe(N, 6, fail(code), T0);
    assert.equal(t.allowed(N, T0), ["192.0.2.1"], code);
    assert.is(t.get(N)?.[6].lastError?.code, code);
    assert.is(t.get(N)?.[4].lastError, null, "the A family is healthy");
  }
  const t = table();
  t.observe(N, 6, ok(["2001:db8::1"]), T0);
  t.observe(N, 4, fail("TIMEOUT"), T0);
  assert.equal(t.allowed(N, T0), ["2001:db8::1"]);
});

test("a failing family keeps its own last-known addresses while the other one rotates", () => {
  const t = table();
  t.observe(N, 4, ok(["192.0.2.1"]), T0);
  t.observe(N, 6, ok(["2001:db8::1"]), T0);
  for (let i = 1; i <= 10; i++) {
    t.observe(N, 6, fail("SERVFAIL"), T0 + sec(3600 * i));
    t.observe(N, 4, ok([`192.0.2.${i + 1}`], 60), T0 + sec(3600 * i));
  }
  const later = T0 + sec(3600 * 10 + 1);
  // 192.0.2.10 left the answer a second ago: in grace.
  assert.equal(t.allowed(N, later), ["192.0.2.10", "192.0.2.11", "2001:db8::1"]);
  assert.is(t.get(N)?.[6].failures, 10);
});

test("an address no longer returned stays allowed for its TTL plus the grace period, then goes", () => {
  const t = table();
  t.observe(N, 6, ok(["2001:db8::1"], 600), T0);
  t.observe(N, 4, ok(["192.0.2.1"], 60), T0);
  t.observe(N, 4, ok(["192.0.2.2"], 60), T0 + sec(60));
  // 192.0.2.1 was last returned at T0 with TTL 60: allowed until T0 + 60 s + 300 s.
  assert.equal(t.allowed(N, T0 + sec(359)), ["192.0.2.1", "192.0.2.2", "2001:db8::1"]);
  assert.equal(t.allowed(N, T0 + sec(360)), ["192.0.2.2", "2001:db8::1"]);
  assert.is(t.nextEvent(T0 + sec(61)), T0 + sec(120), "the next refresh comes before the expiry");
});

test("after an outage, an address held only because of it gets its grace from the recovery", () => {
  const t = table();
  t.observe(N, 4, ok(["192.0.2.1"], 60), T0);
  // DNS fails for an hour: 192.0.2.1 is held (fail-static) long past TTL + grace.
  for (let i = 1; i <= 6; i++) t.observe(N, 4, fail("TIMEOUT"), T0 + sec(600 * i));
  const recovery = T0 + sec(3600);
  t.observe(N, 4, ok(["192.0.2.2"], 60), recovery);
  assert.equal(
    t.allowed(N, recovery + sec(299)),
    ["192.0.2.1", "192.0.2.2"],
    "not cut the moment DNS returns",
  );
  assert.equal(t.allowed(N, recovery + sec(300)), ["192.0.2.2"]);
});

test("the expiry of an old address is an event the daemon wakes for", () => {
  const t = new NameTable({ ...S, maxTtlSeconds: 100_000 });
  t.track([N], T0);
  t.observe(N, 6, ok([], 0), T0);
  t.observe(N, 4, ok(["192.0.2.1"], 60), T0);
  t.observe(N, 6, ok([], 0), T0 + sec(10));
  t.observe(N, 4, ok(["192.0.2.2"], 10_000), T0 + sec(10));
  assert.is(t.nextEvent(T0 + sec(10)), T0 + sec(40), "the AAAA refresh (NODATA: the floor)");
  t.observe(N, 6, ok([], 0), T0 + sec(40));
  assert.is(t.nextEvent(T0 + sec(40)), T0 + sec(70));
  t.observe(N, 6, ok([], 0), T0 + sec(70));
  t.observe(N, 6, ok([], 0), T0 + sec(100));
  assert.ok((t.nextEvent(T0 + sec(100)) ?? 0) <= T0 + sec(360), "the expiry of 192.0.2.1 counts");
});

test("DNS failures keep the last-known addresses however long they last (fail-static)", () => {
  const t = table();
  t.observe(N, 4, ok(["192.0.2.1"], 60), T0);
  t.observe(N, 6, ok(["2001:db8::1"], 60), T0);
  for (let i = 1; i <= 20; i++) {
    t.observe(N, 4, fail(i % 2 ? "TIMEOUT" : "SERVFAIL"), T0 + sec(3600 * i));
    t.observe(N, 6, fail("UNREACHABLE"), T0 + sec(3600 * i));
  }
  assert.equal(t.allowed(N, T0 + sec(3600 * 21)), ["192.0.2.1", "2001:db8::1"]);
  assert.is(t.get(N)?.[4].failures, 20);
  assert.is(t.get(N)?.[4].lastError?.code, "SERVFAIL", "the last of them");
});

test("retries after failures back off: doubling from the TTL floor, capped", () => {
  const s = { ...S, minTtlSeconds: 5 };
  assert.equal(
    [1, 2, 3, 4, 5, 6, 7, 8, 9].map((n) => backoffSeconds(n, s)),
    [5, 10, 20, 40, 80, 160, 300, 300, 300],
  );
  const t = table(s);
  t.observe(N, 4, fail("SERVFAIL"), T0);
  t.observe(N, 4, fail("SERVFAIL"), T0 + sec(5));
  assert.is(t.get(N)?.[4].nextRefresh, T0 + sec(15));
  t.observe(N, 4, ok(["192.0.2.1"], 60), T0 + sec(15));
  assert.is(t.get(N)?.[4].failures, 0, "a success resets the backoff");
});

test("NXDOMAIN drops the name's addresses after the grace period, not before", () => {
  const t = table();
  t.observe(N, 4, ok(["192.0.2.1"], 60), T0);
  t.observe(N, 4, fail("NXDOMAIN"), T0 + sec(60));
  assert.equal(t.allowed(N, T0 + sec(359)), ["192.0.2.1"]);
  assert.equal(t.allowed(N, T0 + sec(360)), []);
});

test("forbidden and surplus addresses never enter the table", () => {
  const t = table({ ...S, maxAddressesPerName: 2, allowPrivateAddresses: false });
  t.observe(N, 4, ok(["169.254.169.254", "10.0.0.1", "192.0.2.3", "192.0.2.1", "192.0.2.2"]), T0);
  assert.equal(t.allowed(N, T0), ["192.0.2.1", "192.0.2.2"]);
  assert.equal(
    t.get(N)?.[4].dropped.map((d) => d.reason),
    [
      "cloud metadata",
      "private, and refresh.allowPrivateAddresses is false",
      "over maxAddressesPerName (2)",
    ],
  );
});

test("a narrower config prunes what is held at once: private addresses, a lower cap, the host's own", () => {
  const t = table();
  t.observe(N, 4, ok(["10.0.0.1", "192.0.2.1", "192.0.2.2", "192.0.2.3"], 60), T0);
  t.observe(N, 4, ok(["192.0.2.3", "192.0.2.4"], 60), T0 + sec(60)); // the others are in grace now
  const pruned = t.configure(
    { ...S, allowPrivateAddresses: false, maxAddressesPerName: 1 },
    { hostAddresses: new Set(["192.0.2.2"]) },
  );
  assert.equal(t.allowed(N, T0 + sec(61)), ["192.0.2.1", "192.0.2.3"]);
  assert.equal(pruned.map((p) => [p.name, p.address]).sort(), [
    [N, "10.0.0.1"],
    [N, "192.0.2.2"],
    [N, "192.0.2.4"],
  ]);
});

test("names no service allows any more are forgotten; new ones start due", () => {
  const t = table();
  t.observe(N, 4, ok(["192.0.2.1"]), T0);
  assert.equal(t.track(["b.example.test"], T0 + 1), {
    added: ["b.example.test"],
    removed: [N],
  });
  assert.equal(t.allowed(N, T0 + 1), []);
  assert.equal(
    t.dueForRefresh(T0 + 1).map((l) => l.name),
    ["b.example.test", "b.example.test"],
  );
});

const restore = (data: unknown, names = [N], now = T0, settings = S) =>
  NameTable.fromJSON(data, settings, { names, now, file: "/var/lib/egressd/state.json" });

test("saved state restores the last-known addresses, so a restart enforces before asking DNS", () => {
  const t = table();
  t.observe(N, 4, ok(["192.0.2.1"], 60), T0);
  t.observe(N, 6, ok(["2001:db8::1"], 60), T0);
  const { table: restored, problems } = restore(JSON.parse(JSON.stringify(t.toJSON())));
  assert.equal(problems, []);
  // Days later, with DNS unreachable, the current answer is still what is enforced.
  assert.equal(restored.allowed(N, T0 + sec(86_400 * 3)), ["192.0.2.1", "2001:db8::1"]);
  assert.is(restored.dueForRefresh(T0 + sec(86_400)).length, 2);
});

test("saved state is a cache: networks, forbidden addresses, unknown names and far expiries are left out and named", () => {
  const now = T0;
  const { table: t, problems } = restore(
    {
      [N]: {
        4: {
          current: ["0.0.0.0/0", "127.0.0.1", "169.254.169.254", "192.0.2.1", "2001:db8::9"],
          until: { "192.0.2.7": now + sec(86_400 * 365 * 5), "192.0.2.8": now + sec(100) },
          nextRefresh: now + sec(86_400 * 365),
        },
        6: { current: ["::1", "2001:db8::1"], until: {} },
      },
      "evil.example.test": { 4: { current: ["192.0.2.66"], until: {} } },
    },
    [N],
    now,
  );
  assert.equal(t.allowed(N, now), ["192.0.2.1", "192.0.2.8", "2001:db8::1"]);
  assert.ok(
    (t.get(N)?.[4].nextRefresh ?? Infinity) <= now + sec(S.maxTtlSeconds),
    "never refreshed later than one maximal TTL from now",
  );
  const texts = problems.map((p) => `${p.where}: ${p.text}`);
  for (const expected of [
    `names["evil.example.test"]: not a name any service allows`,
    `[A]: "0.0.0.0/0" is a network, not an address`,
    `[A]: 127.0.0.1: loopback`,
    `[A]: 169.254.169.254: cloud metadata`,
    `[A]: 2001:db8::9 is not an IPv4 address`,
    `[A]: 192.0.2.7 expires`,
    `[AAAA]: ::1: loopback`,
  ])
    assert.ok(
      texts.some((t) => t.includes(expected)),
      `${expected} in:\n${texts.join("\n")}`,
    );
  assert.ok(
    texts.every((t) => t.startsWith("/var/lib/egressd/state.json: ")),
    "names the file",
  );
});

test("older state files (one list per name) are read by family; garbage is ignored", () => {
  const { table: t } = restore({
    [N]: { current: ["192.0.2.1", "2001:db8::1"], until: { "192.0.2.1": T0 + sec(60) } },
  });
  assert.equal(t.allowed(N, T0), ["192.0.2.1", "2001:db8::1"]);
  assert.equal(restore({ [N]: { current: "nonsense" } }).table.allowed(N, T0), []);
  assert.equal(restore("nonsense").table.list(), []);
});

test.run();
