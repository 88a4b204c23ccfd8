/** The policy model: daemon config and per-service policies, their schemas and validation (pure). */
import { validate as validateCron } from "node-cron";
import { invalid, type Problem } from "./errors.ts";
import { parseNet } from "./addresses.ts";
import { REFUSED_DEFAULT, type RefusedConfig } from "./refused.ts";

import { ajvProblems } from "./schema-errors.ts";
import { validator } from "./validators.ts";
import {
  hostText,
  parseHost,
  parsePorts,
  formatPorts,
  type OutboundRule,
  type Protocol,
} from "./target.ts";
import type { Learning } from "./learn.ts";

export type Mode = "enforce" | "audit";
/**
 * How a service's DNS works. proxy (DNS-aware, the default): its port-53 queries are redirected
 * to egressd, which answers only allowed names; system: it may reach the configured resolvers;
 * none: no DNS at all.
 */
export type DnsMode = "proxy" | "system" | "none";
export const DNS_MODES: readonly DnsMode[] = ["proxy", "system", "none"];

export interface InboundRule {
  ports: string;
  protocol: Protocol;
  /** Source networks allowed; absent or empty means anywhere. */
  from?: string[];
}

export interface ServicePolicy {
  name: string;
  /** A user name (looked up when applied) or a numeric uid. */
  user: string | number;
  group?: string | number;
  mode: Mode;
  dns: DnsMode;
  outbound: OutboundRule[];
  inbound: InboundRule[];
  /** A learning window (egressctl learn): audit mode meanwhile; the written mode after it. */
  learning?: Learning;
}

export interface DaemonConfig {
  table: string;
  /** "IP" or "IP:PORT" or "[IPv6]:PORT"; absent means /etc/resolv.conf. */
  resolvers?: string[];
  refresh: {
    minTtlSeconds: number;
    maxTtlSeconds: number;
    graceSeconds: number;
    maxAddressesPerName: number;
    allowPrivateAddresses: boolean;
  };
  dns: {
    /** Deadline of one query to one resolver (UDP and the TCP retry after truncation), ms. */
    queryTimeoutMs: number;
    /** How the DNS proxy answers a name a service may not look up. */
    unlistedNames: "nxdomain" | "refused";
    /** Loopback ports the DNS proxies of DNS-aware services may use: "LOW-HIGH". */
    proxyPortRange: string;
  };
  audit: { schedule: string; repair: boolean };
  /** The Prometheus endpoint: "unix:PATH" or "HOST:PORT" ("[::1]:9100"); absent: no listener. */
  metrics: { listen?: string };
  /** The refused-destination record (rules/refused.ts): size 0 turns it off. */
  refused: RefusedConfig;
  log: { level: "fatal" | "error" | "warn" | "info" | "debug" | "trace" };
}

export const DEFAULT_CONFIG: DaemonConfig = {
  table: "egressd",
  refresh: {
    minTtlSeconds: 30,
    maxTtlSeconds: 3600,
    graceSeconds: 300,
    maxAddressesPerName: 64,
    allowPrivateAddresses: true,
  },
  dns: { queryTimeoutMs: 2000, unlistedNames: "nxdomain", proxyPortRange: "20000-32767" },
  audit: { schedule: "*/5 * * * *", repair: true },
  metrics: {},
  refused: { ...REFUSED_DEFAULT },
  log: { level: "info" },
};

/** Why root (uid 0, gid 0) is never a service's owner. */
export const ROOT_REASON =
  "root can remove any firewall, so confining it protects nothing, and refusing its traffic breaks the host (sshd, package updates, egressd itself)";

/** Service names: short, lowercase, and safe inside nft object names once "-" becomes "_". */
export const SERVICE_NAME = /^[a-z](?:[a-z0-9-]{0,30}[a-z0-9])?$/;
const SERVICE_NAME_TEXT =
  "service names are 1-32 characters: lowercase letters, digits and hyphens, starting with a letter and not ending with a hyphen";

