/** Parsing of allowlist targets and their parts (pure). */
import { domainToASCII } from "node:url";
import { parseNet, type ParsedNet } from "./addresses.ts";

export type Protocol = "tcp" | "udp";
export const PROTOCOLS: readonly Protocol[] = ["tcp", "udp"];

export interface PortRange {
  low: number;
  high: number;
}

/** An outbound allowance as stored in a policy file. */
export interface OutboundRule {
  host: string;
  ports: string;
  protocol: Protocol;
}

/**
 * A policy host: a domain name, a wildcard (`*.example.com`: any name below example.com, at
 * any depth, not example.com itself; DNS-aware services only), or an address or network.
 */
export type HostSpec =
  | { kind: "domain"; name: string }
  | { kind: "wildcard"; suffix: string }
  | ({ kind: "net" } & ParsedNet);

/** Parses "443" or "8000-8100". Returns an error text naming what is allowed. */
export function parsePorts(text: string): PortRange | { error: string } {
  const m = /^([0-9]{1,5})(?:-([0-9]{1,5}))?$/.exec(text);
  if (!m) return { error: `invalid port "${text}": write a port (443) or a range (8000-8100)` };
  const low = Number(m[1]);
  const high = m[2] === undefined ? low : Number(m[2]);
  for (const p of [low, high]) {
    if (p < 1 || p > 65535) return { error: `invalid port "${p}": ports are 1-65535` };
  }
  if (low > high) {
    return { error: `invalid port range "${text}": the first port must not exceed the second` };
  }
  return { low, high };
}

/** Canonical text of a port range: "443" or "8000-8100". */
export function formatPorts(r: PortRange): string {
  return r.low === r.high ? String(r.low) : `${r.low}-${r.high}`;
}

const LABEL = /^(?!-)[a-z0-9_-]{1,63}(?<!-)$/;

/**
 * Converts a domain name to lowercase ASCII (IDNA) form and checks it.
 * Returns the canonical name or an error text.
 */
export function parseDomain(text: string): { name: string } | { error: string } {
  if (text.includes("*")) {
    return {
      error: `invalid host "${text}": a wildcard is "*." followed by a domain, e.g. *.example.com`,
    };
  }
  const trimmed = text.endsWith(".") ? text.slice(0, -1) : text;
  const ascii = domainToASCII(trimmed);
  if (!ascii)
    return { error: `invalid domain name "${text}": not a valid (internationalised) domain name` };
  const labels = ascii.split(".");
  if (ascii.length > 253 || labels.some((l) => !LABEL.test(l))) {
    return {
      error: `invalid domain name "${text}": labels are 1-63 letters, digits or hyphens, not starting or ending with a hyphen`,
    };
  }
  if (labels.length < 2) {
    return {
      error: `invalid domain name "${text}": write the fully qualified name, e.g. ${text}.example.com`,
    };
  }
  if (/^[0-9]+$/.test(labels[labels.length - 1] ?? "")) {
    return { error: `invalid host "${text}": neither an IP address nor a domain name` };
  }
  return { name: ascii };
}

/** Classifies a policy `host` value: domain, address or CIDR (IPv6 without brackets). */
export function parseHost(text: string): HostSpec | { error: string } {
  if (/^[0-9.]+(\/.*)?$/.test(text) || text.includes(":")) {
    const net = parseNet(text);
    if ("error" in net) return { error: `invalid address "${text}": ${net.error}` };
    if (net.family === 6 && net.canonical.startsWith("::ffff:")) {
      return {
        error: `invalid address "${text}": an IPv4-mapped IPv6 address; write the IPv4 address instead`,
      };
    }
    return { kind: "net", ...net };
  }
  if (text.includes("/"))
    return { error: `invalid host "${text}": neither an IP network nor a domain name` };
  if (text.startsWith("*.")) {
    const d = parseDomain(text.slice(2));
    if ("error" in d) return { error: d.error.replace(`"${text.slice(2)}"`, `"${text}"`) };
    return { kind: "wildcard", suffix: d.name };
  }
  const d = parseDomain(text);
  if ("error" in d) return d;
  return { kind: "domain", name: d.name };
}

