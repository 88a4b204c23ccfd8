/** Renders a Ruleset into libnftables JSON batches (pure). */
import type { Ruleset, SetDef } from "./ruleset.ts";

export type Command = Record<string, Record<string, Record<string, unknown>>>;
export interface Batch {
  nftables: Command[];
}

function setObject(
  r: Ruleset,
  s: SetDef,
  withElements: boolean,
): Record<string, Record<string, unknown>> {
  const obj: Record<string, unknown> = {
    family: r.family,
    table: r.table,
    name: s.name,
    type: s.type,
  };
  if (s.map) obj.map = s.map;
  if (s.flags?.length) obj.flags = s.flags;
  if (withElements && s.elem.length) obj.elem = s.elem;
  return { [s.map ? "map" : "set"]: obj };
}

/**
 * One transaction that replaces egressd's table and nothing else: `add table` (a no-op
 * when present) so that `delete table` cannot fail, then the whole table anew.
 */
export function replaceBatch(r: Ruleset): Batch {
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
  for (const s of r.sets) cmds.push({ add: setObject(r, s, true) });
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
