/** Renders a Ruleset into libnftables JSON batches (pure). */
import type { Ruleset, SetDef } from "./ruleset.ts";

export type Command = Record<string, Record<string, Record<string, unknown>>>;
export interface Batch {
  nftables: Command[];
}

/** An element with a lifetime, as libnftables JSON takes it. */
export function timedElement(e: unknown, timeoutSeconds: number): unknown {
  return { elem: { val: e, timeout: timeoutSeconds } };
}

/** A set's elements for an `add`: timed ones with the lifetime left at `now`, expired ones left out. */
function elementsAt(s: SetDef, now: number): unknown[] {
  const exp = s.expires;
  if (!exp) return s.elem;
  const out: unknown[] = [];
  for (const e of s.elem) {
    const until = typeof e === "string" ? exp[e] : undefined;
    if (until === undefined) out.push(e);
    else if (until > now) out.push(timedElement(e, Math.ceil((until - now) / 1000)));
  }
  return out;
}

/** `add set` (or map) with its elements as they stand at `now`. */
export function addSetCommand(
  t: Pick<Ruleset, "family" | "table">,
  s: SetDef,
  now: number,
): Command {
  const obj: Record<string, unknown> = {
    family: t.family,
    table: t.table,
    name: s.name,
    type: s.type,
  };
  if (s.map) obj.map = s.map;
  if (s.flags?.length) obj.flags = s.flags;
  if (s.dynamic) {
    obj.size = s.dynamic.size;
    obj.timeout = s.dynamic.timeoutSeconds;
    obj.stmt = [{ counter: null }];
    return { add: { set: obj } };
  }
  const elem = elementsAt(s, now);
  if (elem.length) obj.elem = elem;
  return { add: { [s.map ? "map" : "set"]: obj } };
}

/**
 * One transaction that replaces egressd's table and nothing else: `add table` (a no-op
 * when present) so that `delete table` cannot fail, then the whole table anew. Elements with
 * a lifetime get what is left of it at `now`.
 */
export function replaceBatch(r: Ruleset, now: number): Batch {
  const t = { family: r.family, name: r.table };
  const cmds: Command[] = [
    { add: { table: t } },
    { delete: { table: { ...t } } },
    { add: { table: { ...t } } },
  ];
  for (const name of r.counters)
    cmds.push({ add: { counter: { family: r.family, table: r.table, name } } });
  // Chains first (empty), so verdict-map elements can name them; then sets; then rules.
  for (const c of r.chains) {
    const chain: Record<string, unknown> = { family: r.family, table: r.table, name: c.name };
    if (c.base) Object.assign(chain, c.base);
    cmds.push({ add: { chain } });
  }
  for (const s of r.sets) cmds.push(addSetCommand(r, s, now));
  for (const c of r.chains) {
    for (const expr of c.rules)
      cmds.push({ add: { rule: { family: r.family, table: r.table, chain: c.name, expr } } });
  }
  return { nftables: cmds };
}

/** Element changes for one set, as `delete element` then `add element` commands. */
export function elementCommands(
  r: Pick<Ruleset, "family" | "table">,
  set: string,
  removed: readonly unknown[],
  added: readonly unknown[],
): Command[] {
  const cmds: Command[] = [];
  const obj = (elem: readonly unknown[]) => ({
    element: { family: r.family, table: r.table, name: set, elem: [...elem] },
  });
  if (removed.length) cmds.push({ delete: obj(removed) });
  if (added.length) cmds.push({ add: obj(added) });
  return cmds;
}