const portsSchema = {
  description: 'must be a port ("443") or a range ("8000-8100")',
  anyOf: [
    { type: "string", pattern: "^[0-9]{1,5}(-[0-9]{1,5})?$" },
    { type: "integer", minimum: 1, maximum: 65535 },
  ],
};
const protocolSchema = { enum: ["tcp", "udp"] };
const principalSchema = {
  description: "must be a name (string) or a numeric id (0-4294967294)",
  anyOf: [
    { type: "string", pattern: "^[a-z_][a-z0-9_.-]*\\$?$", maxLength: 32 },
    { type: "integer", minimum: 0, maximum: 4294967294 },
  ],
};

export const SERVICE_SCHEMA = {
  $id: "https://egressd.dev/schema/service.json",
  type: "object",
  additionalProperties: false,
  required: ["name", "user"],
  properties: {
    name: { type: "string", pattern: SERVICE_NAME.source, description: SERVICE_NAME_TEXT },
    user: principalSchema,
    group: principalSchema,
    mode: { enum: ["enforce", "audit"] },
    dns: { enum: ["proxy", "system", "none"] },
    outbound: {
      type: "array",
      items: {
        type: "object",
        additionalProperties: false,
        required: ["host", "ports"],
        properties: {
          host: { type: "string", minLength: 1, maxLength: 260 },
          ports: portsSchema,
          protocol: protocolSchema,
        },
      },
    },
    learning: {
      description:
        "a learning window written by egressctl learn: the service runs in audit mode from since until until (or until stopped)",
      type: "object",
      additionalProperties: false,
      required: ["since"],
      properties: {
        since: { type: "string", description: "ISO 8601 time, e.g. 2026-12-05T10:00:00.000Z" },
        until: { type: "string", description: "ISO 8601 time, e.g. 2026-12-05T11:00:00.000Z" },
      },
    },
    inbound: {
      type: "array",
      items: {
        type: "object",
        additionalProperties: false,
        required: ["ports"],
        properties: {
          ports: portsSchema,
          protocol: protocolSchema,
          from: { type: "array", items: { type: "string", minLength: 1 } },
        },
      },
    },
  },
} as const;

export const CONFIG_SCHEMA = {
  $id: "https://egressd.dev/schema/egressd.json",
  type: "object",
  additionalProperties: false,
  properties: {
    table: {
      type: "string",
      pattern: "^[A-Za-z_][A-Za-z0-9_]{0,62}$",
      description: "must be 1-63 letters, digits or underscores, not starting with a digit",
    },
    resolvers: { type: "array", items: { type: "string", minLength: 1 } },
    refresh: {
      type: "object",
      additionalProperties: false,
      properties: {
        minTtlSeconds: { type: "integer", minimum: 1 },
        maxTtlSeconds: { type: "integer", minimum: 1 },
        graceSeconds: { type: "integer", minimum: 0 },
        maxAddressesPerName: { type: "integer", minimum: 1, maximum: 4096 },
        allowPrivateAddresses: { type: "boolean" },
      },
    },
    dns: {
      type: "object",
      additionalProperties: false,
      properties: {
        queryTimeoutMs: { type: "integer", minimum: 100, maximum: 60000 },
        unlistedNames: { enum: ["nxdomain", "refused"] },
        proxyPortRange: {
          type: "string",
          pattern: "^[0-9]{1,5}-[0-9]{1,5}$",
          description: 'must be a port range, e.g. "20000-32767"',
        },
      },
    },
    audit: {
      type: "object",
      additionalProperties: false,
      properties: { schedule: { type: "string" }, repair: { type: "boolean" } },
    },
    metrics: {
      type: "object",
      additionalProperties: false,
      properties: {
        listen: {
          type: "string",
          minLength: 1,
          description:
            'must be "unix:PATH" or "HOST:PORT", e.g. "unix:/run/egressd/metrics.sock" or "127.0.0.1:9100"',
        },
      },
    },
    refused: {
      type: "object",
      additionalProperties: false,
      description:
        "the refused-destination record: at most `size` destinations per address family (0: off), each kept `timeoutSeconds` after its last refused packet",
      properties: {
        size: {
          type: "integer",
          minimum: 0,
          maximum: 1048576,
          description: "must be a whole number from 0 (off) to 1048576, e.g. 65536",
        },
        timeoutSeconds: {
          type: "integer",
          minimum: 1,
          maximum: 604800,
          description: "must be a whole number of seconds from 1 to 604800 (a week), e.g. 3600",
        },
      },
    },
    log: {
      type: "object",
      additionalProperties: false,
      properties: { level: { enum: ["fatal", "error", "warn", "info", "debug", "trace"] } },
    },
  },
} as const;

