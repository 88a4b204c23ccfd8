/**
 * The smallest change from one Ruleset to another (pure): when only set elements differ,
 * `delete element` / `add element` commands for exactly those; otherwise null (the
 * structure changed and the table must be replaced).
 */
import { elementCommands, type Command } from "./batch.ts";
import { stableKey, type Ruleset } from "./ruleset.ts";

const structures = new WeakMap<Ruleset, string>();

/** Everything but set elements, as one key; remembered per Ruleset (the daemon compares each one twice). */
function structure(r: Ruleset): string {
  const known = structures.get(r);
  if (known !== undefined) return known;
  const key = stableKey({
    table: r.table,
    counters: r.counters,
    chains: r.chains,
    sets: r.sets.map((s) => ({ ...s, elem: undefined })),
  });
  structures.set(r, key);
  return key;
}

export interface SetChange {
  set: string;
  removed: unknown[];
  added: unknown[];
}

/** Element changes per set, or null when anything but elements differs. */
export function elementDelta(before: Ruleset, after: Ruleset): SetChange[] | null {
  if (structure(before) !== structure(after)) return null;
  const out: SetChange[] = [];
  const byName = new Map(before.sets.map((s) => [s.name, s]));
  for (const s of after.sets) {
    const old = byName.get(s.name);
    if (!old) return null;
    if (old.elem.length === s.elem.length && JSON.stringify(old.elem) === JSON.stringify(s.elem))
      continue;
    const oldKeys = new Set(old.elem.map(stableKey));
    const newKeys = new Set(s.elem.map(stableKey));
    const removed = old.elem.filter((e) => !newKeys.has(stableKey(e)));
    const added = s.elem.filter((e) => !oldKeys.has(stableKey(e)));
    if (removed.length || added.length) out.push({ set: s.name, removed, added });
  }
  return out;
}

/** One batch holding every element change: deletes first, so a box can be re-cut in the same transaction. */
export function deltaCommands(
  r: Pick<Ruleset, "family" | "table">,
  changes: readonly SetChange[],
): Command[] {
  const deletes = changes.flatMap((c) => elementCommands(r, c.set, c.removed, []));
  const adds = changes.flatMap((c) => elementCommands(r, c.set, [], c.added));
  return [...deletes, ...adds];
}
