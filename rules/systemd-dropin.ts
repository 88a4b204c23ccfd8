/**
 * A systemd drop-in derived from a service's policy (pure): the same allowlist, expressed in
 * what systemd can enforce per unit (User=, RestrictAddressFamilies=, cgroup BPF address and
 * bind filters, InaccessiblePaths=), next to egressd's nftables rules. docs/systemd.md explains
 * every choice made here.
 */
import { parseNet } from "./addresses.ts";
import type { ResolverAddr } from "./compile.ts";
import { serviceObject } from "./compile.ts";
import { EgressError } from "./errors.ts";
import type { ServicePolicy } from "./policy.ts";

/** What the generator needs to know about the host's systemd and name service. */
export interface SystemdHostFacts {
  /** systemd's version (252 for "systemd 252 (252.39-1~deb12u2)"), or null when not found. */
  version: number | null;
  /** Built with the BPF framework (+BPF_FRAMEWORK), which SocketBindAllow= needs; null: unknown. */
  bpfFramework: boolean | null;
  /** /etc/nsswitch.conf's hosts line consults nss-resolve (systemd-resolved over varlink). */
  nssResolve: boolean;
}

export interface DropInInput {
  policy: ServicePolicy;
  unit: string;
  uid: number;
  gid?: number;
  /** The resolvers egressd lets "system" services reach (the config's, else resolv.conf's). */
  resolvers: readonly ResolverAddr[];
  /** egressd's nftables table (for NFTSet=). */
  table: string;
  /** refresh.allowPrivateAddresses: when false, DNS never yields private addresses. */
  allowPrivateAddresses: boolean;
  host: SystemdHostFacts;
  /** Add the sandboxing of HARDENING. */
  harden?: boolean;
  /** The unit runs rootless containers (podman with slirp4netns or pasta) as the service user. */
  rootlessContainers?: boolean;
}

export interface Directive {
  section: "Unit" | "Service";
  key: string;
  value: string;
}

/** How the unit's cgroup address filter (IPAddressAllow=/IPAddressDeny=) came out. */
export type AddressFilterMode =
  /** IPAddressDeny=any plus the policy's addresses: everything else is refused by both layers. */
  | "allowlist"
  /** The policy allows names: only addresses DNS can never yield for it are denied here. */
  | "partial"
  /** No address filter at this layer (see `reason`); nftables does all address filtering. */
  | "off";

export interface DropIn {
  service: string;
  unit: string;
  uid: number;
  gid?: number;
  families: string[] | null;
  addressFilter: { mode: AddressFilterMode; allow: string[]; deny: string[]; reason: string };
  bind: { allow: string[]; deny: string[]; enforcedByThisHost: boolean | null } | null;
  inaccessiblePaths: string[];
  nftSet: { supportedByThisHost: boolean | null; suggestion: string | null };
  hardened: boolean;
  directives: Directive[];
  /** The drop-in file. */
  text: string;
}

/** The file name under <unit>.d/: 50 leaves room for local drop-ins before and after. */
export const DROPIN_FILE = "50-egressd.conf";

/** nss-resolve's varlink socket: lookups through it are sent by systemd-resolved, not by the service. */
export const RESOLVED_VARLINK = "/run/systemd/resolve/io.systemd.Resolve";
/** glibc's nscd socket: lookups through it are sent by nscd. */
export const NSCD_SOCKET = "/run/nscd/socket";

/** systemd version that added NFTSet= for units. */
export const NFTSET_SINCE = 255;

/**
 * Sandboxing added by --harden: settings that confine a network daemon without taking away
 * anything it needs to serve and connect. What is left out, and why, is in docs/systemd.md.
 */
export const HARDENING: readonly (readonly [string, string])[] = [
  ["NoNewPrivileges", "yes"],
  ["ProtectSystem", "strict"],
  ["ProtectHome", "yes"],
  ["PrivateTmp", "yes"],
  ["ProtectKernelTunables", "yes"],
  ["ProtectKernelModules", "yes"],
  ["ProtectKernelLogs", "yes"],
  ["ProtectControlGroups", "yes"],
  ["ProtectHostname", "yes"],
  ["ProtectProc", "invisible"],
  ["RestrictNamespaces", "yes"],
  ["RestrictRealtime", "yes"],
  ["RestrictSUIDSGID", "yes"],
  ["LockPersonality", "yes"],
  ["SystemCallArchitectures", "native"],
];

