/** Where things live: flags over environment over SPEC §3 defaults. */

declare const EGRESSD_VERSION: string | undefined;
export const VERSION: string = typeof EGRESSD_VERSION === "string" ? EGRESSD_VERSION : "0.0.0-dev";

export interface GlobalOptions {
  json?: boolean;
  configDir?: string;
  stateDir?: string;
  socket?: string;
  quiet?: boolean;
  verbose?: boolean;
}

export function paths(g: GlobalOptions, env: NodeJS.ProcessEnv = process.env) {
  return {
    configDir: g.configDir ?? env.EGRESSD_CONFIG_DIR ?? "/etc/egressd",
    stateDir: g.stateDir ?? env.EGRESSD_STATE_DIR ?? "/var/lib/egressd",
    socket: g.socket ?? env.EGRESSD_SOCKET ?? "/run/egressd/egressd.sock",
  };
}

/** The path flags egressctl and egressd share (SPEC §3). */
export function withPathOptions<T extends { option(flags: string, description: string): T }>(
  cmd: T,
): T {
  return cmd
    .option("--config-dir <dir>", "config directory (env EGRESSD_CONFIG_DIR, default /etc/egressd)")
    .option(
      "--state-dir <dir>",
      "state directory (env EGRESSD_STATE_DIR, default /var/lib/egressd)",
    )
    .option(
      "--socket <path>",
      "control socket (env EGRESSD_SOCKET, default /run/egressd/egressd.sock)",
    );
}

/**
 * Node.js flags the daemon is started with (the packaged /usr/bin/egressd passes them). A
 * small young generation keeps an idle daemon's resident memory down (about 30 MB with 1,000
 * services) at the cost of more frequent, cheap scavenges.
 */
export const DAEMON_NODE_FLAGS = ["--max-semi-space-size=2"];
