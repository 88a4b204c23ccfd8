/**
 * egressd's entry point. `--once` applies the policy and exits; without it egressd runs as
 * the daemon: enforce from saved state, keep names resolved, serve the control socket.
 */
import { existsSync } from "node:fs";
import { readFile } from "node:fs/promises";
import type { Server } from "node:net";
import { CommanderError } from "commander";
import cron, { type ScheduledTask } from "node-cron";
import { pino, type Logger } from "pino";
import { EgressError } from "../rules/errors.ts";
import type { DaemonConfig } from "../rules/policy.ts";
import { PolicyStore } from "./store/policy-store.fs.ts";
import { applyPlan, plan } from "./apply.ts";

import { connectDaemon, serveControl, type Request } from "./control/control.sock.ts";
import { watchConfig } from "./store/watch.fs.ts";
import { holder } from "./store/pid-lock.fs.ts";
import { sdNotify } from "./systemd-notify.sys.ts";
import { Daemon } from "./daemon.ts";
import { dnsResolver } from "./dns/dns.client.ts";
import { forward } from "./dns/exchange.sock.ts";
import { DnsProxy } from "./dns/proxy.sock.ts";
import { flushDnsConntrack } from "./nft/conntrack.sys.ts";
import { defaultNft } from "./nft/index.ts";
import { HELPER_FLAG, helperNft, serveNftHelper } from "./nft/helper.proc.ts";
import { egressdProgram } from "./egressd-program.ts";
import { paths, VERSION, type GlobalOptions } from "./paths.ts";
import { hostAddresses } from "./host.sys.ts";
import { StateStore } from "./store/state.fs.ts";
import { systemUsers } from "./users.sys.ts";
import { Metrics } from "./metrics/metrics.ts";
import { serveMetrics, type MetricsEndpoint } from "./metrics/endpoint.http.ts";

function logger(): Logger {
  return pino({ base: { svc: "egressd" }, level: process.env.EGRESSD_LOG_LEVEL ?? "info" });
}

function errorCode(err: unknown, log: Logger): number {
  if (err instanceof EgressError) {
    log.error({ err: err.toJSON() }, err.message);
    return err.exitCode;
  }
  log.fatal({ err }, "internal error");
  return 4;
}

async function once(g: GlobalOptions): Promise<number> {
  const log = logger();
  const p = paths(g);
  // While a daemon runs it is the one writer of the table: go through it, or refuse.
  const running = await holder(new StateStore(p.stateDir).lockFile);
  if (running !== null) {
    try {
      const call = await connectDaemon(p.socket);
      if (call) {
        const r = (await call({ op: "apply" })) as { kind: string; changes: number };
        log.info(
          { daemon: running, kind: r.kind, changes: r.changes },
          "applied by the running egressd",
        );
        return 0;
      }
    } catch (err) {
      return errorCode(err, log);
    }
  }
  const deps = {
    store: new PolicyStore(p.configDir),
    state: new StateStore(p.stateDir),
    nft: defaultNft(),
    users: systemUsers(),
  };
  try {
    const result = await plan(deps);
    log.level = result.config.log.level;
    for (const p of result.stateProblems)
      log.warn({ code: "ERR_EGRESS_STATE", where: p.where }, `saved state: ${p.where}: ${p.text}`);
    for (const n of result.names) {
      if (n.errors)
        log.warn(
          {
            code: "ERR_EGRESS_DNS",
            name: n.name,
            services: n.services,
            errors: n.errors,
            keeping: n.addresses,
          },
          "name did not resolve",
        );
      else
        log.info(
          { name: n.name, services: n.services, addresses: n.addresses, dropped: n.dropped },
          "resolved",
        );
    }
    await applyPlan(deps, result);
    log.info(
      {
        table: `inet ${result.ruleset.table}`,
        services: result.services.length,
        names: result.names.length,
      },
      "applied",
    );
    return 0;
  } catch (err) {
    return errorCode(err, log);
  }
}

