/**
 * Learning mode (pure): a service's learning window, the mode it is enforced in meanwhile, and
 * the allowlist proposed from what it did (refused-destination records, the names it looked up,
 * the ports it listens on).
 */
import type { Family } from "./addresses.ts";
import { sortAddresses } from "./address-filter.ts";
import type { Listener } from "./listeners.ts";
import type { InboundRule, ServicePolicy } from "./policy.ts";
import { listenerText, undeclaredListeners } from "./listeners.ts";
import { formatTarget, type OutboundRule, type Protocol } from "./target.ts";

/** A learning window, as stored in the policy file: ISO 8601 times; no `until` means until stopped. */
export interface Learning {
  since: string;
  until?: string;
}

/** Whether `p` is learning at `now` (ms). */
export function isLearning(p: Pick<ServicePolicy, "learning">, now: number): boolean {
  if (!p.learning) return false;
  return p.learning.until === undefined || now < Date.parse(p.learning.until);
}

/**
 * The policy as enforced at `now`: while learning, in audit mode (traffic allowed and recorded,
 * lookups of unlisted names answered). After the window, the mode written in the file again.
 */
export function effectivePolicy(p: ServicePolicy, now: number): ServicePolicy {
  return isLearning(p, now) && p.mode !== "audit" ? { ...p, mode: "audit" } : p;
}

/** When the next learning window among `policies` ends (ms), or null. */
export function nextLearningEnd(policies: readonly ServicePolicy[], now: number): number | null {
  let next: number | null = null;
  for (const p of policies) {
    const end = p.learning?.until === undefined ? NaN : Date.parse(p.learning.until);
    if (end > now && (next === null || end < next)) next = end;
  }
  return next;
}

const UNITS: Record<string, number> = { s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };

/** "90s", "10m", "1h30m", "2d" -> milliseconds; an error for anything else. */
export function parseDuration(text: string): number | { error: string } {
  const t = text.trim().toLowerCase();
  const parts = [...t.matchAll(/([0-9]+)([smhd])/g)];
  const ms = parts.reduce((n, m) => n + Number(m[1]) * (UNITS[m[2] as string] ?? 0), 0);
  if (!parts.length || parts.map((m) => m[0]).join("") !== t || ms <= 0) {
    return {
      error: `"${text}" is not a duration: write a number and a unit (s, m, h, d), e.g. 30m, 1h30m or 7d`,
    };
  }
  return ms;
}

/** One destination the service reached (or tried) outside its policy, from the kernel's record. */
export interface Observed {
  address: string;
  family: Family;
  protocol: Protocol;
  port: number;
  packets: number;
  /** Names the address is known by (the service's own policy names, learned answers). */
  names: string[];
}

/** A name the service looked up while learning, with the addresses it was answered. */
export interface LookedUp {
  name: string;
  addresses: string[];
}

export interface ProposedOutbound {
  rule: OutboundRule;
  /** "name": the service looked the name up and connected to its answer; "address": no name explains it. */
  by: "name" | "address";
  packets: number;
  addresses: string[];
  /** Why the address filter would refuse this (metadata, loopback, the host's own address, ...). */
  flagged?: string;
}

export interface ProposedInbound {
  rule: InboundRule;
  /** The listening sockets that explain it: "8080/tcp (on 0.0.0.0)". */
  seen: string[];
}

export interface Proposal {
  service: string;
  outbound: ProposedOutbound[];
  inbound: ProposedInbound[];
  /** Names looked up, never connected to: not proposed. */
  unused: string[];
}

export interface ProposalInput {
  policy: ServicePolicy;
  observed: readonly Observed[];
  lookedUp: readonly LookedUp[];
  listeners: readonly Listener[];
  /** Why the address filter refuses an address, or null when it may be allowed. */
  refuseReason: (address: string) => string | null;
}

const ruleKey = (r: OutboundRule) => `${r.protocol} ${r.host} ${r.ports}`;

/**
 * The allowlist a learning run proposes, on top of what the policy allows already: for each
 * destination reached outside the policy, the names the service looked up that answered its
 * address (or, when none did, the literal address), with the port and protocol used; and the
 * ports it listens on that no inbound rule declares. Whatever the address filter would refuse is
 * flagged, never silently proposed.
 */