/** Canonical text of a host as stored in policy files. */
export function hostText(h: HostSpec): string {
  return h.kind === "domain" ? h.name : h.kind === "wildcard" ? `*.${h.suffix}` : h.canonical;
}

export function parseProtocol(text: string): Protocol | { error: string } {
  const p = text.toLowerCase();
  if (p === "tcp" || p === "udp") return p;
  return { error: `invalid protocol "${text}": use tcp or udp` };
}

/**
 * Parses a command-line target: HOST:PORT[/PROTO] or HOST:LOW-HIGH[/PROTO], where
 * HOST is a domain, an IPv4 address or CIDR, or a bracketed IPv6 address or CIDR.
 */
export function parseTarget(text: string): OutboundRule | { error: string } {
  // "invalid port \"0\": ports are 1-65535" -> "invalid port \"0\" in \"h:0\": ports are 1-65535"
  const fail = (why: string) => {
    const i = why.indexOf(": ");
    return {
      error: i === -1 ? `${why} in "${text}"` : `${why.slice(0, i)} in "${text}"${why.slice(i)}`,
    };
  };
  let hostPart: string;
  let rest: string;
  if (text.startsWith("[")) {
    const close = text.indexOf("]");
    if (close === -1) return fail(`missing "]": write [2001:db8::1]:443`);
    hostPart = text.slice(1, close);
    if (text[close + 1] !== ":") {
      return fail(`missing port: write [${hostPart}]:PORT`);
    }
    rest = text.slice(close + 2);
    if (!hostPart.includes(":"))
      return fail(`invalid address "${hostPart}": only IPv6 addresses go in brackets`);
  } else {
    const colon = text.lastIndexOf(":");
    if (colon === -1) {
      return fail(`missing port: write HOST:PORT, e.g. ${text || "api.example.com"}:443`);
    }
    hostPart = text.slice(0, colon);
    rest = text.slice(colon + 1);
    if (hostPart.includes(":")) {
      return fail(`unbracketed IPv6 address: write it in brackets, e.g. [2001:db8::1]:443`);
    }
  }
  if (hostPart === "") return fail("missing host: write HOST:PORT");
  const slash = rest.indexOf("/");
  const portText = slash === -1 ? rest : rest.slice(0, slash);
  const protoText = slash === -1 ? "tcp" : rest.slice(slash + 1);
  if (portText === "") return fail("missing port: write HOST:PORT");
  const ports = parsePorts(portText);
  if ("error" in ports) return fail(ports.error);
  const protocol = parseProtocol(protoText);
  if (typeof protocol !== "string") return fail(protocol.error);
  const host = parseHost(hostPart);
  if ("error" in host) return fail(host.error);
  return { host: hostText(host), ports: formatPorts(ports), protocol };
}

/** The command-line form of a stored allowance (inverse of parseTarget). */
export function formatTarget(r: OutboundRule): string {
  const host = r.host.includes(":") ? `[${r.host}]` : r.host;
  return `${host}:${r.ports}${r.protocol === "tcp" ? "" : `/${r.protocol}`}`;
}

/** Parses an inbound port: "8080", "8080/udp", "8000-8100/tcp". */
export function parsePortSpec(
  text: string,
): { ports: string; protocol: Protocol } | { error: string } {
  const slash = text.indexOf("/");
  const portText = slash === -1 ? text : text.slice(0, slash);
  const proto = parseProtocol(slash === -1 ? "tcp" : text.slice(slash + 1));
  if (typeof proto !== "string") return proto;
  const ports = parsePorts(portText);
  if ("error" in ports) return ports;
  return { ports: formatPorts(ports), protocol: proto };
}
