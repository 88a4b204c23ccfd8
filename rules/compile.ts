/**
 * The compiler: policy plus resolved and learned addresses in, egressd's nftables table out (pure).
 *
 * Shape (see docs/design.md):
 *   chain output (hook output): guards that keep a DNS-aware service's DNS on its own proxy
 *                               (also in flows another socket opened), a service's replies,
 *                               then established traffic, then a redirected DNS query to the
 *                               sender's own proxy port, then
 *                               meta skuid vmap @uid_dispatch, meta skgid vmap @gid_dispatch
 *   chain dns_redirect (nat):   port 53 of DNS-aware services to their proxy port
 *   chain s_<svc>:              resolvers (system DNS), literal sets, one address set per
 *                               port of its names, the refused record (rules/refused.ts),
 *                               counter, log, reject.
 * The base chains hold the same rules whatever the number of services.
 */
import { sortAddresses } from "./address-filter.ts";
import { parseNet, canonicalAddress, type Family } from "./addresses.ts";
import { disjoint, elementJSON, type Allow } from "./elements.ts";
import { invalid, type Problem } from "./errors.ts";
import { NameMatcher, nameMatches, type NamePattern } from "./name-match.ts";
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
import { recordRules, refusedSets, REFUSED_OFF, type RefusedConfig } from "./refused.ts";
import { stableKey, type ChainDef, type Expr, type Ruleset, type SetDef } from "./ruleset.ts";
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
  /** The loopback port of its DNS proxy (DNS-aware services whose proxy is listening). */
  proxyPort?: number;
  /** Its refuse path records destinations in the refused sets (the table must have them). */
  record?: boolean;
}

/** Addresses a service learned through its own DNS queries: name -> address -> expiry (epoch ms). */
export type Learned = ReadonlyMap<string, ReadonlyMap<string, number>>;

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
  /** What each service's DNS proxy learned, already filtered; absent: nothing. */
  learned?: ReadonlyMap<string, Learned>;
  /** Timed elements kept by set name (found in the kernel, not explained by a name), per service. */
  adopted?: ReadonlyMap<string, ReadonlyMap<string, ReadonlyMap<string, number>>>;
  /** The refused-destination record; absent or size 0: none (no sets, no rules). */
  refused?: RefusedConfig;
}

export const BASE_CHAIN = "output";
export const NAT_CHAIN = "dns_redirect";
export const UID_MAP = "uid_dispatch";
export const GID_MAP = "gid_dispatch";
/** uid -> proxy port (the redirect), and uid . port (who may reach which proxy port). */
export const UID_PROXY = "uid2port";
export const GID_PROXY = "gid2port";
export const UID_PROXY_PORTS = "uid_proxyport";
export const GID_PROXY_PORTS = "gid_proxyport";
/** Owners whose port-53 traffic is redirected, and the proxy ports (the flow-reuse guards). */
export const UID_DNSAWARE = "uid_dnsaware";
export const GID_DNSAWARE = "gid_dnsaware";
export const PROXY_PORTS = "proxy_ports";
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
  return { lit4: `${base}_lit4`, lit6: `${base}_lit6` };
}

/**
 * The set of a service's DNS-derived addresses for one protocol and port range:
 * "s_svc_web_tcp443_4", "s_svc_web_udp8000_8100_6". Unambiguous: every other set suffix
 * is one word, and this one starts with a protocol and ends with a family.
 */
