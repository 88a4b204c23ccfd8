import { suite } from "uvu";
import * as assert from "uvu/assert";
import { LearnedTable } from "../../agent/dns/learned.ts";
import type { RefreshSettings } from "../../agent/dns/names.ts";
import { NameMatcher } from "../../rules/name-match.ts";

const test = suite("what a service's DNS proxy learned (injected clock)");

const S: RefreshSettings = {
  minTtlSeconds: 30,
  maxTtlSeconds: 3600,
  graceSeconds: 300,
  maxAddressesPerName: 3,
  allowPrivateAddresses: true,
};
const T0 = 1_700_000_000_000;
const sec = (n: number) => n * 1000;
const N = "a.cdn.example.test";

test("an answer's addresses live for the clamped TTL plus grace; a later answer extends them", () => {
  const t = new LearnedTable(S);
  t.learn("svc", N, ["192.0.2.1"], 5, T0);
  assert.equal([...(t.of("svc", T0).get(N) ?? [])], [["192.0.2.1", T0 + sec(30 + 300)]]);
  t.learn("svc", N, ["192.0.2.1"], 60, T0 + sec(10));
  assert.is(t.of("svc", T0).get(N)?.get("192.0.2.1"), T0 + sec(10 + 60 + 300));
  assert.equal(t.of("svc", T0 + sec(371)).size, 0, "gone once expired");
  assert.is(t.nextExpiry(T0), T0 + sec(370));
});

test("the per-name cap evicts the oldest answered first, never one answered within the grace period", () => {
  const t = new LearnedTable(S);
  for (let i = 1; i <= 3; i++) t.learn("svc", N, [`192.0.2.${i}`], 60, T0 + sec(i));
  // Within the grace period of all three: a fourth is kept too (the cap waits).
  t.learn("svc", N, ["192.0.2.4"], 60, T0 + sec(4));
  assert.is(t.of("svc", T0 + sec(5)).get(N)?.size, 4);
  // Much later, .2 and .3 were answered again; .1 and .4 are old: the oldest (.1) goes first.
  const later = T0 + sec(1000);
  t.learn("svc", N, ["192.0.2.2", "192.0.2.3"], 600, later);
  t.learn("svc", N, ["192.0.2.5"], 600, later + 1);
  assert.equal([...(t.of("svc", later).get(N)?.keys() ?? [])].sort(), [
    "192.0.2.2",
    "192.0.2.3",
    "192.0.2.5",
  ]);
});

test("revoked names and unregistered services are forgotten; a narrower filter prunes at once", () => {
  const t = new LearnedTable(S);
  t.learn("svc", N, ["192.0.2.1", "10.0.0.1"], 60, T0);
  t.learn("svc", "old.example.test", ["192.0.2.9"], 60, T0);
  t.learn("gone", N, ["192.0.2.1"], 60, T0);
  t.retain(new Map([["svc", new NameMatcher([{ kind: "wildcard", suffix: "cdn.example.test" }])]]));
  assert.equal([...t.all(T0).keys()], ["svc"]);
  assert.equal([...t.of("svc", T0).keys()], [N]);
  const pruned = t.configure({ ...S, allowPrivateAddresses: false });
  assert.equal(
    pruned.map((p) => p.address),
    ["10.0.0.1"],
  );
  assert.equal([...(t.of("svc", T0).get(N)?.keys() ?? [])], ["192.0.2.1"]);
});

test("saved learning is filtered like a fresh answer: names the service may not ask, refused addresses, far expiries are left out", () => {
  const matchers = new Map([
    ["svc", new NameMatcher([{ kind: "wildcard", suffix: "cdn.example.test" }])],
  ]);
  const { table, problems } = LearnedTable.fromJSON(
    {
      svc: {
        [N]: {
          "192.0.2.1": [T0 + sec(60), T0],
          "127.0.0.1": [T0 + sec(60), T0],
          "192.0.2.2": [T0 + sec(86_400 * 365), T0],
          "192.0.2.3": [T0 - 1, T0 - sec(400)],
        },
        "evil.example.test": { "192.0.2.4": [T0 + sec(60), T0] },
        "@s_svc_tcp443_4": { "192.0.2.5": [T0 + sec(60), 0] },
        "@s_other_tcp443_4": { "192.0.2.6": [T0 + sec(60), 0] },
      },
      ghost: { [N]: { "192.0.2.7": [T0 + sec(60), T0] } },
    },
    S,
    { matchers, sets: () => new Set(["s_svc_tcp443_4"]), now: T0, file: "state.json" },
  );
  assert.equal([...(table.of("svc", T0).get(N)?.keys() ?? [])], ["192.0.2.1"]);
  assert.equal(
    [...(table.adoptedOf("svc", T0).get("s_svc_tcp443_4")?.keys() ?? [])],
    ["192.0.2.5"],
  );
  const text = problems.map((p) => `${p.where}: ${p.text}`).join("\n");
  for (const f of [
    "127.0.0.1: loopback",
    "192.0.2.2 expires",
    "svc may not look up evil.example.test",
    "s_other_tcp443_4 is not a name set of svc",
    'learned["ghost"]: not a DNS-aware service',
  ])
    assert.match(text, f);
});

test.run();
