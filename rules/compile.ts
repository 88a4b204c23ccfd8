/**
 * The compiler: policy plus resolved addresses in, egressd's nftables table out (pure).
 *
 * Shape (see docs/design.md):
 *   chain output (hook output): ct state established,related accept
 *                               meta skuid vmap @uid_dispatch
 *                               meta skgid vmap @gid_dispatch
 *   chain s_<svc>: resolvers, literal sets, DNS-derived sets, counter, log, reject.
 * The base chain holds the same three rules whatever the number of services.
 */
import { parseNet, canonicalAddress, type Family } from "./addresses.ts";
import { disjoint, elementJSON, type Allow } from "./elements.ts";
import { invalid, type Problem } from "./errors.ts";
import type { ServicePolicy } from "./policy.ts";
import {
  checkInboundOverlap,
  GID_SERVE,
  IN_CHAIN,
  IN_DISPATCH,
  inboundObjects,
  inDispatchRule,
  portElements,
  serveDispatchRule,
  servedRule,
  sourceElements,
  sourceRule,
  UID_SERVE,
} from "./inbound.ts";
import type { ChainDef, Expr, Ruleset, SetDef } from "./ruleset.ts";
import {
  parseHost,
  parsePorts,
  type HostSpec,
  type OutboundRule,
  type PortRange,
  type Protocol,
} from "./target.ts";

export interface ServiceInput {
  policy: ServicePolicy;
  uid: number;
  gid?: number;
}

export interface ResolverAddr {
  address: string;
  family: Family;
  port: number;
}

export interface CompileInput {
  table: string;
  resolvers: readonly ResolverAddr[];
  services: readonly ServiceInput[];
  /** Allowed addresses of each domain name, already filtered (see dns). */
  resolutions: ReadonlyMap<string, readonly string[]>;
}

export const BASE_CHAIN = "output";
export const UID_MAP = "uid_dispatch";
export const GID_MAP = "gid_dispatch";
export const LOG_RATE = { rate: 5, per: "second", burst: 10 } as const;

const CONCAT_TYPE: Record<Family, string[]> = {
  4: ["ipv4_addr", "inet_proto", "inet_service"],
  6: ["ipv6_addr", "inet_proto", "inet_service"],
};

/** nft object name of a service: "svc-web" -> "s_svc_web". Injective: service names have no "_". */
export function serviceObject(service: string): string {
  return `s_${service.replace(/-/g, "_")}`;
}

export function serviceSets(service: string) {
  const base = serviceObject(service);
  return {
    lit4: `${base}_lit4`,
    lit6: `${base}_lit6`,
    dns4: `${base}_dns4`,
    dns6: `${base}_dns6`,
  };
}

export const resolverSet = (family: Family) => `resolvers${family}`;

/** `ip daddr . meta l4proto . th dport @set accept` */
export function allowRule(family: Family, set: string): Expr[] {
  return [
    {
      match: {
        op: "==",
        left: {
          concat: [
            { payload: { protocol: family === 4 ? "ip" : "ip6", field: "daddr" } },
            { meta: { key: "l4proto" } },
            { payload: { protocol: "th", field: "dport" } },
          ],
        },
        right: `@${set}`,
      },
    },
    { accept: null },
  ];
}

function concatSet(name: string, family: Family, allows: Allow[]): SetDef {
  return {
    name,
    type: CONCAT_TYPE[family],
    flags: ["interval"],
    elem: disjoint(allows).map(elementJSON),
  };
}

/** Allowances from literal addresses and networks, by family. */
type ParsedRule = { host: HostSpec; protocol: Protocol; ports: PortRange };
const parsedRules = new WeakMap<readonly OutboundRule[], ParsedRule[]>();

/** A policy's outbound rules, parsed once per policy object (compiling parses each rule several times otherwise). */
function parsed(policy: ServicePolicy): ParsedRule[] {
  let rules = parsedRules.get(policy.outbound);
  if (!rules) {
    rules = [];
    for (const o of policy.outbound) {
      const host = parseHost(o.host);
      const ports = parsePorts(o.ports);
      if (!("error" in host) && !("error" in ports))
        rules.push({ host, protocol: o.protocol, ports });
    }
    parsedRules.set(policy.outbound, rules);
  }
  return rules;
}

function literalAllows(policy: ServicePolicy): Record<Family, Allow[]> {
  const out: Record<Family, Allow[]> = { 4: [], 6: [] };
  for (const r of parsed(policy)) {
    if (r.host.kind === "net")
      out[r.host.family].push({ range: r.host.range, protocol: r.protocol, ports: r.ports });
  }
  return out;
}

/** Domain allowances of a policy: name, protocol and ports. */
export function domainAllowances(
  policy: ServicePolicy,
): { name: string; protocol: Protocol; ports: PortRange }[] {
  const out = [];
  for (const r of parsed(policy))
    if (r.host.kind === "domain")
      out.push({ name: r.host.name, protocol: r.protocol, ports: r.ports });
  return out;
}

