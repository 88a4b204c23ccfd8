/** egressctl's command tree and runner: parses argv, runs one handler, renders its result. The only place that prints. */
import { Command, CommanderError, Option } from "commander";
import { EgressError, type ExitCode } from "../rules/errors.ts";
import { paths, VERSION, withPathOptions, type GlobalOptions } from "../agent/paths.ts";

import type { Ctx, Result } from "./commands.ts";

// Everything else loads when a command runs, and only what that command needs: `--version`
// and `--help` load the command tree alone, and a change sent to a running egressd never
// loads the one-shot apply path (compiler, DNS client, nft).
const cmd = () => import("./commands.ts");
const inbound = () => import("./inbound.ts");

export interface Io {
  stdout: (s: string) => void;
  stderr: (s: string) => void;
}

/** Renders an error the one way egressctl does: message, problems, hint. */
export function renderError(err: EgressError): string {
  const lines = [`egressctl: ${err.message}`];
  for (const p of err.problems) lines.push(`  ${p.where}: ${p.text}`);
  if (err.hint) lines.push(`hint: ${err.hint}`);
  return lines.join("\n") + "\n";
}

async function context(g: GlobalOptions): Promise<Ctx> {
  const [{ PolicyStore }, { StateStore }, { defaultNft }, { connectDaemon }] = await Promise.all([
    import("../agent/store/policy-store.fs.ts"),
    import("../agent/store/state.fs.ts"),
    import("../agent/nft/index.ts"),
    import("../agent/control/control.sock.ts"),
  ]);
  const p = paths(g);
  const users = () => import("../agent/users.sys.ts").then((m) => m.systemUsers());
  return {
    store: new PolicyStore(p.configDir),
    state: new StateStore(p.stateDir),
    nft: defaultNft(),
    users: {
      users: async (specs) => (await users()).users(specs),
      groups: async (specs) => (await users()).groups(specs),
      createUser: async (name) => (await users()).createUser(name),
    },
    sockets: {
      listeners: async (uid) =>
        (await import("../agent/sockets.sys.ts")).systemSockets().listeners(uid),
    },
    daemon: () => connectDaemon(p.socket),
  };
}

