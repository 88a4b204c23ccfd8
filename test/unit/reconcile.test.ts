import { suite } from "uvu";
import * as assert from "uvu/assert";
import { compile } from "../../rules/compile.ts";
import { reconcile, type ReconcileOptions } from "../../rules/reconcile.ts";
import type { Command } from "../../rules/batch.ts";
import { tableDigest, type Ruleset, type SetDef } from "../../rules/ruleset.ts";
import { validateBatch } from "../../rules/nft-schema.ts";
import { policy } from "../helpers/builders.ts";

const test = suite("reconcile(applied, desired): the one decision of every kernel change");

const NOW = 1_700_000_000_000;
const O: ReconcileOptions = { now: NOW, slackMs: 10_000, marginMs: 2000 };
const sec = (n: number) => n * 1000;

/** A short text per command: "add element s_svc_a_tcp443_4 [...]", "flush chain s_svc_a". */
function summary(cmds: readonly Command[]): string[] {
  return cmds.map((c) => {
    const [verb, body] = Object.entries(c)[0] as [string, Record<string, Record<string, unknown>>];
    const [kind, o] = Object.entries(body)[0] as [string, Record<string, unknown>];
    const name = String(o.name ?? o.chain ?? "");
    const elem = o.elem ? ` ${JSON.stringify(o.elem)}` : "";
    return `${verb} ${kind} ${name}${kind === "element" ? elem : ""}`.trim();
  });
}

const set = (r: Ruleset, name: string) => r.sets.find((s) => s.name === name) as SetDef;
const withSet = (r: Ruleset, s: SetDef): Ruleset => ({
  ...r,
  sets: r.sets.map((x) => (x.name === s.name ? s : x)),
});

const base = () =>
  compile(
    policy()
      .service("svc-a", 2001)
      .allow("api.example.test:443", "198.51.100.1:22")
      .service("svc-b", 2002)
      .allow("db.example.test:5432")
      .resolve("api.example.test", "192.0.2.1")
      .resolve("db.example.test", "192.0.2.9")
      .build(),
  );

test("nothing applied yet: the whole table, in one transaction that replaces it", () => {
  const r = reconcile(null, base(), O);
  assert.is(r.kind, "replace");
  assert.equal(summary(r.commands).slice(0, 3), [
    "add table egressd",
    "delete table egressd",
    "add table egressd",
  ]);
  validateBatch({ nftables: r.commands });
});

test("the same table: nothing to send", () => {
  const r = reconcile(base(), base(), O);
  assert.is(r.kind, "none");
  assert.equal(r.commands, []);
});

test("a changed answer: one element out, one in, deletes first, nothing else touched", () => {
  const desired = withSet(base(), { ...set(base(), "s_svc_a_tcp443_4"), elem: ["192.0.2.2"] });
  const r = reconcile(base(), desired, O);
  assert.is(r.kind, "elements");
  assert.is(r.changes, 2);
  assert.equal(summary(r.commands), [
    'delete element s_svc_a_tcp443_4 ["192.0.2.1"]',
    'add element s_svc_a_tcp443_4 ["192.0.2.2"]',
  ]);
});

test("a new service: its objects are created, its map elements added after its chains; no other service is touched", () => {
  const before = base();
  const after = compile(
    policy()
      .service("svc-a", 2001)
      .allow("api.example.test:443", "198.51.100.1:22")
      .service("svc-b", 2002)
      .allow("db.example.test:5432")
      .service("svc-c", 2003)
      .allow("203.0.113.7:8443")
      .resolve("api.example.test", "192.0.2.1")
      .resolve("db.example.test", "192.0.2.9")
      .build(),
  );
  const r = reconcile(before, after, O);
  assert.is(r.kind, "objects");
  const s = summary(r.commands);
  assert.ok(
    s.every((c) => !/svc_a|svc_b/.test(c)),
    `nothing of svc-a or svc-b: ${s.join("\n")}`,
  );
  const chainAt = s.indexOf("add chain s_svc_c");
  const mapAt = s.findIndex((c) => c.startsWith("add element uid_dispatch"));
  assert.ok(chainAt >= 0 && mapAt > chainAt, s.join("\n"));
  assert.ok(s.includes("add counter s_svc_c"));
  assert.ok(s.includes("add set s_svc_c_lit4"));
  assert.ok(s.indexOf("add rule s_svc_c") > mapAt, "rules last");
  validateBatch({ nftables: r.commands });
});