export function propose(input: ProposalInput): Proposal {
  const { policy } = input;
  const namesOf = new Map<string, Set<string>>();
  for (const l of input.lookedUp)
    for (const a of l.addresses) {
      const set = namesOf.get(a) ?? new Set<string>();
      set.add(l.name);
      namesOf.set(a, set);
    }
  // The names an address is known by daemon-wide (any policy's answers, any proxy's) explain a
  // destination only if this service could have looked them up: for a DNS-aware service, the
  // names it looked up itself and its own policy's names; for one that asks the resolver
  // directly, whose lookups egressd does not see, the daemon's names are the best guess.
  const ownNames = new Set(policy.outbound.map((r) => r.host.toLowerCase()));
  const explains = (n: string) => {
    const name = n.toLowerCase();
    if (policy.dns !== "proxy" || ownNames.has(name)) return true;
    return [...ownNames].some((h) => h.startsWith("*.") && name.endsWith(h.slice(1)));
  };
  const existing = new Set(policy.outbound.map(ruleKey));
  const out = new Map<string, ProposedOutbound>();
  const used = new Set<string>();
  for (const o of input.observed) {
    const names = [
      ...new Set([...(namesOf.get(o.address) ?? []), ...o.names.filter(explains)]),
    ].sort();
    const hosts = names.length ? names : [o.address];
    const flagged = input.refuseReason(o.address) ?? undefined;
    for (const host of hosts) {
      used.add(host);
      const rule: OutboundRule = { host, ports: String(o.port), protocol: o.protocol };
      const k = ruleKey(rule);
      if (existing.has(k)) continue;
      const p = out.get(k) ?? {
        rule,
        by: names.length ? ("name" as const) : ("address" as const),
        packets: 0,
        addresses: [],
      };
      p.packets += o.packets;
      if (!p.addresses.includes(o.address)) p.addresses.push(o.address);
      if (flagged && !p.flagged) p.flagged = `${o.address}: ${flagged}`;
      out.set(k, p);
    }
  }
  const outbound = [...out.values()]
    .map((p) => ({ ...p, addresses: sortAddresses(p.addresses) }))
    .sort(
      (a, b) =>
        Number(a.by === "address") - Number(b.by === "address") ||
        a.rule.host.localeCompare(b.rule.host) ||
        Number(a.rule.ports) - Number(b.rule.ports) ||
        a.rule.protocol.localeCompare(b.rule.protocol),
    );
  const undeclared = undeclaredListeners(input.listeners, policy.inbound);
  const inbound = undeclared.map((l) => ({
    rule: { ports: String(l.port), protocol: l.protocol },
    seen: input.listeners
      .filter((x) => x.port === l.port && x.protocol === l.protocol)
      .map(listenerText),
  }));
  const unused = [...new Set(input.lookedUp.map((l) => l.name))]
    .filter((n) => !used.has(n) && !policy.outbound.some((r) => r.host === n))
    .sort();
  return { service: policy.name, outbound, inbound, unused };
}

/**
 * The policy `--apply` writes: the current allowances plus every proposed one that is not
 * flagged, the learning window removed (so the service is enforced in its written mode again).
 */
export function adopt(policy: ServicePolicy, proposal: Proposal): ServicePolicy {
  const { learning: _done, ...rest } = policy;
  void _done;
  return {
    ...rest,
    outbound: [
      ...policy.outbound,
      ...proposal.outbound.filter((p) => !p.flagged).map((p) => p.rule),
    ],
    inbound: [...policy.inbound, ...proposal.inbound.map((p) => p.rule)],
  };
}

/** The proposal for a person: one line per allowance, flagged ones and unused names apart. */
export function proposalText(p: Proposal, learning: string): string {
  const lines = [`${p.service}: ${learning}`];
  const ok = p.outbound.filter((o) => !o.flagged);
  const flagged = p.outbound.filter((o) => o.flagged);
  if (!ok.length && !flagged.length && !p.inbound.length) {
    lines.push(
      "nothing to add: everything it did is allowed already (or nothing was recorded yet)",
    );
  }
  if (ok.length) lines.push("proposed outbound:");
  for (const o of ok)
    lines.push(
      `  allow ${formatTarget(o.rule)}  (${o.packets} packet${o.packets === 1 ? "" : "s"}${o.by === "name" ? `; ${o.addresses.join(", ")}` : "; no name looked up explains this address"})`,
    );
  if (p.inbound.length) lines.push("proposed inbound:");
  for (const i of p.inbound)
    lines.push(
      `  allow-in ${i.rule.ports}${i.rule.protocol === "tcp" ? "" : `/${i.rule.protocol}`}  (listening: ${i.seen.join(", ")})`,
    );
  if (flagged.length) lines.push("flagged, not proposed (allow by address if really meant):");
  for (const o of flagged) lines.push(`  ${formatTarget(o.rule)}  (${o.flagged})`);
  if (p.unused.length) lines.push(`looked up, never connected to: ${p.unused.join(", ")}`);
  return lines.join("\n") + "\n";
}