/** Builds the command tree. `run` receives each handler's promise. */
export function program(
  io: Io,
  run: (g: GlobalOptions, job: (ctx: Ctx) => Promise<Result>) => void,
): Command {
  const prog = new Command("egressctl")
    .description(
      "Manage egressd: per-service outbound allowlists enforced by nftables, keyed on the socket owner's uid.",
    )
    .version(VERSION, "--version", "print the version")
    .helpOption("-h, --help", "show help")
    .option("--json", "machine-readable output on stdout");
  withPathOptions(prog)
    .option("-q, --quiet", "print only errors")
    .option("-v, --verbose", "print more detail")
    .showHelpAfterError("(run with --help for usage)")
    .configureHelp({ showGlobalOptions: true })
    .exitOverride()
    .configureOutput({
      writeOut: io.stdout,
      writeErr: io.stderr,
      outputError: (text, write) => write(`egressctl: ${text.replace(/^error: /, "")}`),
    });

  const go = (c: Command, job: (ctx: Ctx) => Promise<Result>) =>
    run(c.optsWithGlobals<GlobalOptions>(), job);

  prog
    .command("register")
    .description("register a service under its own user (and optionally group)")
    .argument("<service>", "service name, e.g. svc-web")
    .requiredOption("--user <name|uid>", "the user the service runs as")
    .option("--group <name|gid>", "also match sockets owned by this group")
    .option(
      "--create-user",
      "create the user as a locked system account with no login shell if missing",
    )
    .addOption(
      new Option(
        "--mode <mode>",
        "enforce: refuse what is not allowed; audit: log and count only",
      ).default("enforce"),
    )
    .option(
      "--dns <mode>",
      "proxy (default for new services): egressd answers its lookups, allowed names only; system: it may reach the resolvers; none: no DNS",
    )
    .option(
      "--force",
      "register even though the user listens on ports the policy does not declare (they stop accepting new connections)",
    )
    .action(function (this: Command, service: string) {
      const o = this.opts<{
        user: string;
        group?: string;
        createUser?: boolean;
        mode: string;
        dns?: string;
        force?: boolean;
      }>();
      go(this, async (ctx) => (await cmd()).register(ctx, service, o));
    });

  prog
    .command("unregister")
    .description("remove a service and all its allowances")
    .argument("<service>")
    .action(function (this: Command, service: string) {
      go(this, async (ctx) => (await cmd()).unregister(ctx, service));
    });

  prog
    .command("allow")
    .description(
      "allow outbound connections: HOST:PORT[/PROTO] or HOST:LOW-HIGH[/PROTO]; HOST may be *.DOMAIN for a DNS-aware service",
    )
    .argument("<service>")
    .argument(
      "<target...>",
      "e.g. api.example.com:443, *.cdn.example.com:443, 10.0.0.0/8:5432, [2001:db8::1]:53/udp",
    )
    .action(function (this: Command, service: string, targets: string[]) {
      go(this, async (ctx) => (await cmd()).allow(ctx, service, targets));
    });

  prog
    .command("revoke")
    .description("remove outbound allowances (written exactly as allowed)")
    .argument("<service>")
    .argument("<target...>")
    .action(function (this: Command, service: string, targets: string[]) {
      go(this, async (ctx) => (await cmd()).revoke(ctx, service, targets));
    });

  prog
    .command("allow-in")
    .description("accept connections on a port, from anywhere or only from --from sources")
    .argument("<service>")
    .argument("<port>", "PORT[/tcp|/udp] or LOW-HIGH[/tcp|/udp], e.g. 8080 or 5353/udp")
    .option(
      "--from <cidr>",
      "allowed source address or network (repeatable)",
      (v: string, acc: string[]) => [...acc, v],
      [] as string[],
    )
    .option(
      "--anywhere",
      "accept from every source; needed to widen a port that has --from sources",
    )
    .action(function (this: Command, service: string, port: string) {
      const o = this.opts<{ from: string[]; anywhere?: boolean }>();
      go(this, async (ctx) =>
        (await inbound()).allowIn(ctx, service, port, o.from, { anywhere: Boolean(o.anywhere) }),
      );
    });

  prog
    .command("revoke-in")
    .description("stop accepting connections on a port (written as allowed)")
    .argument("<service>")
    .argument("<port>")
    .action(function (this: Command, service: string, port: string) {
      go(this, async (ctx) => (await inbound()).revokeIn(ctx, service, port));
    });

  prog
    .command("list")
    .description("show the policy as written")
    .argument("[service]")
    .action(function (this: Command, service?: string) {
      go(this, async (ctx) => (await cmd()).list(ctx, service));
    });

  prog
    .command("apply")
    .description("compile the policy, resolve names and replace egressd's table in one transaction")
    .option("--dry-run", "print what would change and touch nothing")
    .action(function (this: Command) {
      const o = this.opts<{ dryRun?: boolean }>();
      go(this, async (ctx) => (await cmd()).apply(ctx, o));
    });

  prog
    .command("audit")
    .description("compare the live ruleset with the policy; exit 1 when they differ")
    .option("--repair", "re-apply the desired table in one transaction, then audit again")
    .action(function (this: Command) {
      const o = this.opts<{ repair?: boolean }>();
      go(this, async (ctx) => (await cmd()).audit(ctx, o));
    });

  prog
    .command("status")
    .description(
      "live state from egressd: resolved addresses and expiry, refreshes, refused packets, and each service's DNS mode, proxy port, queries allowed and refused, last refused names",
    )
    .argument("[service]")
    .action(function (this: Command, service?: string) {
      go(this, async (ctx) => (await cmd()).status(ctx, service));
    });

  prog
    .command("refused")
    .description(
      "destinations the kernel refused (or, in audit mode, would have), by service: packets, last seen, the name each address came from",
    )
    .argument("[service]")
    .action(function (this: Command, service?: string) {
      go(this, async (ctx) => (await cmd()).refused(ctx, service));
    });

  prog
    .command("metrics")
    .description(
      "print the Prometheus text the metrics endpoint serves (works without metrics.listen)",
    )
    .action(function (this: Command) {
      go(this, async (ctx) => (await cmd()).metrics(ctx));
    });

  prog
    .command("learn")
    .description(
      "learn a service's allowlist: audit mode for a while (its traffic allowed and recorded), then --show the proposal by name, --apply it",
    )
    .argument("<service>")
    .option(
      "--for <duration>",
      "how long to learn, e.g. 30m, 1h30m, 7d (default: until --stop or --apply)",
    )
    .option("--show", "propose an allowlist from what was recorded; change nothing")
    .option("--apply", "write the proposal as the service's policy and enforce it")
    .option("--stop", "end learning without changing the allowlist")
    .action(function (this: Command, service: string) {
      const o = this.opts<{ for?: string; show?: boolean; apply?: boolean; stop?: boolean }>();
      go(this, async (ctx) => (await import("./learn.ts")).learn(ctx, service, o));
    });

  prog
    .command("refresh")
    .description("re-resolve names now (all, or one service's) and apply what changed")
    .argument("[service]")
    .action(function (this: Command, service?: string) {
      go(this, async (ctx) => (await cmd()).refresh(ctx, service));
    });

  prog
    .command("systemd")
    .description(
      "print (or --write) a systemd drop-in for the service's unit, derived from its policy: User=, address families, cgroup address and bind filters",
    )
    .argument("<service>")
    .requiredOption("--unit <name.service>", "the service's systemd unit, e.g. web.service")
    .option("--harden", "add sandboxing a network daemon does not need to give up")
    .option(
      "--rootless-containers",
      "the unit runs rootless podman (slirp4netns or pasta) as the service user: adds AF_NETLINK, leaves out the cgroup filters",
    )
    .option(
      "--write",
      "write <systemd dir>/<unit>.d/50-egressd.conf atomically instead of printing it",
    )
    .option(
      "--systemd-dir <dir>",
      "where --write puts it (env EGRESSD_SYSTEMD_DIR, default /etc/systemd/system)",
    )
    .action(function (this: Command, service: string) {
      const o = this.opts<{
        unit: string;
        harden?: boolean;
        rootlessContainers?: boolean;
        write?: boolean;
        systemdDir?: string;
      }>();
      go(this, async (ctx) => (await import("./systemd.ts")).systemd(ctx, service, o));
    });

  prog
    .command("check")
    .description(
      "validate policy and daemon config files offline, every problem at once; changes nothing",
    )
    .argument("[path...]", "a config dir, a services.d dir or files (default: the config dir)")
    .addOption(
      new Option(
        "--kind <kind>",
        "what FILE arguments are, whatever their names (e.g. an Ansible validate temp file)",
      ).choices(["service", "config"]),
    )
    .action(function (this: Command, paths: string[]) {
      const o = this.opts<{ kind?: "service" | "config" }>();
      go(this, async (ctx) =>
        (await import("./check.ts")).check(ctx, paths, o.kind ? { kind: o.kind } : {}),
      );
    });

  return prog;
}

