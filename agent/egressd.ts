/**
 * egressd's entry point. This version implements `--once`: apply the policy and exit.
 * The long-running daemon (refresh, control socket, audit schedule) builds on it.
 */
import { Command, CommanderError } from "commander";
import { pino } from "pino";
import { EgressError } from "../rules/errors.ts";
import { PolicyStore } from "../rules/policy-store.fs.ts";
import { applyRuleset, plan } from "./apply.ts";
import { execNft } from "./nft.exec.ts";
import { paths, VERSION, withPathOptions, type GlobalOptions } from "./paths.ts";

import { systemUsers } from "./users.sys.ts";

async function once(g: GlobalOptions): Promise<number> {
  const log = pino({ base: { svc: "egressd" }, level: process.env.EGRESSD_LOG_LEVEL ?? "info" });
  const store = new PolicyStore(paths(g).configDir);
  try {
    const nft = execNft();
    const p = await plan({ store, nft, users: systemUsers() });
    log.level = p.config.log.level;
    for (const n of p.names) {
      if (n.error)
        log.warn(
          { code: "ERR_EGRESS_DNS", name: n.name, services: n.services, error: n.error },
          "name did not resolve",
        );
      else
        log.info(
          { name: n.name, services: n.services, addresses: n.addresses, dropped: n.dropped },
          "resolved",
        );
    }
    await applyRuleset(nft, p.ruleset);
    log.info(
      { table: `inet ${p.ruleset.table}`, services: p.services.length, names: p.names.length },
      "applied",
    );
    return 0;
  } catch (err) {
    if (err instanceof EgressError) {
      log.error({ err: err.toJSON() }, err.message);
      return err.exitCode;
    }
    log.fatal({ err }, "internal error");
    return 4;
  }
}

async function main(argv: string[]): Promise<number> {
  let code = 0;
  const prog = new Command("egressd")
    .description("egressd: per-service outbound firewall agent (nftables, keyed on socket owner)")
    .version(VERSION, "--version", "print the version")
    .option("--once", "apply the policy once and exit");
  withPathOptions(prog)
    .exitOverride()
    .configureOutput({
      outputError: (text, write) => write(`egressd: ${text.replace(/^error: /, "")}`),
    })
    .action(async function (this: Command) {
      const g = this.opts<GlobalOptions & { once?: boolean }>();
      if (!g.once) {
        process.stderr.write("egressd: only --once is available in this version\n");
        code = 2;
        return;
      }
      code = await once(g);
    });
  try {
    await prog.parseAsync(argv, { from: "user" });
  } catch (err) {
    if (err instanceof CommanderError)
      return err.code === "commander.version" || err.code === "commander.helpDisplayed" ? 0 : 2;
    throw err;
  }
  return code;
}

process.exitCode = await main(process.argv.slice(2));
