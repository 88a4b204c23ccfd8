/**
 * Compares two Rulesets: `diff(live, desired)` lists what differs, as data (pure).
 * Used by `apply --dry-run` (what would change) and by the drift audit.
 */
import { elemText, ruleText } from "./render.ts";
import { stableKey, type ChainDef, type Ruleset, type SetDef } from "./ruleset.ts";

export type FindingKind =
  | "table-missing"
  | "chain-missing"
  | "chain-extra"
  | "chain-changed"
  | "rule-missing"
  | "rule-extra"
  | "rules-reordered"
  | "set-missing"
  | "set-extra"
  | "set-changed"
  | "element-missing"
  | "element-extra"
  | "counter-missing"
  | "counter-extra"
  /** A policy or config file on disk that is not what egressd enforces (edited, broken, new). */
  | "policy-unapplied";

export interface Finding {
  kind: FindingKind;
  /** The object concerned: "chain output", "set s_web_dns4". */
  object: string;
  /** What the desired state has (absent for extras). */
  expected?: string;
  /** What the live state has (absent for missing things). */
  found?: string;
  /** True when the difference may let through traffic the policy refuses. */
  opens?: boolean;
}

/** Sets whose extra elements allow traffic: literal, name, inbound and resolver sets, proxy ports. */
const ALLOW_SET =
  /(_lit4|_lit6|_(tcp|udp)[0-9]+(_[0-9]+)?_[46]|_inb4|_inb6|_srvp|^set resolvers[46]|^set [ug]id_proxyport)$/;
const DISPATCH_MAP = /^map (uid_dispatch|gid_dispatch|uid_serve|gid_serve|in_dispatch)$/;

/** Whether a finding may open the firewall: the cases an operator must look at first. */
export function opens(f: Finding): boolean {
  switch (f.kind) {
    case "table-missing":
    case "rule-missing":
    case "rule-extra":
    case "rules-reordered":
    case "chain-changed":
      return true;
    case "element-extra":
      return ALLOW_SET.test(f.object);
    case "element-missing":
    case "set-missing":
      return DISPATCH_MAP.test(f.object);
    default:
      return false;
  }
}

function byName<T extends { name: string }>(items: readonly T[]): Map<string, T> {
  return new Map(items.map((i) => [i.name, i]));
}

/** Items of `a` not in `b`, as a multiset by key. */
function minus<T>(a: readonly T[], b: readonly T[], key: (x: T) => string): T[] {
  const counts = new Map<string, number>();
  for (const x of b) counts.set(key(x), (counts.get(key(x)) ?? 0) + 1);
  const out: T[] = [];
  for (const x of a) {
    const k = key(x);
    const n = counts.get(k) ?? 0;
    if (n > 0) counts.set(k, n - 1);
    else out.push(x);
  }
  return out;
}

function setShape(s: SetDef): string {
  return (
    `type ${Array.isArray(s.type) ? s.type.join(" . ") : s.type}${s.map ? ` : ${s.map}` : ""}` +
    (s.flags?.length ? `; flags ${[...s.flags].sort().join(",")}` : "") +
    (s.dynamic ? `; size ${s.dynamic.size}; timeout ${s.dynamic.timeoutSeconds}s` : "")
  );
}

function chainShape(c: ChainDef): string {
  return c.base
    ? `type ${c.base.type} hook ${c.base.hook} priority ${c.base.prio}; policy ${c.base.policy}`
    : "regular chain";
}

function diffRules(object: string, live: ChainDef, want: ChainDef, out: Finding[]): void {
  const missing = minus(want.rules, live.rules, stableKey);
  const extra = minus(live.rules, want.rules, stableKey);
  for (const r of missing) out.push({ kind: "rule-missing", object, expected: ruleText(r) });
  for (const r of extra) out.push({ kind: "rule-extra", object, found: ruleText(r) });
  if (
    !missing.length &&
    !extra.length &&
    live.rules.map(stableKey).join("\n") !== want.rules.map(stableKey).join("\n")
  ) {
    out.push({
      kind: "rules-reordered",
      object,
      expected: want.rules.map(ruleText).join("; "),
      found: live.rules.map(ruleText).join("; "),
    });
  }
}

