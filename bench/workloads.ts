/** Policies and rulesets the benchmarks load (pure): egressd's and the naive one-rule-per-uid baseline. */
import { validateService, type ServicePolicy } from "../rules/policy.ts";

export const FIRST_UID = 20_000;
export const ENDPOINTS = 10;

/** The i-th of ten literal endpoints of service s (documentation ranges, never contacted). */
export function endpoint(
  s: number,
  e: number,
): { host: string; port: number; protocol: "tcp" | "udp" } {
  const n = s * ENDPOINTS + e;
  return {
    host: `198.51.${100 + ((n >> 8) % 4)}.${(n % 254) + 1}`,
    port: 1000 + e,
    protocol: e % 2 ? "udp" : "tcp",
  };
}

/** `count` services with ten literal endpoints each; the last also reaches `extra`. */
export function services(
  count: number,
  extra: { host: string; port: number }[] = [],
): ServicePolicy[] {
  return Array.from({ length: count }, (_, s) => {
    const outbound = Array.from({ length: ENDPOINTS }, (_, e) => {
      const ep = endpoint(s, e);
      return { host: ep.host, ports: String(ep.port), protocol: ep.protocol };
    });
    if (s === count - 1) {
      for (const x of extra)
        outbound.push(
          { host: x.host, ports: String(x.port), protocol: "tcp" },
          { host: x.host, ports: String(x.port), protocol: "udp" },
        );
    }
    return validateService({ name: `bench-${s}`, user: FIRST_UID + s, outbound }, "bench");
  });
}

/**
 * The naive ruleset: in one output chain, one rule per uid and destination, then a reject per
 * uid. A packet of the last service walks every rule before it (the worst case).
 */
export function naiveRuleset(count: number, extra: { host: string; port: number }[] = []): string {
  const lines = [
    "table inet naive {",
    "  chain out {",
    "    type filter hook output priority filter; policy accept;",
    "    ct state established,related accept",
  ];
  for (let s = 0; s < count; s++) {
    const uid = FIRST_UID + s;
    for (let e = 0; e < ENDPOINTS; e++) {
      const ep = endpoint(s, e);
      lines.push(
        `    meta skuid ${uid} ip daddr ${ep.host} ${ep.protocol} dport ${ep.port} accept`,
      );
    }
    if (s === count - 1) {
      for (const x of extra) {
        lines.push(
          `    meta skuid ${uid} ip daddr ${x.host} tcp dport ${x.port} accept`,
          `    meta skuid ${uid} ip daddr ${x.host} udp dport ${x.port} accept`,
        );
      }
    }
    lines.push(
      `    meta skuid ${uid} meta l4proto tcp reject with tcp reset`,
      `    meta skuid ${uid} reject`,
    );
  }
  lines.push("  }", "}", "");
  return lines.join("\n");
}

/**
 * `count` DNS-aware services ("dns": "proxy"), each with its ten literal endpoints and one
 * wildcard of its own (`*.s<i>.bench.test:443`, so every service has name sets); the last one
 * also allows `extra` (hosts with ports: the names the DNS benchmarks ask).
 */
export function dnsAwareServices(count: number, extra: string[]): ServicePolicy[] {
  return services(count).map((p, s) =>
    validateService(
      {
        name: p.name,
        user: p.user,
        dns: "proxy",
        outbound: [
          ...p.outbound,
          { host: `*.s${s}.bench.test`, ports: "443", protocol: "tcp" },
          ...(s === count - 1
            ? extra.map((t) => {
                const i = t.lastIndexOf(":");
                return { host: t.slice(0, i), ports: t.slice(i + 1), protocol: "tcp" };
              })
            : []),
        ],
      },
      "bench",
    ),
  );
}
