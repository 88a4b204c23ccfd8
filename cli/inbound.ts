/** egressctl allow-in / revoke-in: the ports a service accepts connections on, and from where. */
import { parseNet } from "../rules/addresses.ts";
import { invalid, type Problem } from "../rules/errors.ts";
import { checkInboundOverlap } from "../rules/inbound.ts";
import type { InboundRule } from "../rules/policy.ts";
import { parsePortSpec } from "../rules/target.ts";
import { checkServiceName, requireService, takeEffect, type Ctx, type Result } from "./commands.ts";

const PORT_HINT = "write PORT[/tcp|/udp] or LOW-HIGH[/tcp|/udp], e.g. 8080 or 5353/udp";

function parseIn(port: string, from: readonly string[]): { rule: InboundRule; text: string } {
  const problems: Problem[] = [];
  const spec = parsePortSpec(port);
  if ("error" in spec) problems.push({ where: `port "${port}"`, text: spec.error });
  const sources: string[] = [];
  for (const f of from) {
    const net = parseNet(f);
    if ("error" in net)
      problems.push({ where: `--from "${f}"`, text: `invalid address "${f}": ${net.error}` });
    else if (!sources.includes(net.canonical)) sources.push(net.canonical);
  }
  if (problems.length || "error" in spec) {
    throw invalid(
      "ERR_EGRESS_INBOUND",
      problems.length === 1
        ? `${problems[0]?.where}: ${problems[0]?.text}`
        : "invalid inbound allowance",
      problems.length === 1 ? [] : problems,
      PORT_HINT,
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

export async function allowIn(
  ctx: Ctx,
  service: string,
  port: string,
  from: readonly string[],
): Promise<Result> {
  checkServiceName(service);
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
      next = { ports: rule.ports, protocol: rule.protocol };
      what = existing.from
        ? `${service}: ${text} now accepts from anywhere`
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
    if (changed) {
      const others = (await ctx.store.loadServices()).filter((x) => x.name !== service);
      checkInboundOverlap([...others, updated]);
      await ctx.store.writeService(updated);
    }
    const effect = changed ? await takeEffect(ctx) : { applied: false, note: "nothing changed" };
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
    await ctx.store.writeService({ ...p, inbound: p.inbound.filter((r) => !same(r, rule)) });
    const effect = await takeEffect(ctx);
    return {
      exitCode: 0,
      text: `${service}: no longer accepts ${text}\n${effect.note}\n`,
      data: { service, removed: text, applied: effect.applied },
    };
  });
}