/** Runs until SIGTERM/SIGINT. Resolves with the exit code. */
async function daemon(g: GlobalOptions): Promise<number> {
  const log = logger();
  const p = paths(g);
  const audit: { task: ScheduledTask | null; schedule: string } = { task: null, schedule: "" };
  // (Re)arms the audit on the configured schedule; called whenever the config is loaded.
  const scheduleAudit = (config: DaemonConfig) => {
    if (audit.schedule === config.audit.schedule) return;
    void audit.task?.stop();
    const task = cron.schedule(
      config.audit.schedule,
      () =>
        d.audit(d.config?.audit.repair ?? true).then(
          () => undefined,
          () => undefined,
        ),
      { name: "audit", noOverlap: true },
    );
    Object.assign(audit, { task, schedule: config.audit.schedule });
    log.info({ schedule: config.audit.schedule, repair: config.audit.repair }, "audit scheduled");
  };
  // One registry for the daemon's life; the endpoint (metrics.listen) comes and goes with the config.
  const metrics = new Metrics(VERSION);
  const render = async () => ({ text: await metrics.text(), contentType: metrics.contentType });
  let endpoint: MetricsEndpoint | null = null;
  let endpointChange: Promise<void> = Promise.resolve();
  // A listen failure is logged and the daemon goes on enforcing: metrics never stop the firewall.
  const bindMetrics = (config: DaemonConfig) => {
    const want = config.metrics.listen ?? null;
    endpointChange = endpointChange.then(async () => {
      if (stopping) return;
      if (want === null && !endpoint) d.metricsEndpoint = { listen: null, error: null };
      if ((endpoint?.listen ?? null) === want) return;
      if (endpoint) {
        await endpoint.close();
        log.info({ listen: endpoint.listen }, "metrics endpoint closed");
        endpoint = null;
      }
      d.metricsEndpoint = { listen: null, error: null };
      if (want === null) return;
      try {
        endpoint = await serveMetrics(want, render, log);
        d.metricsEndpoint = { listen: want, error: null };
        log.info({ listen: want }, "metrics endpoint ready");
      } catch (err) {
        const e =
          err instanceof EgressError
            ? err
            : new EgressError("ERR_EGRESS_METRICS_LISTEN", String(err));
        d.metricsEndpoint = { listen: null, error: e.message };
        log.error({ err: e.toJSON() }, `${e.message}; enforcing without a metrics endpoint`);
      }
    });
  };
  let upstream: (query: Buffer) => Promise<Buffer> = () =>
    Promise.reject(new Error("no resolvers loaded yet"));
  const proxies: DnsProxy = new DnsProxy({
    upstream: (query) => upstream(query),
    filter: (addresses) => d.filter(addresses),
    allow: (service, name, addresses, ttl) => d.allowLearned(service, name, addresses, ttl),
    unlisted: () => d.config?.dns.unlistedNames ?? "nxdomain",
    log,
    clock: Date.now,
  });
  // Forced program (EGRESSD_NFT): run it from here; otherwise libnftables in a helper process.
  const nft = process.env.EGRESSD_NFT ? defaultNft() : helperNft();
  const d: Daemon = new Daemon({
    store: new PolicyStore(p.configDir),
    state: new StateStore(p.stateDir),
    nft,
    users: systemUsers(),
    resolver: (servers, config) => {
      upstream = (query) => forward(servers, query, config.dns.queryTimeoutMs, metrics.observeDns);
      return dnsResolver(servers, {
        timeoutMs: config.dns.queryTimeoutMs,
        observe: metrics.observeDns,
      });
    },
    clock: Date.now,
    hostAddresses,
    log,
    proxies,
    flushDnsConntrack,
    nameService: async () => ({
      nsswitch: await readFile(process.env.EGRESSD_NSSWITCH_CONF || "/etc/nsswitch.conf", "utf8"),
      nscdRunning: existsSync("/var/run/nscd/socket"),
    }),
    metrics,
    onConfig: (config) => {
      scheduleAudit(config);
      bindMetrics(config);
    },
  });
  metrics.source = () => d.metricsSnapshot();
  let server: Server | null = null;
  let stopping: Promise<void> | null = null;
  let housekeeping: ScheduledTask | null = null;
  let watcher: { close(): void } | null = null;

  const handler = async (req: Request): Promise<unknown> => {
    switch (req.op) {
      case "ping":
        return { pid: process.pid, version: VERSION };
      case "apply":
        return req.dryRun ? d.plan() : d.reload();
      case "service":
        if (!req.service)
          throw new EgressError("ERR_EGRESS_BAD_REQUEST", '"service" needs a service name', {
            exitCode: 2,
          });
        return d.applyService(req.service);
      case "status":
        return d.status(req.service);
      case "learn":
        if (!req.service)
          throw new EgressError("ERR_EGRESS_BAD_REQUEST", '"learn" needs a service name', {
            exitCode: 2,
          });
        return d.learning(req.service);
      case "refresh":
        return d.refresh(req.service);
      case "audit":
        return d.audit(Boolean(req.repair));
      case "refused": {
        const entries = await d.refused(req.service);
        return { entries, record: d.refusedConfig() };
      }
      case "metrics":
        return { text: await metrics.text(), listen: endpoint?.listen ?? null };
      default:
        throw new EgressError("ERR_EGRESS_BAD_REQUEST", `unknown control operation "${req.op}"`, {
          exitCode: 2,
        });
    }
  };

  log.info(
    { version: VERSION, configDir: p.configDir, stateDir: p.stateDir, socket: p.socket },
    "egressd starting",
  );
  // One daemon per state dir, decided before anything touches the kernel.
  const state = new StateStore(p.stateDir);
  let lock: Awaited<ReturnType<StateStore["lockForDaemon"]>>;
  try {
    lock = await state.lockForDaemon();
  } catch (err) {
    return errorCode(err, log);
  }
  if ("owner" in lock) {
    return errorCode(
      new EgressError(
        "ERR_EGRESS_RUNNING",
        `another egressd (pid ${lock.owner}) is running on ${p.stateDir}; this one changed nothing`,
        {
          exitCode: 3,
          hint: "stop it first (systemctl stop egressd), or give this one another --state-dir",
          details: { pid: lock.owner },
        },
      ),
      log,
    );
  }
  const held = lock;
  const done = new Promise<number>((resolve) => {
    const stop = (signal: string) => {
      if (stopping) return;
      log.info({ signal }, "stopping; the kernel keeps enforcing the current ruleset");
      stopping = (async () => {
        watcher?.close();
        await housekeeping?.stop();
        await audit.task?.stop();
        server?.close();
        await endpointChange;
        await (endpoint as MetricsEndpoint | null)?.close();
        await d.stop();
        nft.close?.();
        await held.release();
      })();
      void stopping.then(() => resolve(0));
    };
    // Signals first: a SIGHUP during start-up is a reload, queued after it.
    process.once("SIGTERM", () => stop("SIGTERM"));
    process.once("SIGINT", () => stop("SIGINT"));
    process.on("SIGHUP", () => {
      log.info("SIGHUP: reloading config and policy");
      d.reload().catch(() => undefined); // load errors are logged by the daemon
    });
  });
  try {
    // The control socket answers during start-up (status; changes queue behind the start).
    server = await serveControl(p.socket, handler, log);
    log.info({ socket: p.socket }, "control socket ready");
    await d.start();
    // Enforcing from the saved state: units ordered after egressd may start now.
    await sdNotify("READY=1\nSTATUS=enforcing the policy; resolving names", log);
    log.info({ pid: process.pid }, "ready");
    d.begin();
    housekeeping = cron.schedule("* * * * *", () => d.housekeep(), {
      name: "housekeeping",
      noOverlap: true,
    });
    watcher = watchConfig(p.configDir, () => d.noticeChanges(), log);
  } catch (err) {
    watcher?.close();
    await housekeeping?.stop();
    await audit.task?.stop();
    server?.close();
    await endpointChange;
    await (endpoint as MetricsEndpoint | null)?.close();
    await d.stop();
    await held.release();
    return errorCode(err, log);
  }
  return done;
}

async function main(argv: string[]): Promise<number> {
  let code = 0;
  const prog = egressdProgram(async (g) => {
    code = g.once ? await once(g) : await daemon(g);
  });
  try {
    await prog.parseAsync(argv, { from: "user" });
  } catch (err) {
    if (err instanceof CommanderError) {
      return err.code === "commander.version" || err.code === "commander.helpDisplayed" ? 0 : 2;
    }
    throw err;
  }
  return code;
}

if (process.argv.includes(HELPER_FLAG)) serveNftHelper();
else process.exitCode = await main(process.argv.slice(2));