test("a removed service: flushed, its map elements deleted before its chains, its counters last", () => {
  const before = base();
  const after = compile(
    policy()
      .service("svc-a", 2001)
      .allow("api.example.test:443", "198.51.100.1:22")
      .resolve("api.example.test", "192.0.2.1")
      .build(),
  );
  const s = summary(reconcile(before, after, O).commands);
  const flush = s.indexOf("flush chain s_svc_b");
  const delSet = s.indexOf("delete set s_svc_b_tcp5432_4");
  const delElem = s.findIndex((c) => c.startsWith("delete element uid_dispatch"));
  const delChain = s.indexOf("delete chain s_svc_b");
  const delCounter = s.indexOf("delete counter s_svc_b");
  assert.ok(flush >= 0 && flush < delSet, s.join("\n"));
  assert.ok(delElem >= 0 && delElem < delChain, "the map lets go of the chain first");
  assert.ok(delChain < delCounter, s.join("\n"));
  assert.ok(
    s.every((c) => !/svc_a/.test(c)),
    "svc-a untouched",
  );
});

test("a service's new rule refills its chain only; a set whose definition changes is re-created with the chains that use it", () => {
  const before = base();
  const a = base();
  const chain = a.chains.find((c) => c.name === "s_svc_a");
  chain?.rules.splice(1, 0, [{ accept: null }]);
  let s = summary(reconcile(before, a, O).commands);
  assert.equal(
    s.filter((c) => c.startsWith("flush")),
    ["flush chain s_svc_a"],
  );
  assert.ok(s.every((c) => !/svc_b/.test(c)));

  const b = withSet(base(), {
    ...set(base(), "s_svc_b_tcp5432_4"),
    flags: ["timeout", "interval"],
  });
  s = summary(reconcile(before, b, O).commands);
  assert.ok(s.indexOf("flush chain s_svc_b") < s.indexOf("delete set s_svc_b_tcp5432_4"));
  assert.ok(s.indexOf("delete set s_svc_b_tcp5432_4") < s.indexOf("add set s_svc_b_tcp5432_4"));
  assert.ok(s.indexOf("add set s_svc_b_tcp5432_4") < s.lastIndexOf("add rule s_svc_b"));
});

test("a base chain whose hook priority changed: the whole table is replaced", () => {
  const before = base();
  const after: Ruleset = {
    ...before,
    chains: before.chains.map((c) =>
      c.name === "output" && c.base ? { ...c, base: { ...c.base, prio: 10 } } : c,
    ),
  };
  assert.is(reconcile(before, after, O).kind, "replace");
});

/** One name set with elements `elem` and expiries `expires`. */
function timed(elem: string[], expires: Record<string, number>): Ruleset {
  const r = base();
  return withSet(r, { ...set(r, "s_svc_a_tcp443_4"), elem, expires });
}

/** [what is applied, what is wanted, the commands for s_svc_a_tcp443_4, wake] */
const TIMED: [string, Ruleset, Ruleset, string[], number | null][] = [
  [
    "a learned address not in the kernel is added with its lifetime in seconds",
    timed([], {}),
    timed(["192.0.2.5"], { "192.0.2.5": NOW + sec(330) - 1 }),
    ['add element s_svc_a_tcp443_4 [{"elem":{"val":"192.0.2.5","timeout":330}}]'],
    null,
  ],
  [
    "a lifetime that grows by less than the slack is left alone",
    timed(["192.0.2.5"], { "192.0.2.5": NOW + sec(300) }),
    timed(["192.0.2.5"], { "192.0.2.5": NOW + sec(305) }),
    [],
    null,
  ],
  [
    "a lifetime that grows by more is extended by delete and add (kernels before 6.12 keep an old expiry on add)",
    timed(["192.0.2.5"], { "192.0.2.5": NOW + sec(100) }),
    timed(["192.0.2.5"], { "192.0.2.5": NOW + sec(330) }),
    [
      'delete element s_svc_a_tcp443_4 ["192.0.2.5"]',
      'add element s_svc_a_tcp443_4 [{"elem":{"val":"192.0.2.5","timeout":330}}]',
    ],
    null,
  ],
  [
    "an element that may expire before the transaction runs is never deleted: add only, and look again after",
    timed(["192.0.2.5"], { "192.0.2.5": NOW + sec(1) }),
    timed(["192.0.2.5"], { "192.0.2.5": NOW + sec(330) }),
    ['add element s_svc_a_tcp443_4 [{"elem":{"val":"192.0.2.5","timeout":330}}]'],
    NOW + sec(1) + 1,
  ],
  [
    "an expired element is added again without a delete",
    timed(["192.0.2.5"], { "192.0.2.5": NOW - sec(5) }),
    timed(["192.0.2.5"], { "192.0.2.5": NOW + sec(30) }),
    ['add element s_svc_a_tcp443_4 [{"elem":{"val":"192.0.2.5","timeout":30}}]'],
    null,
  ],
  [
    "a permanent element wanted with a lifetime is replaced",
    timed(["192.0.2.5"], {}),
    timed(["192.0.2.5"], { "192.0.2.5": NOW + sec(30) }),
    [
      'delete element s_svc_a_tcp443_4 ["192.0.2.5"]',
      'add element s_svc_a_tcp443_4 [{"elem":{"val":"192.0.2.5","timeout":30}}]',
    ],
    null,
  ],
  [
    "a timed element now wanted for good is replaced by a permanent one",
    timed(["192.0.2.5"], { "192.0.2.5": NOW + sec(30) }),
    timed(["192.0.2.5"], {}),
    ['delete element s_svc_a_tcp443_4 ["192.0.2.5"]', 'add element s_svc_a_tcp443_4 ["192.0.2.5"]'],
    null,
  ],
  [
    "a timed element no longer wanted is deleted while that is safe",
    timed(["192.0.2.5"], { "192.0.2.5": NOW + sec(30) }),
    timed([], {}),
    ['delete element s_svc_a_tcp443_4 ["192.0.2.5"]'],
    null,
  ],
  [
    "...and left to expire on its own when it is about to",
    timed(["192.0.2.5"], { "192.0.2.5": NOW + sec(1) }),
    timed([], {}),
    [],
    null,
  ],
];