const serviceValidator = () => validator("service", SERVICE_SCHEMA);
const configValidator = () => validator("config", CONFIG_SCHEMA);

export type Listen =
  { kind: "unix"; path: string } | { kind: "tcp"; host: string; port: number; family: 4 | 6 };

/**
 * Parses metrics.listen: "unix:/ABSOLUTE/PATH", "IPv4:PORT" or "[IPv6]:PORT" (an address, not a
 * host name: the endpoint binds exactly there).
 */
export function parseListen(text: string): Listen | { error: string } {
  const fix = 'write "unix:/run/egressd/metrics.sock", "127.0.0.1:9100" or "[::1]:9100"';
  if (text.startsWith("unix:")) {
    const path = text.slice(5);
    if (!path.startsWith("/") || path.includes("\0") || path.length > 100)
      return {
        error: `"${text}": a unix socket path must be absolute and at most 100 bytes; ${fix}`,
      };
    return { kind: "unix", path };
  }
  const m = /^\[([^\]]+)\]:([0-9]{1,5})$/.exec(text) ?? /^([0-9.]+):([0-9]{1,5})$/.exec(text);
  if (!m) return { error: `"${text}" is not unix:PATH or ADDRESS:PORT; ${fix}` };
  const net = parseNet(m[1] ?? "");
  if ("error" in net || net.canonical.includes("/"))
    return { error: `"${text}": "${m[1]}" is not an IP address; ${fix}` };
  const port = Number(m[2]);
  if (port < 1 || port > 65535) return { error: `"${text}": ports are 1-65535; ${fix}` };
  return { kind: "tcp", host: net.canonical, port, family: net.canonical.includes(":") ? 6 : 4 };
}

/** Parses "IP", "IP:PORT" or "[IPv6]:PORT" into an address and port. */
export function parseResolver(
  text: string,
): { address: string; family: 4 | 6; port: number } | { error: string } {
  let addr = text;
  let port = 53;
  const m = /^\[([^\]]+)\](?::([0-9]+))?$/.exec(text) ?? /^([0-9.]+)(?::([0-9]+))?$/.exec(text);
  if (m) {
    addr = m[1] ?? "";
    if (m[2] !== undefined) port = Number(m[2]);
  }
  const net = parseNet(addr);
  if ("error" in net || net.canonical.includes("/")) {
    return {
      error: `resolver "${text}" is not an address: write 127.0.0.53:53 or [2001:db8::53]:53`,
    };
  }
  if (!Number.isInteger(port) || port < 1 || port > 65535) {
    return { error: `resolver "${text}" has an invalid port: ports are 1-65535` };
  }
  return { address: net.canonical, family: net.family, port };
}

/** Why a wildcard is refused for a service that is not DNS-aware, and how to fix it. */
export function wildcardNeedsProxy(host: string, dns: DnsMode): string {
  return `"${host}" is a wildcard, and wildcards need DNS-aware mode ("dns": "proxy"); this service's dns is "${dns}": set "dns": "proxy" (egressctl register SERVICE --user USER --dns proxy), or allow each name`;
}

