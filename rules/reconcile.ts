/**
 * reconcile(applied, desired): the one function that decides every kernel change (pure).
 *
 * Given what the kernel holds (what egressd applied, or a parsed listing) and what it should
 * hold, it returns one transaction that takes the first to the second, touching only what
 * differs: element additions and deletions in sets and maps, a service's chains refilled and
 * its sets re-created when their definitions change, objects of removed services deleted.
 * Counters, sets and chains of everything else are left alone. When there is nothing to start
 * from (or a base chain itself changed), the whole table is replaced in one transaction.
 *
 * Sets the packet path writes (`dynamic`: the refused-destination record) are created and
 * re-created with their definition, but their elements are the kernel's: no transaction but a
 * whole-table replace (or a change of the set's own size or timeout) touches them.
 *
 * Elements with a timeout (addresses a DNS proxy learned) follow the rules that work on every
 * kernel: an element is never deleted when it may have expired by the time the transaction
 * runs (a delete of a missing element aborts the whole batch); a lifetime is extended by
 * delete + add (before Linux 6.12, adding an existing element keeps its old expiry), and only
 * when it grows by more than `slackMs`, so a name asked every second does not cost a
 * transaction every second.
 */
import {
  addSetCommand,
  elementCommands,
  replaceBatch,
  timedElement,
  type Command,
} from "./batch.ts";
import { stableKey, type ChainDef, type Ruleset, type SetDef } from "./ruleset.ts";

export interface ReconcileOptions {
  now: number;
  /** Extend a timed element only when its new expiry is later by more than this. */
  slackMs: number;
  /** Never delete a timed element that expires within this. */
  marginMs: number;
}

export const DEFAULT_MARGIN_MS = 2000;

export interface Reconciled {
  /** "none": nothing to send; "elements": only set and map elements; "objects": chains, sets or counters too; "replace": the whole table. */
  kind: "none" | "elements" | "objects" | "replace";
  commands: Command[];
  /** Elements added plus deleted, or (objects, replace) objects touched. */
  changes: number;
  /** What the kernel holds once the transaction is applied. */
  applied: Ruleset;
  /**
   * The earliest moment an element the kernel will drop is still wanted (a lifetime that could
   * not be extended safely): reconcile again then. Null when there is none.
   */
  wakeAt: number | null;
}

function setShape(s: SetDef): string {
  return stableKey({
    type: s.type,
    map: s.map,
    flags: [...(s.flags ?? [])].sort(),
    dynamic: s.dynamic,
  });
}

function baseShape(c: ChainDef): string {
  return stableKey(c.base ?? null);
}

/** Names of the sets and maps a chain's rules refer to ("@name"). */
function references(c: ChainDef): Set<string> {
  const out = new Set<string>();
  for (const m of JSON.stringify(c.rules).matchAll(/"@([A-Za-z_][A-Za-z0-9_]*)"/g))
    out.add(m[1] as string);
  return out;
}

const keyOf = (e: unknown) => (typeof e === "string" ? e : stableKey(e));

interface ElementPlan {
  deletes: unknown[];
  adds: unknown[];
  /** The set as the kernel holds it afterwards. */
  after: SetDef;
  wakeAt: number | null;
}

