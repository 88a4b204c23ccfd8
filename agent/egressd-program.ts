/** egressd's command line (also the source of its man page). */
import { Command } from "commander";
import { VERSION, withPathOptions, type GlobalOptions } from "./paths.ts";

export function egressdProgram(
  run: (g: GlobalOptions & { once?: boolean }) => Promise<void>,
): Command {
  const prog = new Command("egressd")
    .description(
      "The egressd daemon: applies the per-service allowlists as nftables rules keyed on the socket owner, keeps allowed names resolved, audits for drift, and serves egressctl on its control socket.",
    )
    .version(VERSION, "--version", "print the version")
    .helpOption("-h, --help", "show help")
    .option("--once", "apply the policy once and exit");
  return withPathOptions(prog)
    .exitOverride()
    .configureOutput({
      outputError: (text, write) => write(`egressd: ${text.replace(/^error: /, "")}`),
    })
    .action(async function (this: Command) {
      await run(this.opts<GlobalOptions & { once?: boolean }>());
    });
}
