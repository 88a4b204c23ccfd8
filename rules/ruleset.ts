/** The model of egressd's nftables table: what the compiler produces and what a listing is parsed into. */

/** One libnftables JSON expression (shape checked by the nft schema, not by TypeScript). */
export type Expr = Record<string, unknown>;

export interface SetDef {
  name: string;
  /** A single type ("uid") or the parts of a concatenation. */
  type: string | string[];
  /** Present for maps: the type of the value. */
  map?: "verdict" | "inet_service";
  flags?: string[];
  /** Elements in libnftables JSON form; map elements are [key, value]. */
  elem: unknown[];
  /**
   * Expiry (epoch ms) of elements that have one, keyed by the element (an address): sets with
   * the "timeout" flag. Elements not listed are permanent.
   */
  expires?: Record<string, number>;
}

export interface BaseChain {
  type: "filter" | "nat";
  hook: "output" | "input";
  prio: number;
  policy: "accept" | "drop";
}

export interface ChainDef {
  name: string;
  base?: BaseChain;
  rules: Expr[][];
}

export interface Ruleset {
  family: "inet";
  table: string;
  counters: string[];
  sets: SetDef[];
  chains: ChainDef[];
}

/** Stable JSON (sorted keys) used as the identity of rules and elements when comparing. */
export function stableKey(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(stableKey).join(",")}]`;
  if (value && typeof value === "object") {
    const entries = Object.entries(value as Record<string, unknown>)
      .filter(([, v]) => v !== undefined)
      .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
    return `{${entries.map(([k, v]) => `${JSON.stringify(k)}:${stableKey(v)}`).join(",")}}`;
  }
  return JSON.stringify(value);
}