export function nameSet(
  service: string,
  protocol: Protocol,
  ports: PortRange,
  family: Family,
): string {
  const range = ports.low === ports.high ? `${ports.low}` : `${ports.low}_${ports.high}`;
  return `${serviceObject(service)}_${protocol}${range}_${family}`;
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

/** Exact domain allowances of a policy: name, protocol and ports (the names the refresh loop keeps resolved). */
export function domainAllowances(
  policy: ServicePolicy,
): { name: string; protocol: Protocol; ports: PortRange }[] {
  const out = [];
  for (const r of parsed(policy))
    if (r.host.kind === "domain")
      out.push({ name: r.host.name, protocol: r.protocol, ports: r.ports });
  return out;
}

/** Every name allowance, exact or wildcard. */
export function nameAllowances(
  policy: ServicePolicy,
): { pattern: NamePattern; protocol: Protocol; ports: PortRange }[] {
  const out = [];
  for (const r of parsed(policy))
    if (r.host.kind === "domain" || r.host.kind === "wildcard")
      out.push({ pattern: r.host, protocol: r.protocol, ports: r.ports });
  return out;
}

/** The names and wildcards a service may look up (its DNS proxy answers only these). */
export function nameMatcher(policy: ServicePolicy): NameMatcher {
  return new NameMatcher(nameAllowances(policy).map((a) => a.pattern));
}

interface PortClass {
  protocol: Protocol;
  ports: PortRange;
  patterns: NamePattern[];
}

/** Name allowances grouped by protocol and port range, in a stable order. */
function portClasses(policy: ServicePolicy): PortClass[] {
  const byKey = new Map<string, PortClass>();
  for (const a of nameAllowances(policy)) {
    const key = `${a.protocol}/${a.ports.low}-${a.ports.high}`;
    const c = byKey.get(key) ?? { protocol: a.protocol, ports: a.ports, patterns: [] };
    c.patterns.push(a.pattern);
    byKey.set(key, c);
  }
  return [...byKey.values()].sort(
    (a, b) =>
      a.protocol.localeCompare(b.protocol) ||
      a.ports.low - b.ports.low ||
      a.ports.high - b.ports.high,
  );
}

/** `tcp dport 443 ip daddr @set accept`, in the form nft lists it. */
function nameRule(c: PortClass, family: Family, set: string): Expr[] {
  return [
    {
      match: {
        op: "==",
        left: { payload: { protocol: c.protocol, field: "dport" } },
        right: c.ports.low === c.ports.high ? c.ports.low : { range: [c.ports.low, c.ports.high] },
      },
    },
    {
      match: {
        op: "==",
        left: { payload: { protocol: family === 4 ? "ip" : "ip6", field: "daddr" } },
        right: `@${set}`,
      },
    },
    { accept: null },
  ];
}

/**
 * One address set per family and port class. The refresh loop's addresses of the class's exact
 * names are permanent elements; addresses the service's DNS proxy learned for a matching name
 * carry their expiry (the kernel drops them then, with or without egressd).
 */
function nameSets(
  svc: ServiceInput,
  resolutions: CompileInput["resolutions"],
  learned: Learned | undefined,
  adopted?: ReadonlyMap<string, ReadonlyMap<string, number>>,
): { sets: SetDef[]; rules: Expr[][] } {
  const sets: SetDef[] = [];
  const rules: Expr[][] = [];
  for (const c of portClasses(svc.policy)) {
    for (const family of [4, 6] as const) {
      const name = nameSet(svc.policy.name, c.protocol, c.ports, family);
      const permanent = new Set<string>();
      for (const p of c.patterns) {
        if (p.kind !== "domain") continue;
        for (const a of resolutions.get(p.name) ?? []) if (familyOf(a) === family) permanent.add(a);
      }
      const expires: Record<string, number> = {};
      for (const [qname, addresses] of learned ?? []) {
        if (!c.patterns.some((p) => nameMatches(p, qname))) continue;
        for (const [a, until] of addresses) {
          if (familyOf(a) !== family || permanent.has(a)) continue;
          expires[a] = Math.max(expires[a] ?? 0, until);
        }
      }
      for (const [a, until] of adopted?.get(name) ?? []) {
        if (familyOf(a) !== family || permanent.has(a)) continue;
        expires[a] = Math.max(expires[a] ?? 0, until);
      }
      sets.push({
        name,
        type: family === 4 ? "ipv4_addr" : "ipv6_addr",
        flags: ["timeout"],
        elem: sortAddresses([...permanent, ...Object.keys(expires)]),
        ...(Object.keys(expires).length ? { expires } : {}),
      });
      rules.push(nameRule(c, family, name));
    }
  }
  return { sets, rules };
}

const familyOf = (address: string): Family => (address.includes(":") ? 6 : 4);

/** The names of a service's name sets. */
export function nameSetNames(policy: ServicePolicy): Set<string> {
  const out = new Set<string>();
  for (const c of portClasses(policy))
    for (const f of [4, 6] as const) out.add(nameSet(policy.name, c.protocol, c.ports, f));
  return out;
}

/** The name sets of `policy` that an address learned for `name` goes into, by family. */
export function nameSetsFor(policy: ServicePolicy, name: string): Record<Family, string[]> {
  const out: Record<Family, string[]> = { 4: [], 6: [] };
  for (const c of portClasses(policy)) {
    if (!c.patterns.some((p) => nameMatches(p, name))) continue;
    out[4].push(nameSet(policy.name, c.protocol, c.ports, 4));
    out[6].push(nameSet(policy.name, c.protocol, c.ports, 6));
  }
  return out;
}

function serviceChain(
  svc: ServiceInput,
  resolutions: CompileInput["resolutions"],
  learned: Learned | undefined,
  adopted?: ReadonlyMap<string, ReadonlyMap<string, number>>,
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
  const byName = nameSets(svc, resolutions, learned, adopted);
  sets.push(...byName.sets);
  rules.push(...byName.rules);
  const obj = serviceObject(policy.name);
  if (svc.record) rules.push(...recordRules(svc.uid));
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

/** `ct status dnat meta skuid . th dport @uid_proxyport accept` */
function proxyAcceptRule(key: "skuid" | "skgid", set: string): Expr[] {
  return [
    { match: { op: "in", left: { ct: { key: "status" } }, right: "dnat" } },
    {
      match: {
        op: "==",
        left: { concat: [{ meta: { key } }, { payload: { protocol: "th", field: "dport" } }] },
        right: `@${set}`,
      },
    },
    { accept: null },
  ];
}

const ORIGINAL: Expr = {
  match: { op: "==", left: { ct: { key: "direction" } }, right: "original" },
};
const TCP_UDP: Expr = {
  match: { op: "==", left: { meta: { key: "l4proto" } }, right: { set: ["tcp", "udp"] } },
};
const DPORT = { payload: { protocol: "th", field: "dport" } };
const REJECT: Expr = { reject: { type: "icmpx", expr: "admin-prohibited" } };

/**
 * `th dport 53 meta l4proto { tcp, udp } ct direction original meta skuid @uid_dnsaware reject`:
 * a DNS-aware service's packet to port 53 that the nat chain did not redirect. NAT is decided on
 * a flow's first packet only, so this is a packet of a flow another socket opened (the same
 * addresses and ports, bound again): without this rule `ct state established` would accept it,
 * past the proxy, to the real resolver.
 */
function unredirectedDnsRule(key: "skuid" | "skgid", set: string): Expr[] {
  // Every packet of every flow passes here before `ct state established` accepts it: the port
  // comes first, one load and compare that ends the rule for all but DNS packets (the protocol
  // set lookup first cost the packet path a fifth of its rate).
  return [
    { match: { op: "==", left: DPORT, right: 53 } },
    TCP_UDP,
    ORIGINAL,
    { match: { op: "==", left: { meta: { key } }, right: `@${set}` } },
    REJECT,
  ];
}

/**
 * `ct status dnat ct direction original meta l4proto { tcp, udp } th dport @proxy_ports
 * meta skuid . th dport != @uid_proxyport meta skgid . th dport != @gid_proxyport reject`:
 * a packet redirected to a proxy port that is not its sender's own, the same way (a flow
 * another service opened, reused): it would be answered under that other service's policy.
 */
const foreignProxyRule: Expr[] = [
  // dnat first: only redirected DNS is, so the rule ends there for every other packet.
  { match: { op: "in", left: { ct: { key: "status" } }, right: "dnat" } },
  ORIGINAL,
  TCP_UDP,
  { match: { op: "==", left: DPORT, right: `@${PROXY_PORTS}` } },
  ...(["skuid", "skgid"] as const).map((key): Expr => ({
    match: {
      op: "!=",
      left: { concat: [{ meta: { key } }, DPORT] },
      right: `@${key === "skuid" ? UID_PROXY_PORTS : GID_PROXY_PORTS}`,
    },
  })),
  REJECT,
];

/** `meta l4proto { tcp, udp } th dport 53 redirect to :meta skuid map @uid2port` */
function redirectRule(key: "skuid" | "skgid", map: string): Expr[] {
  return [
    { match: { op: "==", left: { meta: { key: "l4proto" } }, right: { set: ["tcp", "udp"] } } },
    { match: { op: "==", left: { payload: { protocol: "th", field: "dport" } }, right: 53 } },
    { redirect: { port: { map: { key: { meta: { key } }, data: `@${map}` } } } },
  ];
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

/**
 * Everything one service contributes to the table: its chains, sets and counters, and its
 * entries in the shared dispatch maps. Compiled on its own, so the daemon recompiles only the
 * services a change touches (and reconcile skips the parts that are the same objects).
 */
export interface ServiceParts {
  name: string;
  chains: ChainDef[];
  sets: SetDef[];
  counters: string[];
  uid: unknown[];
  gid: unknown[];
  uidServe: unknown[];
  gidServe: unknown[];
  ports: unknown[];
  proxyUid: unknown[];
  proxyGid: unknown[];
  proxyUidPorts: unknown[];
  proxyGidPorts: unknown[];
}

/** One service's parts, from its policy, the answers for its names and what its proxy learned. */
export function compileService(
  svc: ServiceInput,
  resolutions: CompileInput["resolutions"],
  learned?: Learned,
  adopted?: ReadonlyMap<string, ReadonlyMap<string, number>>,
): ServiceParts {
  const built = serviceChain(svc, resolutions, learned, adopted);
  const inbound = inboundParts(svc);
  const parts: ServiceParts = {
    name: svc.policy.name,
    chains: [built.chain, ...inbound.chains],
    sets: [...built.sets, ...inbound.sets],
    counters: [built.chain.name, inbound.counter],
    uid: [[svc.uid, { goto: { target: built.chain.name } }]],
    gid: [],
    uidServe: [[svc.uid, { goto: { target: inbound.reply } }]],
    gidServe: [],
    ports: inbound.ports,
    proxyUid: [],
    proxyGid: [],
    proxyUidPorts: [],
    proxyGidPorts: [],
  };
  if (svc.gid !== undefined) {
    parts.gid.push([svc.gid, { goto: { target: built.chain.name } }]);
    parts.gidServe.push([svc.gid, { goto: { target: inbound.reply } }]);
  }
  if (svc.policy.dns === "proxy" && svc.proxyPort !== undefined) {
    parts.proxyUid.push([svc.uid, svc.proxyPort]);
    parts.proxyUidPorts.push({ concat: [svc.uid, svc.proxyPort] });
    if (svc.gid !== undefined) {
      parts.proxyGid.push([svc.gid, svc.proxyPort]);
      parts.proxyGidPorts.push({ concat: [svc.gid, svc.proxyPort] });
    }
  }
  return parts;
}

const ESTABLISHED: Expr[] = [
  { match: { op: "in", left: { ct: { key: "state" } }, right: ["established", "related"] } },
  { accept: null },
];

/** Freezes a value and everything in it (the base chains are shared by every table compiled). */
function deepFreeze<T>(v: T): T {
  if (v && typeof v === "object" && !Object.isFrozen(v)) {
    Object.freeze(v);
    for (const x of Object.values(v)) deepFreeze(x);
  }
  return v;
}

/** The base chains: the same objects every time (reconcile skips what is identical). */
const OUTPUT: ChainDef = deepFreeze({
  name: BASE_CHAIN,
  base: { type: "filter", hook: "output", prio: 0, policy: "accept" },
  rules: [
    // A DNS-aware service's DNS goes to its own proxy, even in a flow another socket opened.
    unredirectedDnsRule("skuid", UID_DNSAWARE),
    unredirectedDnsRule("skgid", GID_DNSAWARE),
    foreignProxyRule,
    // A managed service's answers: only from ports it declared (its SYN-ACK counts as established).
    serveDispatchRule("skuid", UID_SERVE),
    serveDispatchRule("skgid", GID_SERVE),
    ESTABLISHED,
    // A DNS query redirected to the sender's own proxy port (and only that way, only its own).
    proxyAcceptRule("skuid", UID_PROXY_PORTS),
    proxyAcceptRule("skgid", GID_PROXY_PORTS),
    [{ vmap: { key: { meta: { key: "skuid" } }, data: `@${UID_MAP}` } }],
    [{ vmap: { key: { meta: { key: "skgid" } }, data: `@${GID_MAP}` } }],
  ],
});
const REDIRECT: ChainDef = deepFreeze({
  name: NAT_CHAIN,
  base: { type: "nat", hook: "output", prio: -100, policy: "accept" },
  rules: [redirectRule("skuid", UID_PROXY), redirectRule("skgid", GID_PROXY)],
});
const INPUT: ChainDef = deepFreeze({
  name: IN_CHAIN,
  base: { type: "filter", hook: "input", prio: 0, policy: "accept" },
  rules: [ESTABLISHED, inDispatchRule],
});

/** What each assembled table was assembled from (to reuse its shared sets next time). */
const assembledFrom = new WeakMap<
  Ruleset,
  {
    parts: readonly ServiceParts[];
    resolvers: readonly ResolverAddr[];
    refused: RefusedConfig;
    shared: number;
  }
>();
const OWN_FIELDS = new Set(["name", "chains", "sets", "counters"]);
/** A part's share of the shared sets (its dispatch and proxy entries), as one string. */
const shareKeys = new WeakMap<ServiceParts, string>();
function shareKey(p: ServiceParts): string {
  const known = shareKeys.get(p);
  if (known !== undefined) return known;
  // Every field but the service's own objects is its share of the shared sets.
  const k = stableKey(Object.entries(p).filter(([f]) => !OWN_FIELDS.has(f)));
  shareKeys.set(p, k);
  return k;
}

/** Whether `a` and `b` (sorted by name) give the shared sets the same elements. */
function sameShares(a: readonly ServiceParts[], b: readonly ServiceParts[]): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) {
    const x = a[i] as ServiceParts;
    const y = b[i] as ServiceParts;
    if (x !== y && (x.name !== y.name || shareKey(x) !== shareKey(y))) return false;
  }
  return true;
}

/**
 * The whole table from the services' parts (ordered by service name, so the output is
 * deterministic): shared maps, resolver sets and base chains around them. Checks nothing:
 * callers check owners and inbound ports first (compile does). Given the `previous` table
 * assembled, and no part's share of the shared maps changed (a service recompiled for a new
 * address, say), the shared sets are `previous`'s very objects, which reconcile skips.
 */
export function assemble(
  table: string,
  resolvers: readonly ResolverAddr[],
  parts: readonly ServiceParts[],
  previous?: Ruleset | null,
  refused: RefusedConfig = REFUSED_OFF,
): Ruleset {
  const sorted = [...parts].sort((a, b) => a.name.localeCompare(b.name));
  const from = previous ? assembledFrom.get(previous) : undefined;
  const reuse =
    previous?.table === table &&
    from !== undefined &&
    from.resolvers === resolvers &&
    from.refused.size === refused.size &&
    from.refused.timeoutSeconds === refused.timeoutSeconds &&
    sameShares(sorted, from.parts);
  const sets: SetDef[] = reuse
    ? previous.sets.slice(0, from.shared)
    : [...sharedSets(resolvers, sorted), ...refusedSets(refused)];
  const shared = sets.length;
  for (const p of sorted) sets.push(...p.sets);
  const r: Ruleset = {
    family: "inet",
    table,
    counters: sorted.flatMap((p) => p.counters),
    sets,
    chains: [OUTPUT, INPUT, REDIRECT, ...sorted.flatMap((p) => p.chains)],
  };
  assembledFrom.set(r, { parts: sorted, resolvers, refused, shared });
  return r;
}

/** The maps and sets every service has entries in, and the resolver sets. */
function sharedSets(resolvers: readonly ResolverAddr[], sorted: readonly ServiceParts[]): SetDef[] {
  const all = (k: keyof Omit<ServiceParts, "name" | "chains" | "sets" | "counters">) =>
    sorted.flatMap((p) => p[k]);
  const byKey = (a: unknown, b: unknown) => (a as [number])[0] - (b as [number])[0];
  const byConcat = (a: unknown, b: unknown) =>
    (a as { concat: [number] }).concat[0] - (b as { concat: [number] }).concat[0];
  const keys = (elems: unknown[]) => (elems as [number, number][]).map(([id]) => id);
  const proxyUid = all("proxyUid").sort(byKey);
  const proxyGid = all("proxyGid").sort(byKey);
  const proxyPorts = [
    ...new Set([...proxyUid, ...proxyGid].map((e) => (e as [number, number])[1])),
  ].sort((a, b) => a - b);
  const sets: SetDef[] = [
    { name: UID_DNSAWARE, type: "uid", elem: keys(proxyUid) },
    { name: GID_DNSAWARE, type: "gid", elem: keys(proxyGid) },
    { name: PROXY_PORTS, type: "inet_service", elem: proxyPorts },
    { name: UID_PROXY, type: "uid", map: "inet_service", elem: proxyUid },
    { name: GID_PROXY, type: "gid", map: "inet_service", elem: proxyGid },
    {
      name: UID_PROXY_PORTS,
      type: ["uid", "inet_service"],
      elem: all("proxyUidPorts").sort(byConcat),
    },
    {
      name: GID_PROXY_PORTS,
      type: ["gid", "inet_service"],
      elem: all("proxyGidPorts").sort(byConcat),
    },
    { name: UID_MAP, type: "uid", map: "verdict", elem: all("uid").sort(byKey) },
    { name: GID_MAP, type: "gid", map: "verdict", elem: all("gid").sort(byKey) },
    { name: UID_SERVE, type: "uid", map: "verdict", elem: all("uidServe").sort(byKey) },
    { name: GID_SERVE, type: "gid", map: "verdict", elem: all("gidServe").sort(byKey) },
    {
      name: IN_DISPATCH,
      type: ["inet_proto", "inet_service"],
      map: "verdict",
      flags: ["interval"],
      elem: all("ports"),
    },
    concatSet(resolverSet(4), 4, resolverAllows(resolvers, 4)),
    concatSet(resolverSet(6), 6, resolverAllows(resolvers, 6)),
  ];
  return sets;
}

/** Compiles the whole table. */
export function compile(input: CompileInput): Ruleset {
  checkDistinctOwners(input.services);
  checkInboundOverlap(input.services.map((s) => s.policy));
  const refused = input.refused ?? REFUSED_OFF;
  const record = refused.size > 0;
  return assemble(
    input.table,
    input.resolvers,
    input.services.map((svc) =>
      compileService(
        (svc.record ?? false) === record ? svc : { ...svc, record },
        input.resolutions,
        input.learned?.get(svc.policy.name),
        input.adopted?.get(svc.policy.name),
      ),
    ),
    null,
    refused,
  );
}
