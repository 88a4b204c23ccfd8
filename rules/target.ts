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

/** A parse failure: what was wrong (naming the value) and, when the cause suggests one, what to write instead. */
export interface ParseFailure {
  error: string;
  hint?: string;
}

/** What a domain name may be; the hint for every domain-name error. */
export const DOMAIN_HINT =
  "a domain name is at most 253 characters: labels of 1-63 letters, digits, hyphens and underscores, separated by dots";

const LABEL = /^(?!-)[a-z0-9_-]{1,63}(?<!-)$/;

/** A long value shortened for a message: its first 40 characters and an ellipsis. */
const shown = (text: string) => (text.length > 64 ? `${text.slice(0, 40)}…` : text);

/** Names that mean this host itself (RFC 6761): never resolved through DNS by egressd. */
export const isLocalhostName = (name: string) =>
  name === "localhost" || name.endsWith(".localhost");

/**
 * Converts a domain name to lowercase ASCII (IDNA) form and checks it.
 * Underscores are accepted: real DNS names carry them (_dmarc.example.com, service
 * records, some CDN hosts) and resolvers return them, although hostnames may not.
 * Returns the canonical name or an error text.
 */
export function parseDomain(text: string): { name: string } | ParseFailure {
  if (text.includes("*")) {
    return {
      error: `invalid host "${text}": a wildcard is "*." followed by a domain, e.g. *.example.com`,
    };
  }
  const bad = (why: string): ParseFailure => ({
    error: `invalid domain name "${shown(text)}": ${why}`,
    hint: DOMAIN_HINT,
  });
  const trimmed = text.endsWith(".") ? text.slice(0, -1) : text;
  if (/^[0-9]+$/.test(trimmed.split(".").pop() ?? "")) {
    return {
      error: `invalid host "${text}": neither an IP address nor a domain name (a domain name does not end in a number)`,
      hint: "write an IPv4 address as four numbers (192.0.2.1), or a domain name",
    };
  }
  const ascii = domainToASCII(trimmed);
  if (!ascii) {
    const ch = /[^\p{L}\p{M}\p{N}._-]/u.exec(trimmed)?.[0];
    return bad(
      ch === undefined
        ? "not a valid internationalised domain name"
        : `${JSON.stringify(ch)} is not allowed in a domain name`,
    );
  }
  if (ascii.length > 253) return bad(`${ascii.length} characters; a domain name is at most 253`);
  const labels = ascii.split(".");
  for (const label of labels) {
    if (label === "") return bad("an empty label (two dots in a row, or a leading dot)");
    if (label.length > 63)
      return bad(
        `the label "${shown(label)}" is ${label.length} characters; labels are at most 63`,
      );
    if (!LABEL.test(label)) {
      return bad(
        label.startsWith("-") || label.endsWith("-")
          ? `the label "${label}" starts or ends with a hyphen`
          : `the label "${label}" has a character other than letters, digits, hyphens and underscores`,
      );
    }
  }
  if (isLocalhostName(ascii)) {
    return {
      error: `invalid host "${text}": "${ascii}" is this host's own loopback, which egressd does not look up in DNS`,
      hint: "allow the loopback address instead: 127.0.0.1 or ::1",
    };
  }
  if (labels.length < 2) {
    return {
      error: `invalid domain name "${text}": a single label; write the fully qualified name, e.g. ${ascii}.example.com`,
      hint: "egressd resolves names through DNS without search domains, so names must be fully qualified",
    };
  }
  return { name: ascii };
}

/** Hint for a host that looked like an address or network but is not one. */
export const ADDRESS_HINT =
  "write an IPv4 address or network (192.0.2.1, 10.0.0.0/8) or an IPv6 address or network (2001:db8::1, 2001:db8::/32)";