/** Elements of a service's DNS-derived sets from the current resolutions. */
export function dnsSetElements(
  policy: ServicePolicy,
  resolutions: ReadonlyMap<string, readonly string[]>,
): Record<Family, unknown[]> {
  const allows: Record<Family, Allow[]> = { 4: [], 6: [] };
  for (const d of domainAllowances(policy)) {
    for (const address of resolutions.get(d.name) ?? []) {
      const net = parseNet(address);
      if ("error" in net) continue;
      allows[net.family].push({ range: net.range, protocol: d.protocol, ports: d.ports });
    }
  }
  return { 4: disjoint(allows[4]).map(elementJSON), 6: disjoint(allows[6]).map(elementJSON) };
}

function serviceChain(
  svc: ServiceInput,
  resolutions: CompileInput["resolutions"],
): { chain: ChainDef; sets: SetDef[] } {
  const { policy } = svc;
  const names = serviceSets(policy.name);
  const rules: Expr[][] = [];
  const sets: SetDef[] = [];
  if (policy.dns === "system") {
    rules.push(allowRule(4, resolverSet(4)), allowRule(6, resolverSet(6)));
  }
  const literal = literalAllows(policy);
  for (const family of [4, 6] as const) {
    if (!literal[family].length) continue;
    const name = family === 4 ? names.lit4 : names.lit6;
    sets.push(concatSet(name, family, literal[family]));
    rules.push(allowRule(family, name));
  }
  if (domainAllowances(policy).length) {
    const elements = dnsSetElements(policy, resolutions);
    for (const family of [4, 6] as const) {
      const name = family === 4 ? names.dns4 : names.dns6;
      sets.push({ name, type: CONCAT_TYPE[family], flags: ["interval"], elem: elements[family] });
      rules.push(allowRule(family, name));
    }
  }
  const obj = serviceObject(policy.name);
  rules.push(...refusal(obj, `egressd ${verb(policy)} ${policy.name}: `, policy.mode, "reject"));
  return { chain: { name: obj, rules }, sets };
}

const verb = (p: ServicePolicy) => (p.mode === "audit" ? "audit" : "reject");

/**
 * The end of every service chain: count, log (rate-limited, prefix naming the service), then
 * refuse (TCP reset, else ICMP admin-prohibited; or a plain drop) or, in audit mode, accept.
 */
function refusal(
  counter: string,
  prefix: string,
  mode: ServicePolicy["mode"],
  how: "reject" | "drop",
): Expr[][] {
  const rules: Expr[][] = [[{ counter }], [{ limit: { ...LOG_RATE } }, { log: { prefix } }]];
  if (mode === "audit") rules.push([{ accept: null }]);
  else if (how === "drop") rules.push([{ drop: null }]);
  else {
    rules.push([
      { match: { op: "==", left: { meta: { key: "l4proto" } }, right: "tcp" } },
      { reject: { type: "tcp reset" } },
    ]);
    rules.push([{ reject: { type: "icmpx", expr: "admin-prohibited" } }]);
  }
  return rules;
}

/** A service's inbound objects: the source check for its ports, and the check on its replies. */
function inboundParts(svc: ServiceInput): {
  chains: ChainDef[];
  sets: SetDef[];
  ports: unknown[];
  counter: string;
  reply: string;
} {
  const { policy } = svc;
  const o = inboundObjects(serviceObject(policy.name));
  const chains: ChainDef[] = [];
  const sets: SetDef[] = [];
  const declared = policy.inbound.flatMap((r) => {
    const ports = parsePorts(r.ports);
    return "error" in ports ? [] : [{ protocol: r.protocol, ports }];
  });
  const replyRules: Expr[][] = [];
  if (declared.length) {
    sets.push(
      {
        name: o.from4,
        type: ["inet_proto", "inet_service", "ipv4_addr"],
        flags: ["interval"],
        elem: sourceElements(policy.inbound, 4),
      },
      {
        name: o.from6,
        type: ["inet_proto", "inet_service", "ipv6_addr"],
        flags: ["interval"],
        elem: sourceElements(policy.inbound, 6),
      },
      {
        name: o.served,
        type: ["inet_proto", "inet_service"],
        flags: ["interval"],
        elem: portElements(declared),
      },
    );
    chains.push({
      name: o.input,
      rules: [
        sourceRule(4, o.from4),
        sourceRule(6, o.from6),
        ...refusal(o.counter, `egressd ${verb(policy)}-in ${policy.name}: `, policy.mode, "reject"),
      ],
    });
    replyRules.push(servedRule(o.served));
  }
  replyRules.push(
    ...refusal(o.counter, `egressd ${verb(policy)}-serve ${policy.name}: `, policy.mode, "drop"),
  );
  chains.push({ name: o.reply, rules: replyRules });
  const ports = portElements(declared).map((k) => [k, { goto: { target: o.input } }]);
  return { chains, sets, ports, counter: o.counter, reply: o.reply };
}

