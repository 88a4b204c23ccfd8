/** egressctl allow-in / revoke-in: the ports a service accepts connections on, and from where. */
import { parseNet } from "../rules/addresses.ts";
import { EgressError, invalid, type Problem } from "../rules/errors.ts";
import { checkInboundOverlap } from "../rules/inbound.ts";
import type { InboundRule } from "../rules/policy.ts";
import { parsePortSpec } from "../rules/target.ts";
import {
  checkServiceName,
  commitChange,
  requireService,
  type Ctx,
  type Result,
} from "./commands.ts";

const PORT_HINT = "write PORT[/tcp|/udp] or LOW-HIGH[/tcp|/udp], e.g. 8080 or 5353/udp";
const FROM_HINT =
  "--from takes an address or network: 192.0.2.7, 192.0.2.0/24, 2001:db8::7 or 2001:db8::/32 (host bits clear)";

function parseIn(port: string, from: readonly string[]): { rule: InboundRule; text: string } {
  const problems: Problem[] = [];
  const hints: string[] = [];
  const spec = parsePortSpec(port);
  if ("error" in spec) {
    problems.push({ where: `port "${port}"`, text: spec.error });
    hints.push(PORT_HINT);
  }
  const sources: string[] = [];
  for (const f of from) {
    const net = parseNet(f);
    if ("error" in net) {
      problems.push({ where: `--from "${f}"`, text: `invalid address "${f}": ${net.error}` });
      if (!hints.includes(FROM_HINT)) hints.push(FROM_HINT);
    } else if (!sources.includes(net.canonical)) sources.push(net.canonical);
  }
  if (problems.length || "error" in spec) {
    // The hint is about the part that failed: the port's syntax, or the --from sources.
    throw invalid(
      "ERR_EGRESS_INBOUND",
      problems.length === 1
        ? `${problems[0]?.where}: ${problems[0]?.text}`
        : "invalid inbound allowance",
      problems.length === 1 ? [] : problems,
      hints.join("; "),
    );
  }
  return {
    rule: {
      ports: spec.ports,
      protocol: spec.protocol,
      ...(sources.length ? { from: sources } : {}),
    },
    text: `${spec.ports}/${spec.protocol}`,
  };
}

const same = (a: InboundRule, b: InboundRule) => a.ports === b.ports && a.protocol === b.protocol;
const fromText = (r: InboundRule) => (r.from?.length ? r.from.join(", ") : "anywhere");

/**
 * Declares an inbound port. On a port already declared with sources, --from adds sources;
 * opening it to every source needs --anywhere, said out loud: a bare `allow-in` must never
 * silently widen a restricted port.
 */
export async function allowIn(
  ctx: Ctx,
  service: string,
  port: string,
  from: readonly string[],
  opts: { anywhere?: boolean } = {},
): Promise<Result> {
  checkServiceName(service);
  if (opts.anywhere && from.length) {
    throw invalid(
      "ERR_EGRESS_INBOUND",
      "--anywhere and --from contradict each other",
      [],
      "give --from sources to restrict the port, or --anywhere to accept from every source",
    );
  }
  const { rule, text } = parseIn(port, from);
  return ctx.store.locked(async () => {
    const p = await requireService(ctx, service);
    const existing = p.inbound.find((r) => same(r, rule));
    let next: InboundRule;
    let what: string;
    if (!existing) {
      next = rule;
      what = `${service}: accepts ${text} from ${fromText(rule)}`;
    } else if (!rule.from) {
      if (existing.from?.length && !opts.anywhere) {
        throw new EgressError(
          "ERR_EGRESS_INBOUND_WIDEN",
          `${service} accepts ${text} only from ${fromText(existing)}; allow-in without --from would open it to anywhere`,
          {
            hint: `to add sources: egressctl allow-in ${service} ${text} --from <cidr>; to accept from every source: egressctl allow-in ${service} ${text} --anywhere`,
          },
        );
      }
      next = { ports: rule.ports, protocol: rule.protocol };
      what = existing.from
        ? `${service}: ${text} now accepts from anywhere (was ${fromText(existing)})`
        : `${service}: ${text} already accepts from anywhere`;
    } else if (!existing.from) {
      next = existing;
      what = `${service}: ${text} already accepts from anywhere (revoke-in, then allow-in with --from, to restrict it)`;
    } else {
      next = {
        ...existing,
        from: [...existing.from, ...rule.from.filter((f) => !existing.from?.includes(f))],
      };
      what = `${service}: ${text} accepts from ${fromText(next)}`;
    }
    const changed = JSON.stringify(next) !== JSON.stringify(existing);
    const updated = {
      ...p,
      inbound: existing ? p.inbound.map((r) => (r === existing ? next : r)) : [...p.inbound, next],
    };
    const effect = changed
      ? await commitChange(ctx, service, p, updated, async () => {
          const others = (await ctx.store.loadServices()).filter((x) => x.name !== service);
          checkInboundOverlap([...others, updated]);
        })
      : { applied: false, note: "nothing changed" };
    return {
      exitCode: 0,
      text: `${what}\n${effect.note}\n`,
      data: { service, inbound: next, changed, applied: effect.applied },
    };
  });
}

export async function revokeIn(ctx: Ctx, service: string, port: string): Promise<Result> {
  checkServiceName(service);
  const { rule, text } = parseIn(port, []);
  return ctx.store.locked(async () => {
    const p = await requireService(ctx, service);
    if (!p.inbound.some((r) => same(r, rule))) {
      throw invalid(
        "ERR_EGRESS_NOT_ALLOWED",
        `${service} does not accept ${text}; nothing was revoked`,
        [],
        p.inbound.length
          ? `its inbound ports: ${p.inbound.map((r) => `${r.ports}/${r.protocol}`).join(", ")}`
          : `${service} declares no inbound ports`,
      );
    }
    const effect = await commitChange(ctx, service, p, {
      ...p,
      inbound: p.inbound.filter((r) => !same(r, rule)),
    });
    return {
      exitCode: 0,
      text: `${service}: no longer accepts ${text}\n${effect.note}\n`,
      data: { service, removed: text, applied: effect.applied },
    };
  });
}
