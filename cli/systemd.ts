/** egressctl systemd: a systemd drop-in for a service's unit, derived from its policy. */
import { resolvePrincipals } from "../agent/apply.ts";
import { configuredResolvers } from "../agent/dns/resolvers.fs.ts";
import { systemdDir, systemdHost, type SystemdHost } from "../agent/systemd.sys.ts";
import { invalid } from "../rules/errors.ts";
import { dropIn, unitNameError } from "../rules/systemd-dropin.ts";
import { requireService, type Ctx, type Result } from "./commands.ts";

export interface SystemdOptions {
  unit: string;
  harden?: boolean;
  rootlessContainers?: boolean;
  write?: boolean;
  systemdDir?: string;
}

export async function systemd(
  ctx: Ctx,
  service: string,
  o: SystemdOptions,
  host: SystemdHost = systemdHost(),
): Promise<Result> {
  const unitError = unitNameError(o.unit);
  if (unitError) {
    throw invalid(
      "ERR_EGRESS_UNIT",
      `invalid unit "${o.unit}"`,
      [{ where: "--unit", text: unitError }],
      "name the service's unit, e.g. --unit web.service",
    );
  }
  const policy = await requireService(ctx, service);
  const config = await ctx.store.loadConfig();
  // Throws, naming the file, when the user or group does not exist here.
  const [principal] = await resolvePrincipals([policy], ctx.users, (n) => ctx.store.serviceFile(n));
  if (!principal) throw new Error(`no principal resolved for ${service}`);
  const d = dropIn({
    policy,
    unit: o.unit,
    uid: principal.uid,
    ...(principal.gid !== undefined ? { gid: principal.gid } : {}),
    resolvers: await configuredResolvers(config),
    table: config.table,
    allowPrivateAddresses: config.refresh.allowPrivateAddresses,
    host: await host.facts(),
    harden: Boolean(o.harden),
    rootlessContainers: Boolean(o.rootlessContainers),
  });
  if (!o.write) {
    return { exitCode: 0, text: d.text, data: { ...d, path: null, written: false } };
  }
  const path = await host.writeDropIn(systemdDir(o.systemdDir), o.unit, d.text);
  return {
    exitCode: 0,
    text: `wrote ${path}\nnow run: systemctl daemon-reload && systemctl restart ${o.unit}\n`,
    data: { ...d, path, written: true },
  };
}