for (const [what, applied, desired, expected, wake] of TIMED) {
  test(`timed elements: ${what}`, () => {
    const r = reconcile(applied, desired, O);
    assert.equal(summary(r.commands), expected);
    assert.is(r.wakeAt, wake);
    if (r.commands.length) validateBatch({ nftables: r.commands });
  });
}

test("what reconcile says is applied reconciles to nothing more", () => {
  const applied = timed(["192.0.2.5", "192.0.2.6"], { "192.0.2.5": NOW + sec(100) });
  const desired = timed(["192.0.2.6", "192.0.2.7"], { "192.0.2.7": NOW + sec(60) });
  const first = reconcile(applied, desired, O);
  assert.is(reconcile(first.applied, desired, O).kind, "none");
});

test("a replace carries each timed element's remaining lifetime and leaves expired ones out", () => {
  const desired = timed(["192.0.2.5", "192.0.2.6"], {
    "192.0.2.5": NOW + sec(42),
    "192.0.2.6": NOW - 1,
  });
  const cmds = reconcile(null, desired, O).commands;
  const added = cmds.find(
    (c) => (c.add?.set as { name?: string } | undefined)?.name === "s_svc_a_tcp443_4",
  );
  assert.equal((added?.add?.set as { elem: unknown[] }).elem, [
    { elem: { val: "192.0.2.5", timeout: 42 } },
  ]);
});

test("the table digest follows the content: equal tables agree, one changed element or rule changes it", () => {
  const a = base();
  const again = base(); // the same content, other objects
  assert.is(tableDigest(a), tableDigest(again));
  assert.is(tableDigest(a), tableDigest(a), "hashing twice (cached parts) gives the same");
  const s = a.sets.find((x) => x.elem.length) as SetDef;
  const changed = withSet(a, { ...s, elem: [...s.elem, "203.0.113.99"] });
  assert.is.not(tableDigest(changed), tableDigest(a), "an added element");
  const chain = a.chains[a.chains.length - 1] as Ruleset["chains"][number];
  const ruled = {
    ...a,
    chains: [...a.chains.slice(0, -1), { ...chain, rules: chain.rules.slice(1) }],
  };
  assert.is.not(tableDigest(ruled), tableDigest(a), "a removed rule");
  assert.is.not(tableDigest({ ...a, table: "other" }), tableDigest(a), "another table");
});

// The refused-destination record: two shared sets whose elements the kernel writes.
const REC = { size: 64, timeoutSeconds: 600 };
const recorded = (extra?: (b: ReturnType<typeof policy>) => void, size = REC.size) => {
  const b = policy()
    .service("svc-a", 2001)
    .allow("api.example.test:443", "198.51.100.1:22")
    .service("svc-b", 2002)
    .allow("db.example.test:5432")
    .resolve("api.example.test", "192.0.2.1")
    .resolve("db.example.test", "192.0.2.9");
  extra?.(b);
  return compile({ ...b.build(), refused: { ...REC, size } });
};
/** `r` as the kernel holds it after refusals: elements the packet path wrote in both sets. */
const filled = (r: Ruleset): Ruleset => ({
  ...r,
  sets: r.sets.map((s) =>
    s.name === "refused4"
      ? { ...s, elem: [{ concat: [2001, "203.0.113.5", "tcp", 80] }] }
      : s.name === "refused6"
        ? { ...s, elem: [{ concat: [2002, "2001:db8::5", "udp", 123] }] }
        : s,
  ),
});