/**
 * Addresses egressd never lets DNS answers allow (SPEC §5): with names in the policy the
 * cgroup filter can still refuse these, as systemd's own keywords and literals.
 */
const NEVER_FROM_DNS = [
  "0.0.0.0/8",
  "localhost",
  "link-local",
  "multicast",
  "::/128",
  "100.100.100.200",
  "168.63.129.16",
  "fd00:ec2::254",
];
/** Private, unique-local and shared space: refused from DNS when allowPrivateAddresses is false. */
const PRIVATE = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7"];

/** Where DNS redirected to egressd's proxy lands (NFTABLES-NOTES: 127.0.0.1 / ::1). */
const PROXY_ADDRESSES = ["127.0.0.1", "::1"];

/** SocketBindAllow=/SocketBindDeny= accept at most this many assignments each. */
const MAX_BIND_RULES = 128;

const UNIT_NAME = /^[A-Za-z0-9:_.\\-]+(@[A-Za-z0-9:_.\\-]*)?\.service$/;

/** Checks a unit name given to --unit; returns why it is not a service unit name, or null. */
export function unitNameError(name: string): string | null {
  if (!name.endsWith(".service")) {
    const base = name.replace(/\.[a-z]+$/, "");
    return `not a service unit: the name ends in .service, e.g. ${base || "web"}.service`;
  }
  if (name.length > 255) return "unit names are at most 255 characters";
  if (!UNIT_NAME.test(name)) {
    return "unit names are letters, digits and : _ . - \\, with at most one @ before the instance (web.service, web@.service, web@blue.service)";
  }
  return null;
}

/** Parses `systemctl --version` (or `systemd-analyze --version`) output. */
export function parseSystemdVersion(
  text: string,
): Pick<SystemdHostFacts, "version" | "bpfFramework"> {
  const m = /^systemd (\d+)/m.exec(text);
  const features = /(?:^|\s)([+-])BPF_FRAMEWORK(?:\s|$)/.exec(text);
  return {
    version: m ? Number(m[1]) : null,
    bpfFramework: features ? features[1] === "+" : null,
  };
}

