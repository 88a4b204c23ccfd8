/**
 * egressctl learn: run a service in audit mode for a while (its traffic allowed and recorded),
 * then propose its allowlist by name, and write it on request through the normal path.
 */
import type { LearningReport } from "../agent/daemon.ts";
import { EgressError, invalid } from "../rules/errors.ts";
import { adopt, parseDuration, propose, proposalText, type Proposal } from "../rules/learn.ts";
import type { ServicePolicy } from "../rules/policy.ts";
import { formatTarget } from "../rules/target.ts";
import {
  checkServiceName,
  commitChange,
  requireDaemon,
  requireService,
  type Ctx,
  type Result,
} from "./commands.ts";
import type { Call } from "../agent/control/control.sock.ts";

export interface LearnOptions {
  for?: string;
  show?: boolean;
  apply?: boolean;
  stop?: boolean;
}

const windowText = (l: ServicePolicy["learning"]) =>
  !l
    ? "not learning"
    : l.until
      ? `learning from ${l.since} until ${l.until}`
      : `learning since ${l.since}, until stopped`;

/** The proposal for `policy`, from the daemon's record and the service's listening sockets. */
async function proposalFor(
  ctx: Ctx,
  call: Call,
  policy: ServicePolicy,
): Promise<{ report: LearningReport; proposal: Proposal }> {
  if (!policy.learning) {
    throw new EgressError(
      "ERR_EGRESS_NOT_LEARNING",
      `${policy.name} has no learning window to propose from`,
      {
        exitCode: 2,
        hint: `start one: egressctl learn ${policy.name} --for 1h (then run the service as usual, and ask again with --show)`,
      },
    );
  }
  const report = (await call({ op: "learn", service: policy.name })) as LearningReport;
  const listeners = report.uid >= 0 ? await ctx.sockets.listeners(report.uid) : [];
  const proposal = propose({
    policy,
    observed: report.observed,
    lookedUp: report.lookedUp,
    listeners,
    refuseReason: (a) => report.refuseReasons[a] ?? null,
  });
  return { report, proposal };
}

export async function learn(ctx: Ctx, service: string, o: LearnOptions): Promise<Result> {
  checkServiceName(service);
  const actions = [o.show, o.apply, o.stop].filter(Boolean).length;
  if (actions > 1 || (actions && o.for !== undefined)) {
    throw invalid(
      "ERR_EGRESS_USAGE",
      "choose one: start learning (optionally --for DURATION), --show, --apply or --stop",
      [],
      `e.g. egressctl learn ${service} --for 1h, later egressctl learn ${service} --show`,
    );
  }
  let until: number | undefined;
  if (o.for !== undefined) {
    const d = parseDuration(o.for);
    if (typeof d !== "number")
      throw invalid(
        "ERR_EGRESS_DURATION",
        d.error,
        [{ where: "--for", text: d.error }],
        "e.g. --for 30m",
      );
    until = d;
  }
  const call = await requireDaemon(ctx, "learning record");

  if (o.show) {
    const policy = await requireService(ctx, service);
    const { report, proposal } = await proposalFor(ctx, call, policy);
    const state = report.learning?.active ? "" : " (window over: enforcing again)";
    return {
      exitCode: 0,
      text: proposalText(proposal, windowText(policy.learning) + state),
      data: { service, learning: report.learning ?? null, proposal },
    };
  }

  return ctx.store.locked(async () => {
    const p = await requireService(ctx, service);
    if (o.apply) {
      const { proposal } = await proposalFor(ctx, call, p);
      const next = adopt(p, proposal);
      const effect = await commitChange(ctx, service, p, next);
      const added = proposal.outbound.filter((x) => !x.flagged).map((x) => formatTarget(x.rule));
      const inbound = proposal.inbound.map(
        (x) => `${x.rule.ports}${x.rule.protocol === "tcp" ? "" : `/${x.rule.protocol}`}`,
      );
      const flagged = proposal.outbound.filter((x) => x.flagged);
      const lines = [
        added.length
          ? `${service}: allowed ${added.join(", ")}`
          : `${service}: no outbound allowance to add`,
        ...(inbound.length ? [`${service}: accepts ${inbound.join(", ")}`] : []),
        ...(flagged.length
          ? [
              `${service}: not added (the address filter refuses them): ${flagged.map((x) => `${formatTarget(x.rule)} (${x.flagged})`).join(", ")}`,
            ]
          : []),
        `${service}: learning ended; enforced in ${next.mode} mode`,
        effect.note,
      ];
      return {
        exitCode: 0,
        text: lines.join("\n") + "\n",
        data: {
          service,
          added,
          inbound,
          flagged: flagged.map((x) => ({ target: formatTarget(x.rule), reason: x.flagged })),
          mode: next.mode,
          applied: effect.applied,
        },
      };
    }
    if (o.stop) {
      if (!p.learning)
        return {
          exitCode: 0,
          text: `${service} is not learning; nothing changed\n`,
          data: { service, learning: null, changed: false },
        };
      const { learning: _l, ...rest } = p;
      void _l;
      const effect = await commitChange(ctx, service, p, rest);
      return {
        exitCode: 0,
        text: `${service}: learning stopped; enforced in ${p.mode} mode (the record stays: egressctl refused ${service})\n${effect.note}\n`,
        data: { service, learning: null, changed: true, mode: p.mode, applied: effect.applied },
      };
    }
    const now = Date.now();
    // A running window is extended, not restarted: what it recorded so far still counts.
    const since =
      p.learning && (!p.learning.until || Date.parse(p.learning.until) > now)
        ? p.learning.since
        : new Date(now).toISOString();
    const learning = {
      since,
      ...(until !== undefined ? { until: new Date(now + until).toISOString() } : {}),
    };
    const effect = await commitChange(ctx, service, p, { ...p, learning });
    const lines = [
      `${service}: ${windowText(learning)}`,
      `meanwhile it runs in audit mode: what its policy does not allow is allowed and recorded${p.dns === "proxy" ? ", and its lookups of unlisted names are answered and remembered" : ` (its dns is "${p.dns}", so names are not learned: the proposal will list addresses)`}`,
      `see the proposal: egressctl learn ${service} --show; adopt it: egressctl learn ${service} --apply`,
      ...(until === undefined
        ? [`no --for given: it learns until egressctl learn ${service} --stop or --apply`]
        : []),
      effect.note,
    ];
    return {
      exitCode: 0,
      text: lines.join("\n") + "\n",
      data: { service, learning, applied: effect.applied },
    };
  });
}