/** Classifies a policy `host` value: domain, address or CIDR (IPv6 without brackets). */
export function parseHost(text: string): HostSpec | ParseFailure {
  if (/^[0-9.]+(\/.*)?$/.test(text) || text.includes(":")) {
    const net = parseNet(text);
    if ("error" in net)
      return { error: `invalid address "${text}": ${net.error}`, hint: ADDRESS_HINT };
    if (net.family === 6 && net.canonical.startsWith("::ffff:")) {
      return {
        error: `invalid address "${text}": an IPv4-mapped IPv6 address; write the IPv4 address instead`,
      };
    }
    return { kind: "net", ...net };
  }
  if (text.includes("/"))
    return {
      error: `invalid host "${text}": neither an IP network nor a domain name`,
      hint: 'a network is an address and a prefix length (10.0.0.0/8); a domain name has no "/"',
    };
  if (text.startsWith("*.")) {
    const d = parseDomain(text.slice(2));
    if ("error" in d) return { ...d, error: d.error.replace(`"${text.slice(2)}"`, `"${text}"`) };
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

/** The hint for a target whose shape is wrong (missing port, brackets, colons). */
export const TARGET_HINT =
  "targets are HOST:PORT[/tcp|/udp] or HOST:LOW-HIGH[/tcp|/udp]; HOST is a name, an IPv4 address or CIDR, or [IPv6] / [IPv6/len]";
/** The hint for a bad port or range in a target. */
export const PORT_HINT = "a port is a number from 1 to 65535; a range is LOW-HIGH, e.g. 8000-8100";
/** The hint for a bad protocol in a target. */
export const PROTOCOL_HINT =
  "the protocol follows the port: HOST:PORT/tcp (the default) or HOST:PORT/udp";

const SCHEME_PORTS: Record<string, string> = {
  "http:": "80",
  "https:": "443",
  "ws:": "80",
  "wss:": "443",
};

/** "https://api.example.com/x" -> "api.example.com:443", when the URL says which port. */
function urlTarget(text: string): string | null {
  try {
    const u = new URL(text);
    const port = u.port || SCHEME_PORTS[u.protocol];
    return u.hostname && port ? `${u.hostname}:${port}` : null;
  } catch {
    return null;
  }
}

/**
 * Parses a command-line target: HOST:PORT[/PROTO] or HOST:LOW-HIGH[/PROTO], where
 * HOST is a domain, an IPv4 address or CIDR, or a bracketed IPv6 address or CIDR.
 * A failure's hint is chosen by the part that failed (shape, host, port or protocol).
 */
export function parseTarget(text: string): OutboundRule | ParseFailure {
  const quoted = shown(text);
  // "invalid port \"0\": ports are 1-65535" -> "invalid port \"0\" in \"h:0\": ports are 1-65535"
  const fail = (why: string, hint: string | undefined = TARGET_HINT): ParseFailure => {
    const i = why.indexOf(": ");
    return {
      error:
        i === -1 ? `${why} in "${quoted}"` : `${why.slice(0, i)} in "${quoted}"${why.slice(i)}`,
      ...(hint ? { hint } : {}),
    };
  };
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(text)) {
    const example = urlTarget(text) ?? "api.example.com:443";
    return {
      error: `"${quoted}" is a URL, not a target: write HOST:PORT, e.g. ${example}`,
      hint: TARGET_HINT,
    };
  }
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
      if (!("error" in parseNet(hostPart))) {
        return fail(
          `unbracketed IPv6 address "${hostPart}": write it in brackets, e.g. [${hostPart}]:${rest || "443"}`,
        );
      }
      if (/^[0-9a-f:.]+(\/[0-9]*)?$/i.test(hostPart)) {
        return fail(
          `invalid IPv6 address "${hostPart}": not an IPv6 address or network; IPv6 goes in brackets, e.g. [2001:db8::1]:443`,
        );
      }
      return fail(
        `invalid host "${hostPart}": too many colons; a name cannot contain ":" and HOST:PORT has exactly one`,
      );
    }
  }
  if (hostPart === "") return fail("missing host: write HOST:PORT");
  const slash = rest.indexOf("/");
  const portText = slash === -1 ? rest : rest.slice(0, slash);
  const protoText = slash === -1 ? "tcp" : rest.slice(slash + 1);
  if (portText === "") return fail("missing port: write HOST:PORT");
  const ports = parsePorts(portText);
  if ("error" in ports) return fail(ports.error, PORT_HINT);
  const protocol = parseProtocol(protoText);
  if (typeof protocol !== "string") return fail(protocol.error, PROTOCOL_HINT);
  const host = parseHost(hostPart);
  if ("error" in host) {
    if (isLocalhostName(hostPart.toLowerCase().replace(/\.$/, ""))) {
      const suffix = `${formatPorts(ports)}${protocol === "tcp" ? "" : `/${protocol}`}`;
      return fail(
        host.error,
        `allow the loopback address instead: 127.0.0.1:${suffix} or [::1]:${suffix}`,
      );
    }
    return fail(host.error, host.hint ?? TARGET_HINT);
  }
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