/** [what changes, the desired table]: none of these may touch the record's elements. */
const RECORD_KEPT: [string, () => Ruleset][] = [
  ["nothing", () => recorded()],
  [
    "another answer for one of svc-a's names",
    () => withSet(recorded(), { ...set(recorded(), "s_svc_a_tcp443_4"), elem: ["192.0.2.2"] }),
  ],
  [
    "an address svc-a's proxy learned (a proxy transaction)",
    () =>
      withSet(recorded(), {
        ...set(recorded(), "s_svc_a_tcp443_4"),
        elem: ["192.0.2.1", "192.0.2.77"],
        expires: { "192.0.2.77": NOW + sec(300) },
      }),
  ],
  ["a new service", () => recorded((b) => b.service("svc-c", 2003).allow("203.0.113.7:8443"))],
  [
    "a removed service",
    () =>
      compile({
        ...policy()
          .service("svc-a", 2001)
          .allow("api.example.test:443", "198.51.100.1:22")
          .resolve("api.example.test", "192.0.2.1")
          .build(),
        refused: REC,
      }),
  ],
];

for (const [what, desired] of RECORD_KEPT) {
  test(`the refused record: its elements are never added, deleted or flushed (${what})`, () => {
    const r = reconcile(filled(recorded()), desired(), O);
    const s = summary(r.commands);
    assert.ok(
      s.every((c) => !/refused[46]/.test(c)),
      `nothing names the record sets:\n${s.join("\n")}`,
    );
    assert.ok(r.kind !== "replace");
    if (r.commands.length) validateBatch({ nftables: r.commands });
    // What reconcile says is applied reconciles to nothing more, record or not.
    assert.is(reconcile(filled(r.applied), desired(), O).kind, "none");
  });
}

test("the refused record: a replace creates both sets empty, with size, timeout and a counter on each element", () => {
  const cmds = reconcile(null, recorded(), O).commands;
  const sets = cmds
    .map((c) => c.add?.set as Record<string, unknown> | undefined)
    .filter((x) => x && /^refused[46]$/.test(String(x.name)));
  assert.equal(
    sets.map((x) => [x?.name, x?.size, x?.timeout, x?.stmt, x?.elem, x?.flags]),
    [
      ["refused4", 64, 600, [{ counter: null }], undefined, ["timeout"]],
      ["refused6", 64, 600, [{ counter: null }], undefined, ["timeout"]],
    ],
  );
  validateBatch({ nftables: cmds });
});

test("the refused record: each service chain updates it before its counter, keyed on the service's uid", () => {
  const chain = recorded().chains.find((c) => c.name === "s_svc_b");
  const rules = chain?.rules ?? [];
  const at = rules.findIndex((r) => JSON.stringify(r).includes('"@refused4"'));
  assert.ok(at >= 0);
  // One rule per family and protocol (no anonymous { tcp, udp } set), then the counter.
  assert.equal(
    rules.slice(at, at + 4).map((r) => {
      const t = JSON.stringify(r);
      return `${/"protocol":"(tcp|udp)","field":"dport"/.exec(t)?.[1]} ${/"@(refused\d)"/.exec(t)?.[1]}`;
    }),
    ["tcp refused4", "udp refused4", "tcp refused6", "udp refused6"],
  );
  assert.not.ok(JSON.stringify(rules).includes('"set":["tcp","udp"]'));
  assert.equal(rules[at + 4], [{ counter: "s_svc_b" }]);
  assert.equal(
    (rules[at]?.[0] as { set: { elem: { concat: unknown[] } } }).set.elem.concat[0],
    2002,
  );
});

test("the refused record: a new size re-creates both sets and refills every chain that updates them", () => {
  const s = summary(reconcile(filled(recorded()), recorded(undefined, 128), O).commands);
  for (const name of ["refused4", "refused6"]) {
    assert.ok(
      s.indexOf(`delete set ${name}`) >= 0 &&
        s.indexOf(`delete set ${name}`) < s.indexOf(`add set ${name}`),
    );
  }
  assert.ok(s.indexOf("flush chain s_svc_a") < s.indexOf("delete set refused4"), s.join("\n"));
  assert.ok(s.includes("flush chain s_svc_b"));
  assert.ok(
    s.every((c) => !c.startsWith("add element refused") && !c.startsWith("delete element refused")),
  );
});

test("the refused record: size 0 compiles no sets and no update rules; turning it on adds both", () => {
  const off = recorded(undefined, 0);
  assert.ok(off.sets.every((x) => !/^refused/.test(x.name)));
  assert.ok(!JSON.stringify(off.chains).includes("refused"));
  const s = summary(reconcile(off, recorded(), O).commands);
  assert.ok(s.includes("add set refused4") && s.includes("add set refused6"));
  assert.ok(s.indexOf("add set refused4") < s.indexOf("add rule s_svc_a"));
});

test.run();
