/**
 * Inbound allowances (pure). `meta skuid` does not match new inbound packets, so inbound is
 * enforced in two places (see docs/inbound.md):
 *  - input hook: a connection to a port some service declared is accepted only from that
 *    service's declared sources (one map lookup on protocol . port, then one set lookup);
 *  - output hook, reply direction: a service's answers (its SYN-ACK, its UDP replies) leave
 *    only from ports it declared, so it cannot serve on a port it did not declare.
 */
import { parseNet, type AddrRange, type Family } from "./addresses.ts";
import { addrJSON, disjoint, type Allow, type PortJSON } from "./elements.ts";
import { invalid, type Problem } from "./errors.ts";
import type { InboundRule, ServicePolicy } from "./policy.ts";
import type { Expr } from "./ruleset.ts";
import { formatPorts, parsePorts, type PortRange, type Protocol } from "./target.ts";

export const IN_CHAIN = "input";
export const IN_DISPATCH = "in_dispatch";
export const UID_SERVE = "uid_serve";
export const GID_SERVE = "gid_serve";

const ANYWHERE: Record<Family, AddrRange> = {
  4: { family: 4, lo: 0n, hi: (1n << 32n) - 1n },
  6: { family: 6, lo: 0n, hi: (1n << 128n) - 1n },
};

/** nft names of a service's inbound objects. Suffixes have the length of the outbound ones. */
export function inboundObjects(obj: string) {
  return {
    input: `i_${obj.slice(2)}`,
    reply: `r_${obj.slice(2)}`,
    counter: `i_${obj.slice(2)}`,
    from4: `${obj}_inb4`,
    from6: `${obj}_inb6`,
    served: `${obj}_srvp`,
  };
}

interface PortAllow {
  protocol: Protocol;
  ports: PortRange;
}

function ranges(
  rules: readonly InboundRule[],
): (PortAllow & { from: ReturnType<typeof parseNet>[] })[] {
  const out = [];
  for (const r of rules) {
    const ports = parsePorts(r.ports);
    if ("error" in ports) continue;
    out.push({ protocol: r.protocol, ports, from: (r.from ?? []).map(parseNet) });
  }
  return out;
}

/** Merges port ranges per protocol into disjoint, sorted ranges. */
export function mergePorts(list: readonly PortAllow[]): PortAllow[] {
  const out: PortAllow[] = [];
  for (const protocol of ["tcp", "udp"] as const) {
    const sorted = list
      .filter((p) => p.protocol === protocol)
      .sort((a, b) => a.ports.low - b.ports.low);
    for (const p of sorted) {
      const last = out[out.length - 1];
      if (last && last.protocol === protocol && p.ports.low <= last.ports.high + 1) {
        last.ports = { low: last.ports.low, high: Math.max(last.ports.high, p.ports.high) };
      } else out.push({ protocol, ports: { ...p.ports } });
    }
  }
  return out;
}

const portJSON = (r: PortRange): PortJSON =>
  r.low === r.high ? r.low : { range: [r.low, r.high] };

/** `protocol . port` elements. */
export function portElements(list: readonly PortAllow[]): { concat: [Protocol, PortJSON] }[] {
  return mergePorts(list).map((p) => ({ concat: [p.protocol, portJSON(p.ports)] }));
}

/** `protocol . port . source` elements for one family: declared sources, or anywhere when none. */
export function sourceElements(
  rules: readonly InboundRule[],
  family: Family,
): { concat: [Protocol, PortJSON, unknown] }[] {
  const boxes: Allow[] = [];
  for (const r of ranges(rules)) {
    const sources = r.from.length ? r.from : null;
    if (!sources) {
      boxes.push({ range: ANYWHERE[family], protocol: r.protocol, ports: r.ports });
      continue;
    }
    for (const s of sources) {
      if ("error" in s || s.family !== family) continue;
      boxes.push({ range: s.range, protocol: r.protocol, ports: r.ports });
    }
  }
  return disjoint(boxes).map((b) => ({
    concat: [b.protocol, portJSON(b.ports), addrJSON(b.range)],
  }));
}

/** The ports each service declares, checked so that no two services declare the same port. */
export function checkInboundOverlap(policies: readonly ServicePolicy[]): void {
  const problems: Problem[] = [];
  const claimed: { service: string; protocol: Protocol; ports: PortRange }[] = [];
  // In the order given: the later of two clashing services is the one named as overlapping.
  for (const p of policies) {
    for (const r of mergePorts(ranges(p.inbound))) {
      const clash = claimed.find(
        (c) =>
          c.protocol === r.protocol && c.ports.low <= r.ports.high && r.ports.low <= c.ports.high,
      );
      if (clash) {
        problems.push({
          where: `service ${p.name}`,
          text: `inbound ${formatPorts(r.ports)}/${r.protocol} overlaps ${formatPorts(clash.ports)}/${r.protocol} of service ${clash.service}: a port belongs to one service`,
        });
      } else claimed.push({ service: p.name, ...r });
    }
  }
  if (problems.length)
    throw invalid(
      "ERR_EGRESS_INBOUND_CONFLICT",
      "two services declare the same inbound port",
      problems,
      "a port belongs to one service: revoke-in it from the other service first, or use another port",
    );
}

const l4 = { meta: { key: "l4proto" } };
const th = (field: "dport" | "sport") => ({ payload: { protocol: "th", field } });

/** `meta l4proto . th dport . ip saddr @set accept` */
export function sourceRule(family: Family, set: string): Expr[] {
  return [
    {
      match: {
        op: "==",
        left: {
          concat: [
            l4,
            th("dport"),
            { payload: { protocol: family === 4 ? "ip" : "ip6", field: "saddr" } },
          ],
        },
        right: `@${set}`,
      },
    },
    { accept: null },
  ];
}

/** `meta l4proto . th sport @set accept` */
export function servedRule(set: string): Expr[] {
  return [
    { match: { op: "==", left: { concat: [l4, th("sport")] }, right: `@${set}` } },
    { accept: null },
  ];
}

/** `meta l4proto . th dport vmap @in_dispatch` */
export const inDispatchRule: Expr[] = [
  { vmap: { key: { concat: [l4, th("dport")] }, data: `@${IN_DISPATCH}` } },
];

/** `ct direction reply meta sk{uid,gid} vmap @map` */
export function serveDispatchRule(key: "skuid" | "skgid", map: string): Expr[] {
  return [
    { match: { op: "==", left: { ct: { key: "direction" } }, right: "reply" } },
    { vmap: { key: { meta: { key } }, data: `@${map}` } },
  ];
}