/** Whether an nsswitch.conf text's hosts line consults nss-resolve. */
export function nsswitchUsesResolve(text: string): boolean {
  for (const line of text.split("\n")) {
    const m = /^\s*hosts\s*:(.*)$/.exec(line.replace(/#.*/, ""));
    if (m?.[1]) return m[1].split(/\s+/).includes("resolve");
  }
  return false;
}

const uniq = (xs: readonly string[]) => [...new Set(xs)];

/** Splits a comment paragraph into lines of at most `width` characters (long words stay whole). */
function wrap(text: string, width = 90): string[] {
  const lines: string[] = [];
  let line = "";
  for (const word of text.split(/\s+/).filter(Boolean)) {
    if (line && line.length + 1 + word.length > width) {
      lines.push(line);
      line = word;
    } else line = line ? `${line} ${word}` : word;
  }
  if (line) lines.push(line);
  return lines;
}

/** The network-related facts of a policy, as the drop-in needs them. */
function analyse(policy: ServicePolicy) {
  const literals: string[] = [];
  const names: string[] = [];
  for (const o of policy.outbound) {
    const net = parseNet(o.host);
    if ("error" in net) names.push(o.host);
    else literals.push(net.canonical);
  }
  const openInbound = policy.inbound.filter((r) => !r.from?.length);
  const sources = policy.inbound.flatMap((r) => r.from ?? []);
  const network = policy.outbound.length > 0 || policy.inbound.length > 0 || policy.dns !== "none";
  return {
    literals: uniq(literals),
    names: uniq(names),
    openInbound,
    sources: uniq(sources),
    network,
  };
}

/** Builds the drop-in for one service and unit. Throws EgressError when it cannot be expressed. */
export function dropIn(input: DropInInput): DropIn {
  const { policy, unit, host } = input;
  const containers = Boolean(input.rootlessContainers);
  if (containers && input.harden) {
    throw new EgressError(
      "ERR_EGRESS_SYSTEMD_OPTIONS",
      "--harden and --rootless-containers do not go together",
      {
        hint: "rootless podman needs user namespaces, setuid id mappers (newuidmap) and its own /proc and cgroup mounts, which --harden takes away; confine the containers with podman's options instead",
      },
    );
  }
  const a = analyse(policy);
  const out: string[] = [];
  const directives: Directive[] = [];
  const set = (key: string, value: string, section: Directive["section"] = "Service") => {
    directives.push({ section, key, value });
    out.push(`${key}=${value}`);
  };
  /** An empty assignment first: the policy's list replaces the unit's own, not adds to it. */
  const replace = (key: string, values: readonly string[]) => {
    set(key, "");
    for (const v of values) set(key, v);
  };
  const comment = (...paragraphs: string[]) =>
    out.push(...paragraphs.flatMap((p) => wrap(p).map((l) => `# ${l}`)));
  const blank = () => out.push("");

  const dnsAddresses = input.resolvers.map((r) => r.address);
  const proxy = policy.dns === "proxy";

  const flags = `${input.harden ? " --harden" : ""}${containers ? " --rootless-containers" : ""}`;
  comment(
    `Generated by egressctl from the egressd policy of service ${policy.name}. Regenerate instead of editing: egressctl systemd ${policy.name} --unit ${unit}${flags} --write`,
    "Local changes belong in a later drop-in (60-local.conf); lists there add to these.",
  );
  out.push("#");
  comment(
    "Two layers enforce one policy: systemd's settings below hold every process of this unit (cgroup BPF address and bind filters where the policy can be expressed that way); egressd's nftables rules hold every socket of the service's user, by destination, port and protocol, keep allowed names resolved and see DNS.",
  );

  // [Unit]: only for proxy mode, so resolved's socket exists (and is hidden) when the unit starts.
  if (proxy) {
    out.push("", "[Unit]");
    comment(
      "Start after systemd-resolved (if it runs here), so the socket hidden below exists by then.",
    );
    set("After", "systemd-resolved.service", "Unit");
  }

  out.push("", "[Service]");
  comment(
    `egressd knows this service by its sockets' owner: uid ${input.uid}${input.gid !== undefined ? `, gid ${input.gid}` : ""}.`,
  );
  set("User", String(policy.user));
  if (policy.group !== undefined) set("Group", String(policy.group));

  const audit = policy.mode === "audit";
  let families: string[] | null = null;
  let addressFilter: DropIn["addressFilter"];
  let bind: DropIn["bind"] = null;

  if (audit) {
    blank();
    comment(
      "The policy is in audit mode: egressd counts what it would refuse and lets it through. systemd cannot count and allow, so the address family, address and bind filters are left out until the policy is enforced (egressctl register ... --mode enforce).",
    );
    addressFilter = { mode: "off", allow: [], deny: [], reason: "audit mode" };
  } else {
    families = a.network ? ["AF_UNIX", "AF_INET", "AF_INET6"] : ["AF_UNIX"];
    if (containers) families.push("AF_NETLINK");
    blank();
    comment(
      a.network
        ? "AF_UNIX for local IPC and logging; AF_INET and AF_INET6 because the policy allows network traffic (both: names resolve to either, and dual-stack listeners use AF_INET6)." +
            (containers
              ? ""
              : " No AF_NETLINK: glibc's getaddrinfo() works without it (it then assumes both families are configured); a daemon that lists interfaces needs it in a 60-local.conf.")
        : "AF_UNIX only: the policy allows no network traffic at all (no allowances, dns none).",
      ...(containers
        ? ["AF_NETLINK: slirp4netns and pasta configure the container's interface over netlink."]
        : []),
    );
    replace("RestrictAddressFamilies", [families.join(" ")]);

    blank();
    addressFilter = addressSection(input, a, containers, dnsAddresses, set, replace, comment);
    if (!containers) bind = bindSection(input, host, set, replace, comment, blank);
    else {
      blank();
      comment(
        "No SocketBindAllow=/SocketBindDeny=: bind filters apply to every bind() in this unit's cgroup, whatever its network namespace, so they would also judge the ports the containers listen on inside their own namespaces.",
      );
    }
  }

  const inaccessiblePaths: string[] = [];
  if (proxy) {
    blank();
    comment(
      (host.nssResolve
        ? "This host's /etc/nsswitch.conf resolves names through systemd-resolved (nss-resolve), so"
        : "This host's /etc/nsswitch.conf does not use nss-resolve now; if it ever does,") +
        " glibc hands lookups to systemd-resolved (or nscd) over these sockets, the query leaves as their user, and egressd's DNS proxy for this service never sees it. With the sockets hidden, glibc falls back to plain DNS on port 53, which egressd redirects to the proxy. (\"-\": the path may not exist.) resolved's D-Bus API remains; applications do not resolve names through it.",
    );
    for (const p of [RESOLVED_VARLINK, NSCD_SOCKET]) {
      inaccessiblePaths.push(p);
      set("InaccessiblePaths", `-${p}`);
    }
  }

  blank();
  const nftSupported = host.version === null ? null : host.version >= NFTSET_SINCE;
  let suggestion: string | null = null;
  if (nftSupported) {
    const base = serviceObject(policy.name);
    suggestion = `NFTSet=user:inet:${input.table}:${base}_unit_uid cgroup:inet:${input.table}:${base}_unit_cgroup`;
    comment(
      `systemd ${host.version} can put this unit's uid and cgroup into egressd's table when it starts, so both layers agree on who the service is even with DynamicUser=. Left commented: egressd does not create these sets yet (docs/systemd.md, "NFTSet= and cgroups").`,
    );
    out.push(`#${suggestion}`);
  } else {
    comment(
      host.version === null
        ? `NFTSet= (systemd ${NFTSET_SINCE} and later) not offered: systemd was not found on this host.`
        : `NFTSet= (systemd ${NFTSET_SINCE} and later) not offered: this host has systemd ${host.version}.`,
    );
  }

  if (input.harden) {
    blank();
    comment(
      '--harden: sandboxing a network daemon does not need to give up (docs/systemd.md, "Hardening"). ProtectSystem=strict leaves the file system read-only except the unit\'s StateDirectory=, CacheDirectory=, LogsDirectory=, RuntimeDirectory= and ReadWritePaths=: declare what the service writes, in the unit or a 60-local.conf.',
    );
    for (const [k, v] of HARDENING) set(k, v);
    if (!a.network && !audit) {
      comment("No network allowances: a private network namespace with only loopback.");
      set("PrivateNetwork", "yes");
    }
  }

  return {
    service: policy.name,
    unit,
    uid: input.uid,
    ...(input.gid !== undefined ? { gid: input.gid } : {}),
    families,
    addressFilter,
    bind,
    inaccessiblePaths,
    nftSet: { supportedByThisHost: nftSupported, suggestion },
    hardened: Boolean(input.harden),
    directives,
    text: out.join("\n") + "\n",
  };
}

type Setter = (key: string, value: string) => void;
type Replacer = (key: string, values: readonly string[]) => void;
type Commenter = (...lines: string[]) => void;

function addressSection(
  input: DropInInput,
  a: ReturnType<typeof analyse>,
  containers: boolean,
  dnsAddresses: readonly string[],
  set: Setter,
  replace: Replacer,
  comment: Commenter,
): DropIn["addressFilter"] {
  const { policy } = input;
  if (containers) {
    const reason =
      "address filters apply to every socket in this unit's cgroup, whatever its network namespace: they would judge the containers' traffic to their gateway, DNS forwarder and loopback too";
    comment(
      "No IPAddressAllow=/IPAddressDeny=: they apply to every socket in this unit's cgroup,",
      "whatever its network namespace, so they would also judge the containers' own traffic to",
      "their gateway, DNS forwarder and loopback. egressd sees exactly what slirp4netns or pasta",
      "send on the containers' behalf, as this user, and enforces the policy on that.",
    );
    return { mode: "off", allow: [], deny: [], reason };
  }
  if (a.openInbound.length) {
    const ports = a.openInbound.map((r) => `${r.ports}/${r.protocol}`).join(", ");
    const reason = `${ports} accept${a.openInbound.length === 1 ? "s" : ""} connections from anywhere, and systemd's address lists apply in both directions`;
    comment(
      `No IPAddressAllow=/IPAddressDeny=: ${ports} accept${a.openInbound.length === 1 ? "s" : ""} connections from anywhere, and`,
      "systemd's address lists judge both directions (the source of what arrives, the",
      "destination of what leaves), so any allowlist here would refuse those clients.",
      "egressd's nftables rules enforce the outbound allowlist alone.",
    );
    return { mode: "off", allow: [], deny: [], reason };
  }

  /** [comment, addresses] per group of IPAddressAllow= entries. */
  const groups: [string, string[]][] = [];
  if (a.literals.length) groups.push(["outbound addresses and networks", a.literals]);
  if (a.sources.length) {
    groups.push([
      "inbound sources (the lists judge both directions: these may also be sent to; nftables still limits ports)",
      a.sources,
    ]);
  }
  if (policy.dns === "system" && dnsAddresses.length) {
    groups.push(["the resolvers (dns: system)", uniq(dnsAddresses)]);
  }
  if (policy.dns === "proxy") {
    groups.push([
      "DNS (dns: proxy): egressd redirects queries to its proxy on 127.0.0.1 and ::1, and the cgroup egress filter sees packets after that redirect; replies arrive from the address the service asked, so the resolvers too (measured, docs/systemd.md)",
      uniq([...PROXY_ADDRESSES, ...dnsAddresses]),
    ]);
  }
  const allow = uniq(groups.flatMap(([, xs]) => xs));

  let deny: string[];
  let mode: AddressFilterMode;
  let reason: string;
  if (a.names.length) {
    mode = "partial";
    deny = [...NEVER_FROM_DNS, ...(input.allowPrivateAddresses ? [] : PRIVATE)];
    reason = `the policy allows names (${a.names.join(", ")}), whose addresses this layer cannot know`;
    comment(
      `The policy allows names (${a.names.join(", ")}). systemd's address lists cannot follow DNS, so this layer does not refuse everything else: nftables does, keeping the names' current addresses in its sets. Here only what egressd never accepts from DNS is refused (unspecified, loopback, link-local, multicast, cloud metadata endpoints${input.allowPrivateAddresses ? "" : ", private ranges"}), unless listed below.`,
    );
  } else {
    mode = "allowlist";
    deny = ["any"];
    reason = allow.length
      ? "the policy lists only addresses and networks"
      : "the policy allows no address at all";
    comment(
      allow.length
        ? "The policy names only addresses: refuse everything else at this layer too."
        : "The policy allows no address: refuse every IP packet at this layer too.",
    );
  }
  replace("IPAddressDeny", [deny.join(" ")]);
  set("IPAddressAllow", "");
  for (const [what, xs] of groups) {
    comment(what);
    set("IPAddressAllow", uniq(xs).join(" "));
  }
  return { mode, allow, deny, reason };
}

function bindSection(
  input: DropInInput,
  host: SystemdHostFacts,
  set: Setter,
  replace: Replacer,
  comment: Commenter,
  blank: () => void,
): DropIn["bind"] {
  const allow = uniq(input.policy.inbound.map((r) => `${r.protocol}:${r.ports}`));
  if (allow.length > MAX_BIND_RULES) {
    throw new EgressError(
      "ERR_EGRESS_SYSTEMD_BIND",
      `${input.policy.name} declares ${allow.length} inbound ports; SocketBindAllow= takes at most ${MAX_BIND_RULES}`,
      {
        hint: "declare port ranges (egressctl allow-in SERVICE 8000-8100) instead of single ports",
      },
    );
  }
  blank();
  comment(
    allow.length
      ? "The service may bind only its declared inbound ports (port 0, an ephemeral port, stays allowed)."
      : "The service declares no inbound port: it may not bind any (port 0, an ephemeral port, stays allowed).",
  );
  if (host.bpfFramework === false) {
    comment(
      `This host's systemd${host.version ? ` ${host.version}` : ""} was built without the BPF framework: it accepts these lines but does not enforce them. egressd's reply-path rules still stop undeclared ports.`,
    );
  }
  replace("SocketBindAllow", allow);
  replace("SocketBindDeny", ["any"]);
  return { allow, deny: ["any"], enforcedByThisHost: host.bpfFramework };
}
