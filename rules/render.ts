/** Renders rules and elements of the Ruleset model in nft's text syntax, for people (pure). */
import { elementText } from "./elements.ts";
import type { Expr } from "./ruleset.ts";

type Obj = Record<string, unknown>;

function exprText(e: unknown): string {
  if (typeof e === "string" || typeof e === "number") return String(e);
  if (Array.isArray(e))
    return e.every((x) => typeof x === "string")
      ? e.join(",")
      : `{ ${e.map(exprText).join(", ")} }`;
  if (!e || typeof e !== "object") return JSON.stringify(e);
  const o = e as Obj;
  const [k, v] = Object.entries(o)[0] ?? ["", null];
  const val = v as Obj;
  switch (k) {
    case "payload":
      return `${String(val.protocol)} ${String(val.field)}`;
    case "meta":
      return `meta ${String(val.key)}`;
    case "ct":
      return `ct ${String(val.key)}`;
    case "concat":
      return (v as unknown[]).map(exprText).join(" . ");
    case "prefix":
    case "range":
      return elementText(o);
    case "set":
      return `{ ${(v as unknown[]).map(exprText).join(", ")} }`;
    default:
      return JSON.stringify(o);
  }
}

export function verdictText(v: unknown): string {
  const o = v as Obj;
  const [k, val] = Object.entries(o ?? {})[0] ?? ["?", null];
  return val && typeof val === "object" && "target" in (val as Obj)
    ? `${k} ${String((val as Obj).target)}`
    : k;
}

function stmtText(s: Expr): string {
  const [k, v] = Object.entries(s)[0] ?? ["", null];
  const val = (v ?? {}) as Obj;
  switch (k) {
    case "match": {
      const op = val.op === "==" || val.op === "in" ? "" : `${String(val.op)} `;
      return `${exprText(val.left)} ${op}${exprText(val.right)}`;
    }
    case "accept":
    case "drop":
    case "return":
      return k;
    case "goto":
    case "jump":
      return verdictText(s);
    case "counter":
      return typeof v === "string" ? `counter name "${v}"` : "counter";
    case "limit":
      return `limit rate ${String(val.rate)}/${String(val.per)}${val.burst ? ` burst ${String(val.burst)} packets` : ""}`;
    case "log":
      return `log${val.prefix ? ` prefix "${String(val.prefix)}"` : ""}${val.level ? ` level ${String(val.level)}` : ""}`;
    case "reject":
      return `reject${val.type ? ` with ${String(val.type)}${val.expr ? ` ${String(val.expr)}` : ""}` : ""}`;
    case "vmap":
      return `${exprText(val.key)} vmap ${String(val.data)}`;
    case "set":
      return `${String(val.op)} ${String(val.set)} { ${exprText(val.elem)} }`;
    case "redirect": {
      const m = (val.port as { map?: { key: unknown; data: unknown } } | undefined)?.map;
      return m ? `redirect to :${exprText(m.key)} map ${String(m.data)}` : "redirect";
    }
    default:
      return JSON.stringify(s);
  }
}

/** "ip daddr . meta l4proto . th dport @s_web_lit4 accept" */
export function ruleText(expr: readonly Expr[]): string {
  return expr.map(stmtText).join(" ");
}

/** Elements of sets and maps: "10.0.0.0/8 . tcp . 5432", "2001 : goto s_web". */
export function elemText(e: unknown): string {
  return Array.isArray(e) ? `${exprText(e[0])} : ${verdictText(e[1])}` : elementText(e);
}