/** Validates parsed JSON as a service policy; returns it in canonical form or throws all problems. */
export function validateService(raw: unknown, file: string, expectedName?: string): ServicePolicy {
  // Schema problems and value problems are collected together: one run shows them all.
  const checkService = serviceValidator();
  const problems: Problem[] = checkService(raw) ? [] : ajvProblems(file, checkService.errors);
  const doc = (raw && typeof raw === "object" ? raw : {}) as Record<string, unknown>;
  const at = (path: string) => `${file}: ${path}`;
  const list = (v: unknown): Record<string, unknown>[] =>
    Array.isArray(v)
      ? v.map((x) => (x && typeof x === "object" ? (x as Record<string, unknown>) : {}))
      : [];
  const str = (v: unknown): string | null =>
    typeof v === "string" || typeof v === "number" ? String(v) : null;
  const protocol = (v: unknown): Protocol => (v === "udp" ? "udp" : "tcp");
  if (expectedName !== undefined && typeof doc.name === "string" && doc.name !== expectedName) {
    problems.push({
      where: at("$.name"),
      text: `"${doc.name}" does not match the file name: the policy for ${doc.name} belongs in ${doc.name}.json`,
    });
  }
  // Root as a service's owner locks the host out (see ROOT_REASON); register refuses it too.
  for (const key of ["user", "group"] as const) {
    if (doc[key] === 0 || doc[key] === "root")
      problems.push({
        where: at(`$.${key}`),
        text: `${JSON.stringify(doc[key])} is root: ${ROOT_REASON}`,
      });
  }
  const ports = (value: unknown, path: string): string => {
    const text = str(value);
    if (text === null) return "";
    const r = parsePorts(text);
    if ("error" in r) {
      if (/^[0-9]{1,5}(-[0-9]{1,5})?$/.test(text))
        problems.push({ where: at(path), text: r.error });
      return text;
    }
    return formatPorts(r);
  };
  const dns: DnsMode = DNS_MODES.includes(doc.dns as DnsMode) ? (doc.dns as DnsMode) : "proxy";
  const outbound: OutboundRule[] = list(doc.outbound).map((o, i) => {
    const hostText_ = typeof o.host === "string" ? o.host : "";
    const host = parseHost(hostText_);
    if ("error" in host && hostText_)
      problems.push({ where: at(`$.outbound[${i}].host`), text: host.error });
    if (!("error" in host) && host.kind === "wildcard" && dns !== "proxy")
      problems.push({
        where: at(`$.outbound[${i}].host`),
        text: wildcardNeedsProxy(hostText_, dns),
      });
    return {
      host: "error" in host ? hostText_ : hostText(host),
      ports: ports(o.ports, `$.outbound[${i}].ports`),
      protocol: protocol(o.protocol),
    };
  });
  const inbound: InboundRule[] = list(doc.inbound).map((r, i) => {
    const from = (Array.isArray(r.from) ? r.from : []).map((f: unknown, j: number) => {
      const text = typeof f === "string" ? f : "";
      const net = parseNet(text);
      if ("error" in net) {
        if (text)
          problems.push({
            where: at(`$.inbound[${i}].from[${j}]`),
            text: `invalid address "${text}": ${net.error}`,
          });
        return text;
      }
      return net.canonical;
    });
    return {
      ports: ports(r.ports, `$.inbound[${i}].ports`),
      protocol: protocol(r.protocol),
      ...(from.length ? { from } : {}),
    };
  });
  const learning = doc.learning as Learning | undefined;
  for (const key of ["since", "until"] as const) {
    const v = learning?.[key];
    if (typeof v === "string" && Number.isNaN(Date.parse(v)))
      problems.push({
        where: at(`$.learning.${key}`),
        text: `"${v}" is not a time: write ISO 8601, e.g. 2026-12-05T10:00:00Z (or end learning: egressctl learn ${String(doc.name)} --stop)`,
      });
  }
  if (problems.length) {
    throw invalid(
      "ERR_EGRESS_POLICY_INVALID",
      `invalid service policy ${file}`,
      problems,
      "fix the file, then retry",
    );
  }
  return {
    name: doc.name as string,
    user: doc.user as string | number,
    ...(doc.group !== undefined ? { group: doc.group as string | number } : {}),
    mode: (doc.mode as Mode | undefined) ?? "enforce",
    dns,
    outbound,
    inbound,
    ...(learning && typeof learning.since === "string"
      ? {
          learning: {
            since: learning.since,
            ...(typeof learning.until === "string" ? { until: learning.until } : {}),
          },
        }
      : {}),
  };
}