function resolverAllows(resolvers: readonly ResolverAddr[], family: Family): Allow[] {
  const out: Allow[] = [];
  for (const r of resolvers) {
    const addr = canonicalAddress(r.address);
    const net = addr && parseNet(addr.text);
    if (!net || "error" in net || net.family !== family) continue;
    for (const protocol of ["udp", "tcp"] as const) {
      out.push({ range: net.range, protocol, ports: { low: r.port, high: r.port } });
    }
  }
  return out;
}

/** Checks that no two services claim the same uid or gid. */
export function checkDistinctOwners(services: readonly ServiceInput[]): void {
  const problems: Problem[] = [];
  for (const key of ["uid", "gid"] as const) {
    const owner = new Map<number, string>();
    for (const s of services) {
      const id = s[key];
      if (id === undefined) continue;
      const other = owner.get(id);
      if (other !== undefined) {
        problems.push({
          where: `service ${s.policy.name}`,
          text: `${key} ${id} is already used by service ${other}: each service needs its own ${key === "uid" ? "user" : "group"}`,
        });
      } else owner.set(id, s.policy.name);
    }
  }
  if (problems.length)
    throw invalid("ERR_EGRESS_ID_CONFLICT", "two services share an owner", problems);
}

/** Compiles the whole table. Services are ordered by name so output is deterministic. */
export function compile(input: CompileInput): Ruleset {
  const services = [...input.services].sort((a, b) => a.policy.name.localeCompare(b.policy.name));
  checkDistinctOwners(services);
  checkInboundOverlap(services.map((s) => s.policy));
  const sets: SetDef[] = [
    concatSet(resolverSet(4), 4, resolverAllows(input.resolvers, 4)),
    concatSet(resolverSet(6), 6, resolverAllows(input.resolvers, 6)),
  ];
  const chains: ChainDef[] = [];
  const counters: string[] = [];
  const elems = {
    uid: [] as unknown[],
    gid: [] as unknown[],
    uidServe: [] as unknown[],
    gidServe: [] as unknown[],
    ports: [] as unknown[],
  };
  for (const svc of services) {
    const built = serviceChain(svc, input.resolutions);
    const inbound = inboundParts(svc);
    chains.push(built.chain, ...inbound.chains);
    sets.push(...built.sets, ...inbound.sets);
    counters.push(built.chain.name, inbound.counter);
    elems.ports.push(...inbound.ports);
    elems.uid.push([svc.uid, { goto: { target: built.chain.name } }]);
    elems.uidServe.push([svc.uid, { goto: { target: inbound.reply } }]);
    if (svc.gid !== undefined) {
      elems.gid.push([svc.gid, { goto: { target: built.chain.name } }]);
      elems.gidServe.push([svc.gid, { goto: { target: inbound.reply } }]);
    }
  }
  const byKey = (a: unknown, b: unknown) => (a as [number])[0] - (b as [number])[0];
  sets.unshift(
    { name: UID_MAP, type: "uid", map: "verdict", elem: elems.uid.sort(byKey) },
    { name: GID_MAP, type: "gid", map: "verdict", elem: elems.gid.sort(byKey) },
    { name: UID_SERVE, type: "uid", map: "verdict", elem: elems.uidServe.sort(byKey) },
    { name: GID_SERVE, type: "gid", map: "verdict", elem: elems.gidServe.sort(byKey) },
    {
      name: IN_DISPATCH,
      type: ["inet_proto", "inet_service"],
      map: "verdict",
      flags: ["interval"],
      elem: elems.ports,
    },
  );
  const established: Expr[] = [
    { match: { op: "in", left: { ct: { key: "state" } }, right: ["established", "related"] } },
    { accept: null },
  ];
  const output: ChainDef = {
    name: BASE_CHAIN,
    base: { type: "filter", hook: "output", prio: 0, policy: "accept" },
    rules: [
      // A managed service's answers first: only from ports it declared (its SYN-ACK counts as established).
      serveDispatchRule("skuid", UID_SERVE),
      serveDispatchRule("skgid", GID_SERVE),
      established,
      [{ vmap: { key: { meta: { key: "skuid" } }, data: `@${UID_MAP}` } }],
      [{ vmap: { key: { meta: { key: "skgid" } }, data: `@${GID_MAP}` } }],
    ],
  };
  const inputChain: ChainDef = {
    name: IN_CHAIN,
    base: { type: "filter", hook: "input", prio: 0, policy: "accept" },
    rules: [established, inDispatchRule],
  };
  return {
    family: "inet",
    table: input.table,
    counters,
    sets,
    chains: [output, inputChain, ...chains],
  };
}
