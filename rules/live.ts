/** Parses `nft -j list table` output into the Ruleset model, dropping what changes by itself (pure). */
import type { BaseChain, ChainDef, Expr, Ruleset, SetDef } from "./ruleset.ts";

type Obj = Record<string, unknown>;

/** Removes handles and live counter values, which differ on every listing. */
function scrub(expr: unknown): unknown {
  if (Array.isArray(expr)) return expr.map(scrub);
  if (expr && typeof expr === "object") {
    const o = expr as Obj;
    if ("counter" in o && o.counter && typeof o.counter === "object") return { counter: null };
    return Object.fromEntries(Object.entries(o).map(([k, v]) => [k, scrub(v)]));
  }
  return expr;
}

/**
 * Elements as listed: plain values, and `{elem: {val, timeout, expires}}` for elements with a
 * lifetime, whose expiry (seconds from now) becomes an absolute time in `expires`.
 */
function elements(
  raw: unknown[],
  now: number,
): { elem: unknown[]; expires?: Record<string, number> } {
  const elem: unknown[] = [];
  const expires: Record<string, number> = {};
  for (const e of raw) {
    const inner = (e as { elem?: { val?: unknown; expires?: unknown } })?.elem;
    if (inner && typeof inner === "object" && "val" in inner) {
      elem.push(inner.val);
      if (typeof inner.expires === "number" && typeof inner.val === "string")
        expires[inner.val] = now + inner.expires * 1000;
    } else elem.push(e);
  }
  return Object.keys(expires).length ? { elem, expires } : { elem };
}

/**
 * Parses a listing of one table. Returns null when the listing holds no such table.
 * Objects of other tables (a listing never has them) are ignored. `now` turns the remaining
 * lifetimes of timed elements into expiry times.
 */
export function parseLive(listing: unknown, table: string, now = 0): Ruleset | null {
  const items = ((listing as { nftables?: unknown[] })?.nftables ?? []) as Obj[];
  const ruleset: Ruleset = { family: "inet", table, counters: [], sets: [], chains: [] };
  const chains = new Map<string, ChainDef>();
  let found = false;
  const mine = (o: Obj) => o.family === "inet" && o.table === table;
  for (const item of items) {
    const [kind, value] = Object.entries(item)[0] ?? [];
    const o = value as Obj | undefined;
    if (!kind || !o || typeof o !== "object") continue;
    if (kind === "table") {
      if (o.family === "inet" && o.name === table) found = true;
      continue;
    }
    if (!mine(o)) continue;
    switch (kind) {
      case "counter":
        ruleset.counters.push(String(o.name));
        break;
      case "set":
      case "map": {
        const s: SetDef = {
          name: String(o.name),
          type: o.type as string | string[],
          ...elements(Array.isArray(o.elem) ? (o.elem as unknown[]) : [], now),
        };
        if (kind === "map") s.map = o.map as SetDef["map"];
        // "dynamic" (a set rules update) is implied by the rules; nft 1.0.6 does not list it, later ones may.
        const flags = Array.isArray(o.flags)
          ? (o.flags as string[]).filter((f) => f !== "dynamic")
          : [];
        if (flags.length) s.flags = flags.sort();
        // A set the packet path writes (a size limit and a default timeout: the refused record):
        // its elements are the kernel's, not part of what egressd applies.
        if (typeof o.size === "number" && typeof o.timeout === "number") {
          s.dynamic = { size: o.size, timeoutSeconds: o.timeout };
          s.elem = [];
          delete s.expires;
        }
        ruleset.sets.push(s);
        break;
      }
      case "chain": {
        const c: ChainDef = { name: String(o.name), rules: [] };
        if (o.hook !== undefined) {
          c.base = { type: o.type, hook: o.hook, prio: o.prio, policy: o.policy } as BaseChain;
        }
        chains.set(c.name, c);
        ruleset.chains.push(c);
        break;
      }
      case "rule": {
        const c = chains.get(String(o.chain));
        if (c) c.rules.push(scrub(o.expr) as Expr[]);
        break;
      }
    }
  }
  return found ? ruleset : null;
}