/** Validates parsed JSON as the daemon config; fills defaults or throws all problems. */
export function validateConfig(raw: unknown, file: string): DaemonConfig {
  const checkConfig = configValidator();
  const problems: Problem[] = checkConfig(raw) ? [] : ajvProblems(file, checkConfig.errors);
  const doc = (raw && typeof raw === "object" ? raw : {}) as {
    table?: string;
    resolvers?: unknown[];
    refresh?: Partial<DaemonConfig["refresh"]>;
    dns?: Partial<DaemonConfig["dns"]>;
    audit?: Partial<DaemonConfig["audit"]>;
    metrics?: Partial<DaemonConfig["metrics"]>;
    refused?: Partial<DaemonConfig["refused"]>;
    log?: Partial<DaemonConfig["log"]>;
  };
  const config: DaemonConfig = {
    table: doc.table ?? DEFAULT_CONFIG.table,
    ...(Array.isArray(doc.resolvers) ? { resolvers: doc.resolvers as string[] } : {}),
    refresh: { ...DEFAULT_CONFIG.refresh, ...doc.refresh },
    dns: { ...DEFAULT_CONFIG.dns, ...doc.dns },
    audit: { ...DEFAULT_CONFIG.audit, ...doc.audit },
    metrics: { ...DEFAULT_CONFIG.metrics, ...doc.metrics },
    refused: { ...DEFAULT_CONFIG.refused, ...doc.refused },
    log: { ...DEFAULT_CONFIG.log, ...doc.log },
  };
  if (typeof config.metrics.listen === "string" && config.metrics.listen !== "") {
    const listen = parseListen(config.metrics.listen);
    if ("error" in listen)
      problems.push({ where: `${file}: $.metrics.listen`, text: listen.error });
  }
  (config.resolvers ?? []).forEach((r, i) => {
    if (typeof r !== "string") return;
    const parsed = parseResolver(r);
    if ("error" in parsed)
      problems.push({ where: `${file}: $.resolvers[${i}]`, text: parsed.error });
  });
  const range = parsePorts(config.dns.proxyPortRange);
  if ("error" in range)
    problems.push({ where: `${file}: $.dns.proxyPortRange`, text: range.error });
  else if (range.low < 1024)
    problems.push({
      where: `${file}: $.dns.proxyPortRange`,
      text: `"${config.dns.proxyPortRange}" starts below 1024: egressd's own user may not bind privileged ports; use e.g. 20000-32767`,
    });
  const { minTtlSeconds: min, maxTtlSeconds: max } = config.refresh;
  if (typeof min === "number" && typeof max === "number" && min > max) {
    problems.push({
      where: `${file}: $.refresh.minTtlSeconds`,
      text: `${min} exceeds maxTtlSeconds (${max})`,
    });
  }
  if (typeof config.audit.schedule === "string" && !validateCron(config.audit.schedule)) {
    problems.push({
      where: `${file}: $.audit.schedule`,
      text: `"${config.audit.schedule}" is not a cron expression, e.g. "*/5 * * * *"`,
    });
  }
  if (problems.length) {
    throw invalid(
      "ERR_EGRESS_CONFIG_INVALID",
      `invalid daemon config ${file}`,
      problems,
      "fix the file, then retry",
    );
  }
  return config;
}

/** The JSON written to services.d/<name>.json: defaults spelled out, stable key order. */
export function serviceToJSON(p: ServicePolicy): string {
  const doc = {
    name: p.name,
    user: p.user,
    ...(p.group !== undefined ? { group: p.group } : {}),
    mode: p.mode,
    dns: p.dns,
    outbound: p.outbound.map((o) => ({ host: o.host, ports: o.ports, protocol: o.protocol })),
    inbound: p.inbound.map((r) => ({
      ports: r.ports,
      protocol: r.protocol,
      ...(r.from?.length ? { from: r.from } : {}),
    })),
    ...(p.learning ? { learning: p.learning } : {}),
  };
  return JSON.stringify(doc, null, 2) + "\n";
}