/** Element changes that take `have` (same definition) to `want`. */
function elementPlan(have: SetDef, want: SetDef, o: ReconcileOptions): ElementPlan {
  // The same object (a part the daemon did not recompile): nothing can differ.
  if (have === want) return { deletes: [], adds: [], after: want, wakeAt: null };
  const { now } = o;
  const haveExp = have.expires ?? {};
  const wantExp = want.expires ?? {};
  const live = (k: string) => haveExp[k] === undefined || haveExp[k] > now;
  const haveByKey = new Map(have.elem.map((e) => [keyOf(e), e]));
  const wantByKey = new Map(want.elem.map((e) => [keyOf(e), e]));
  const deletes: unknown[] = [];
  const adds: unknown[] = [];
  const afterElem: unknown[] = [];
  const afterExp: Record<string, number> = {};
  let wakeAt: number | null = null;
  const wake = (t: number) => (wakeAt = wakeAt === null ? t : Math.min(wakeAt, t));
  const safeToDelete = (k: string) =>
    haveExp[k] === undefined || (haveExp[k] as number) > now + o.marginMs;
  const add = (k: string, e: unknown) => {
    const until = wantExp[k];
    if (until !== undefined) {
      if (until <= now) return; // already over: nothing to add
      const timeout = Math.ceil((until - now) / 1000);
      adds.push(timedElement(e, timeout));
      afterExp[k] = now + timeout * 1000;
    } else adds.push(e);
    afterElem.push(e);
  };

  for (const [k, e] of wantByKey) {
    const had = haveByKey.has(k) && live(k);
    if (!had) {
      add(k, e);
      continue;
    }
    const hadUntil = haveExp[k];
    const wantUntil = wantExp[k];
    if (hadUntil === undefined && wantUntil === undefined) {
      afterElem.push(e);
      continue;
    }
    const needs =
      hadUntil === undefined
        ? true // permanent, now wanted with a lifetime
        : wantUntil === undefined
          ? true // timed, now wanted permanently
          : wantUntil > hadUntil + o.slackMs;
    if (!needs) {
      afterElem.push(e);
      afterExp[k] = hadUntil as number;
      continue;
    }
    if (safeToDelete(k)) {
      deletes.push(haveByKey.get(k));
      add(k, e);
    } else {
      // It may expire before the transaction runs, so no delete. An add alone extends it on
      // Linux >= 6.12 and is a no-op before: count on the old expiry, and look again after it.
      add(k, e);
      afterExp[k] = hadUntil as number;
      wake((hadUntil as number) + 1);
    }
  }
  for (const [k, e] of haveByKey) {
    if (wantByKey.has(k) || !live(k)) continue;
    if (safeToDelete(k)) deletes.push(e);
    // else: it is about to expire on its own; a delete could abort the transaction.
  }
  // After this transaction the kernel holds exactly what is wanted (every element, and each
  // lifetime as wanted): the desired object describes it, so it is kept (no second copy of the
  // set) and the next reconcile sees the same object and skips it.
  const same =
    afterElem.length === wantByKey.size &&
    wantByKey.size === want.elem.length &&
    wakeAt === null &&
    Object.keys(afterExp).length === Object.keys(wantExp).length &&
    Object.entries(afterExp).every(([k, t]) => wantExp[k] === t);
  if (same) return { deletes, adds, after: want, wakeAt };
  const after: SetDef = { ...want, elem: afterElem };
  if (Object.keys(afterExp).length) after.expires = afterExp;
  else delete after.expires;
  return { deletes, adds, after, wakeAt };
}

/** A set with only its elements still alive at `now` (expired timed ones dropped). */
function alive(s: SetDef, now: number): SetDef {
  if (!s.expires) return s;
  const exp = s.expires;
  const elem = s.elem.filter((e) => {
    const t = exp[keyOf(e)];
    return t === undefined || t > now;
  });
  const expires = Object.fromEntries(Object.entries(exp).filter(([, t]) => t > now));
  return { ...s, elem, ...(Object.keys(expires).length ? { expires } : { expires: undefined }) };
}

/** The whole table anew, in one transaction. */
function replaceAll(desired: Ruleset, now: number): Reconciled {
  const applied: Ruleset = { ...desired, sets: desired.sets.map((s) => alive(s, now)) };
  return {
    kind: "replace",
    commands: replaceBatch(desired, now).nftables,
    changes: desired.sets.length + desired.chains.length,
    applied,
    wakeAt: null,
  };
}