function diffElements(object: string, live: SetDef, want: SetDef, out: Finding[]): void {
  // The refused record: the kernel writes its elements, so they are never drift.
  if (want.dynamic || live.dynamic) return;
  for (const e of minus(want.elem, live.elem, stableKey))
    out.push({ kind: "element-missing", object, expected: elemText(e) });
  for (const e of minus(live.elem, want.elem, stableKey))
    out.push({ kind: "element-extra", object, found: elemText(e) });
}

/**
 * The audit's comparison: like `diff`, but an element with a lifetime that ends within
 * `marginMs` of `now`, on either side, is left out of it (the kernel may drop it any moment, and
 * its listed expiry is rounded to the second). Remaining lifetimes are never drift.
 */
export function auditDiff(
  live: Ruleset | null,
  desired: Ruleset,
  now: number,
  marginMs = 3000,
): Finding[] {
  const soon = now + marginMs;
  const ending = new Map<string, Set<string>>();
  for (const r of [live, desired]) {
    for (const s of r?.sets ?? []) {
      for (const [e, t] of Object.entries(s.expires ?? {})) {
        if (t > soon) continue;
        const set = ending.get(s.name) ?? new Set<string>();
        set.add(e);
        ending.set(s.name, set);
      }
    }
  }
  if (!ending.size) return diff(live, desired);
  const trim = (r: Ruleset): Ruleset => ({
    ...r,
    sets: r.sets.map((s) => {
      const drop = ending.get(s.name);
      return drop ? { ...s, elem: s.elem.filter((e) => typeof e !== "string" || !drop.has(e)) } : s;
    }),
  });
  return diff(live && trim(live), trim(desired));
}

/** Everything that differs between the live table (null: absent) and the desired one. */
export function diff(live: Ruleset | null, desired: Ruleset): Finding[] {
  return differences(live, desired).map((f) => (opens(f) ? { ...f, opens: true } : f));
}

function differences(live: Ruleset | null, desired: Ruleset): Finding[] {
  const out: Finding[] = [];
  const empty: Ruleset = {
    family: desired.family,
    table: desired.table,
    counters: [],
    sets: [],
    chains: [],
  };
  if (!live)
    out.push({ kind: "table-missing", object: `table ${desired.family} ${desired.table}` });
  const have = live ?? empty;

  for (const c of minus(desired.counters, have.counters, String))
    out.push({ kind: "counter-missing", object: `counter ${c}` });
  for (const c of minus(have.counters, desired.counters, String))
    out.push({ kind: "counter-extra", object: `counter ${c}` });

  const liveChains = byName(have.chains);
  const wantChains = byName(desired.chains);
  for (const want of desired.chains) {
    const object = `chain ${want.name}`;
    const got = liveChains.get(want.name);
    if (!got) {
      out.push({ kind: "chain-missing", object, expected: chainShape(want) });
      for (const r of want.rules) out.push({ kind: "rule-missing", object, expected: ruleText(r) });
      continue;
    }
    if (chainShape(got) !== chainShape(want)) {
      out.push({
        kind: "chain-changed",
        object,
        expected: chainShape(want),
        found: chainShape(got),
      });
    }
    diffRules(object, got, want, out);
  }
  for (const got of have.chains) {
    if (wantChains.has(got.name)) continue;
    out.push({ kind: "chain-extra", object: `chain ${got.name}`, found: chainShape(got) });
  }

  const liveSets = byName(have.sets);
  const wantSets = byName(desired.sets);
  for (const want of desired.sets) {
    const object = `${want.map ? "map" : "set"} ${want.name}`;
    const got = liveSets.get(want.name);
    if (!got) {
      out.push({ kind: "set-missing", object, expected: setShape(want) });
      for (const e of want.dynamic ? [] : want.elem)
        out.push({ kind: "element-missing", object, expected: elemText(e) });
      continue;
    }
    if (setShape(got) !== setShape(want)) {
      out.push({ kind: "set-changed", object, expected: setShape(want), found: setShape(got) });
    }
    diffElements(object, got, want, out);
  }
  for (const got of have.sets) {
    if (wantSets.has(got.name)) continue;
    out.push({
      kind: "set-extra",
      object: `${got.map ? "map" : "set"} ${got.name}`,
      found: setShape(got),
    });
    for (const e of got.dynamic ? [] : got.elem)
      out.push({
        kind: "element-extra",
        object: `${got.map ? "map" : "set"} ${got.name}`,
        found: elemText(e),
      });
  }
  return out;
}
