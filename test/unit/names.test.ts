import { suite } from "uvu";
import * as assert from "uvu/assert";
import type { Resolution } from "../../agent/dns/dns.client.ts";
import { backoffSeconds, NameTable, type RefreshSettings } from "../../agent/dns/names.ts";

const test = suite("DNS bookkeeping: TTL, grace, fail-static, backoff (injected clock)");

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

function table(settings = S) {
  const t = new NameTable(settings);
  t.track(["api.example.test"], T0);
  return t;
}

test("a new name is due at once; after an answer it is due again when the TTL runs out", () => {
  const t = table();
  assert.equal(t.dueForRefresh(T0), ["api.example.test"]);
  t.observe("api.example.test", ok(["192.0.2.1"], 120), T0);
  assert.equal(t.dueForRefresh(T0 + sec(119)), []);
  assert.equal(t.dueForRefresh(T0 + sec(120)), ["api.example.test"]);
});

test("TTLs are clamped to minTtlSeconds..maxTtlSeconds", () => {
  const t = table();
  t.observe("api.example.test", ok(["192.0.2.1"], 1), T0);
  assert.is(t.get("api.example.test")?.nextRefresh, T0 + sec(30));
  t.observe("api.example.test", ok(["192.0.2.1"], 86_400), T0);
  assert.is(t.get("api.example.test")?.nextRefresh, T0 + sec(3600));
});

test("an address no longer returned stays allowed for its TTL plus the grace period, then goes", () => {
  const t = table();
  t.observe("api.example.test", ok(["192.0.2.1"], 60), T0);
  const r = t.observe("api.example.test", ok(["192.0.2.2"], 60), T0 + sec(60));
  assert.equal(r.before, ["192.0.2.1"]);
  assert.equal(r.after, ["192.0.2.1", "192.0.2.2"]);
  // 192.0.2.1 was last returned at T0 with TTL 60: allowed until T0 + 60 s + 300 s.
  assert.equal(t.allowed("api.example.test", T0 + sec(359)), ["192.0.2.1", "192.0.2.2"]);
  assert.equal(t.allowed("api.example.test", T0 + sec(360)), ["192.0.2.2"]);
  assert.is(t.nextEvent(T0 + sec(61)), T0 + sec(120), "the next refresh comes before the expiry");
});

test("the expiry of an old address is an event the daemon wakes for", () => {
  const t = new NameTable({ ...S, maxTtlSeconds: 100_000 });
  t.track(["api.example.test"], T0);
  t.observe("api.example.test", ok(["192.0.2.1"], 60), T0);
  t.observe("api.example.test", ok(["192.0.2.2"], 10_000), T0 + sec(10));
  assert.is(t.nextEvent(T0 + sec(10)), T0 + sec(360));
});

test("DNS failures keep the last-known addresses however long they last (fail-static)", () => {
  const t = table();
  t.observe("api.example.test", ok(["192.0.2.1", "2001:db8::1"], 60), T0);
  for (let i = 1; i <= 20; i++)
    t.observe("api.example.test", fail(i % 2 ? "TIMEOUT" : "SERVFAIL"), T0 + sec(3600 * i));
  assert.equal(t.allowed("api.example.test", T0 + sec(3600 * 21)), ["192.0.2.1", "2001:db8::1"]);
  assert.is(t.get("api.example.test")?.failures, 20);
  assert.is(t.get("api.example.test")?.lastError?.code, "SERVFAIL", "the last of them");
});

test("retries after failures back off: doubling from the TTL floor, capped", () => {
  const s = { ...S, minTtlSeconds: 5 };
  assert.equal(
    [1, 2, 3, 4, 5, 6, 7, 8, 9].map((n) => backoffSeconds(n, s)),
    [5, 10, 20, 40, 80, 160, 300, 300, 300],
  );
  const t = table(s);
  t.observe("api.example.test", fail("SERVFAIL"), T0);
  t.observe("api.example.test", fail("SERVFAIL"), T0 + sec(5));
  assert.is(t.get("api.example.test")?.nextRefresh, T0 + sec(15));
  t.observe("api.example.test", ok(["192.0.2.1"], 60), T0 + sec(15));
  assert.is(t.get("api.example.test")?.failures, 0, "a success resets the backoff");
});

test("NXDOMAIN drops the name's addresses after the grace period, not before", () => {
  const t = table();
  t.observe("api.example.test", ok(["192.0.2.1"], 60), T0);
  t.observe("api.example.test", fail("NXDOMAIN"), T0 + sec(60));
  assert.equal(t.allowed("api.example.test", T0 + sec(359)), ["192.0.2.1"]);
  assert.equal(t.allowed("api.example.test", T0 + sec(360)), []);
});

test("forbidden and surplus addresses never enter the table", () => {
  const t = table({ ...S, maxAddressesPerName: 2, allowPrivateAddresses: false });
  t.observe(
    "api.example.test",
    ok(["169.254.169.254", "10.0.0.1", "192.0.2.3", "192.0.2.1", "192.0.2.2"]),
    T0,
  );
  assert.equal(t.allowed("api.example.test", T0), ["192.0.2.1", "192.0.2.2"]);
  assert.equal(
    t.get("api.example.test")?.dropped.map((d) => d.reason),
    ["link-local", "private", "over maxAddressesPerName (2)"],
  );
});

test("names no service allows any more are forgotten; new ones start due", () => {
  const t = table();
  t.observe("api.example.test", ok(["192.0.2.1"]), T0);
  assert.equal(t.track(["b.example.test"], T0 + 1), {
    added: ["b.example.test"],
    removed: ["api.example.test"],
  });
  assert.equal(t.allowed("api.example.test", T0 + 1), []);
  assert.equal(t.dueForRefresh(T0 + 1), ["b.example.test"]);
});

test("saved state restores the last-known addresses, so a restart enforces before asking DNS", () => {
  const t = table();
  t.observe("api.example.test", ok(["192.0.2.1"], 60), T0);
  const restored = NameTable.fromJSON(JSON.parse(JSON.stringify(t.toJSON())), S);
  // Days later, with DNS unreachable, the current answer is still what is enforced.
  assert.equal(restored.allowed("api.example.test", T0 + sec(86_400 * 3)), ["192.0.2.1"]);
  assert.equal(restored.dueForRefresh(T0 + sec(86_400)), ["api.example.test"]);
  assert.equal(NameTable.fromJSON({ "x.example": { current: "nonsense" } }, S).list(), []);
});

test.run();