/** The transaction that takes the kernel from `applied` (null: unknown) to `desired`. */
export function reconcile(
  applied: Ruleset | null,
  desired: Ruleset,
  o: ReconcileOptions,
): Reconciled {
  if (!applied || applied.table !== desired.table || applied.family !== desired.family)
    return replaceAll(desired, o.now);
  const t = { family: desired.family, table: desired.table };
  const haveChains = new Map(applied.chains.map((c) => [c.name, c]));
  const wantChains = new Map(desired.chains.map((c) => [c.name, c]));
  const haveSets = new Map(applied.sets.map((s) => [s.name, s]));
  const wantSets = new Map(desired.sets.map((s) => [s.name, s]));
  // A base chain that changed its hook, type or priority: replace everything.
  for (const c of desired.chains) {
    const h = haveChains.get(c.name);
    if (h && h !== c && (h.base || c.base) && baseShape(h) !== baseShape(c))
      return replaceAll(desired, o.now);
  }

  const newChains = desired.chains.filter((c) => !haveChains.has(c.name));
  const goneChains = applied.chains.filter((c) => !wantChains.has(c.name));
  const newSets = desired.sets.filter((s) => !haveSets.has(s.name));
  const goneSets = applied.sets.filter((s) => !wantSets.has(s.name));
  const redefined = desired.sets.filter((s) => {
    const h = haveSets.get(s.name);
    return h !== undefined && h !== s && setShape(h) !== setShape(s);
  });
  const recreate = new Set([...goneSets, ...redefined].map((s) => s.name));
  // Chains whose rules change, or that refer to a set that is re-created, are refilled.
  const refill = desired.chains.filter((c) => {
    const h = haveChains.get(c.name);
    if (!h) return false;
    if (h !== c && h.rules !== c.rules && stableKey(h.rules) !== stableKey(c.rules)) return true;
    if (recreate.size) for (const r of references(h)) if (recreate.has(r)) return true;
    return false;
  });
  const haveCounters = new Set(applied.counters);
  const wantCounters = new Set(desired.counters);
  const newCounters = desired.counters.filter((c) => !haveCounters.has(c));
  const goneCounters = applied.counters.filter((c) => !wantCounters.has(c));

  const first: Command[] = [];
  const elementDeletes: Command[] = [];
  const elementAdds: Command[] = [];
  const last: Command[] = [];
  let elementChanges = 0;
  let wakeAt: number | null = null;
  const afterSets: SetDef[] = [];

  for (const name of newCounters) first.push({ add: { counter: { ...t, name } } });
  for (const c of newChains) {
    const chain: Record<string, unknown> = { ...t, name: c.name };
    if (c.base) Object.assign(chain, c.base);
    first.push({ add: { chain } });
  }
  for (const c of [...refill, ...goneChains])
    first.push({ flush: { chain: { ...t, name: c.name } } });
  for (const s of [...goneSets, ...redefined])
    first.push({
      delete: { [s.map ? "map" : "set"]: { ...t, name: s.name } } as Command["delete"],
    });
  const fresh = [...newSets, ...redefined];
  for (const s of fresh) {
    first.push(addSetCommand(t, s, o.now));
    afterSets.push(alive(s, o.now));
  }

  for (const want of desired.sets) {
    const have = haveSets.get(want.name);
    if (!have || recreate.has(want.name)) continue;
    // The kernel writes these elements (the refused record): never add, delete or flush them.
    if (want.dynamic) continue;
    const p = elementPlan(have, want, o);
    if (p.after !== want) afterSets.push(p.after);
    if (p.wakeAt !== null) wakeAt = wakeAt === null ? p.wakeAt : Math.min(wakeAt, p.wakeAt);
    if (!p.deletes.length && !p.adds.length) continue;
    elementChanges += p.deletes.length + p.adds.length;
    elementDeletes.push(...elementCommands(t, want.name, p.deletes, []));
    elementAdds.push(...elementCommands(t, want.name, [], p.adds));
  }
  // Map elements naming a chain that goes are among the deletes above (the desired maps no longer
  // hold them), so they leave before the chain: a chain a map still names cannot be deleted.
  for (const c of [...newChains, ...refill]) {
    for (const expr of c.rules) last.push({ add: { rule: { ...t, chain: c.name, expr } } });
  }
  for (const c of goneChains) last.push({ delete: { chain: { ...t, name: c.name } } });
  for (const name of goneCounters) last.push({ delete: { counter: { ...t, name } } });

  const commands = [...first, ...elementDeletes, ...elementAdds, ...last];
  const structural =
    newCounters.length +
    goneCounters.length +
    newChains.length +
    goneChains.length +
    refill.length +
    newSets.length +
    goneSets.length +
    redefined.length;
  // In the desired order; a set the kernel holds exactly as desired is the desired object.
  const after = new Map(afterSets.map((s) => [s.name, s]));
  const ordered = desired.sets.map((s) => after.get(s.name) ?? s);
  return {
    kind: !commands.length ? "none" : structural ? "objects" : "elements",
    commands,
    changes: structural || elementChanges,
    applied: { ...desired, sets: ordered },
    wakeAt,
  };
}