/** Whether argv asks for JSON output (a global flag: before or after the command, not after "--"). */
function wantsJson(argv: readonly string[]): boolean {
  const end = argv.indexOf("--");
  return (end === -1 ? argv : argv.slice(0, end)).includes("--json");
}

/** A commander usage error (unknown command or option, missing argument) as an EgressError. */
const noCommand = () =>
  new EgressError("ERR_EGRESS_USAGE", "no command given", {
    hint: "run egressctl --help for the commands",
  });

function usageError(err: CommanderError, prog: Command, argv: readonly string[]): EgressError {
  if (err.code === "commander.help") return noCommand();
  const sub = prog.commands.find((c) => argv.includes(c.name()));
  const help = sub ? `egressctl ${sub.name()} --help` : "egressctl --help";
  return new EgressError(
    "ERR_EGRESS_USAGE",
    err.message.replace(/^error: /, "").replace(/\n[\s\S]*$/, ""),
    {
      exitCode: 2,
      hint: `run ${help} for usage`,
      details: { commanderCode: err.code },
    },
  );
}

/**
 * Runs egressctl with `argv` (without node and script) and returns the exit code.
 * With --json every outcome, usage errors, --help and --version included, is one JSON
 * object on stdout. `makeContext` builds the handlers' adapters (tests pass fakes).
 */
export async function main(
  argv: readonly string[],
  io: Io,
  makeContext: (g: GlobalOptions) => Ctx | Promise<Ctx> = context,
): Promise<ExitCode> {
  const json = wantsJson(argv);
  const printJson = (v: unknown) => io.stdout(JSON.stringify(v, null, 2) + "\n");
  // In JSON mode commander's own stdout (help, version) is collected and wrapped.
  let commanderOut = "";
  const progIo: Io = json
    ? {
        stdout: (t) => {
          commanderOut += t;
        },
        stderr: io.stderr,
      }
    : io;
  let pending: Promise<ExitCode> | null = null;
  const prog = program(progIo, (g, job) => {
    pending = (async () => {
      try {
        const r = await job(await makeContext(g));
        if (g.json) printJson(r.data);
        else {
          if (!g.quiet) io.stdout(r.text);
          for (const w of r.warnings ?? []) if (!g.quiet) io.stderr(w + "\n");
        }
        return r.exitCode;
      } catch (err) {
        const e =
          err instanceof EgressError
            ? err
            : new EgressError("ERR_EGRESS_INTERNAL", `internal error: ${(err as Error).message}`, {
                exitCode: 4,
                hint: "this is a bug in egressd; please report it with the command you ran",
                details: { stack: (err as Error).stack },
              });
        if (g.json) printJson({ error: e.toJSON() });
        io.stderr(renderError(e));
        return e.exitCode;
      }
    })();
  });
  try {
    await prog.parseAsync([...argv], { from: "user" });
  } catch (err) {
    if (!(err instanceof CommanderError)) throw err;
    // Help asked for exits 0; help shown because no command was given is a usage error.
    if (
      err.code === "commander.helpDisplayed" ||
      err.code === "commander.version" ||
      (err.code === "commander.help" && err.exitCode === 0)
    ) {
      if (json)
        printJson(err.code === "commander.version" ? { version: VERSION } : { help: commanderOut });
      return 0;
    }
    if (json) printJson({ error: usageError(err, prog, argv).toJSON() });
    return 2;
  }
  if (!pending) {
    // Not reached through commander (which shows help for a missing command): a guard.
    io.stderr(prog.helpInformation());
    if (json) printJson({ error: noCommand().toJSON() });
    return 2;
  }
  return pending;
}
