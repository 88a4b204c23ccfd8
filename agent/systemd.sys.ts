/**
 * The host's systemd, as `egressctl systemd` needs it: its version and features (from
 * `systemctl --version`), whether nsswitch.conf uses nss-resolve, and where drop-ins go.
 */
import { mkdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import { execa } from "execa";
import { EgressError } from "../rules/errors.ts";
import { writeSafely } from "./store/safe-file.fs.ts";
import {
  DROPIN_FILE,
  nsswitchUsesResolve,
  parseSystemdVersion,
  type SystemdHostFacts,
} from "../rules/systemd-dropin.ts";

export interface SystemdHost {
  facts(): Promise<SystemdHostFacts>;
  /** Writes <dir>/<unit>.d/50-egressd.conf atomically; returns its path. */
  writeDropIn(dir: string, unit: string, text: string): Promise<string>;
}

/** The systemd unit directory drop-ins are written to: flag, then env, then /etc/systemd/system. */
export function systemdDir(flag: string | undefined, env: NodeJS.ProcessEnv = process.env): string {
  return flag ?? env.EGRESSD_SYSTEMD_DIR ?? "/etc/systemd/system";
}

async function versionText(): Promise<string> {
  // systemctl is on every systemd host; systemd-analyze is the fallback some containers keep.
  for (const cmd of ["systemctl", "systemd-analyze"]) {
    const r = await execa(cmd, ["--version"], { reject: false, stdin: "ignore", timeout: 10_000 });
    if (r.exitCode === 0 && r.stdout) return r.stdout;
  }
  return "";
}

export function systemdHost(env: NodeJS.ProcessEnv = process.env): SystemdHost {
  return {
    async facts() {
      const nsswitch = env.EGRESSD_NSSWITCH_CONF || "/etc/nsswitch.conf";
      const text = await readFile(nsswitch, "utf8").catch(() => "");
      return { ...parseSystemdVersion(await versionText()), nssResolve: nsswitchUsesResolve(text) };
    },
    async writeDropIn(dir, unit, text) {
      const unitDir = join(dir, `${unit}.d`);
      const file = join(unitDir, DROPIN_FILE);
      try {
        await mkdir(unitDir, { recursive: true, mode: 0o755 });
        await writeSafely(file, text, { mode: 0o644 });
      } catch (err) {
        if (err instanceof EgressError) throw err;
        const e = err as NodeJS.ErrnoException;
        throw new EgressError("ERR_EGRESS_FS", `cannot write ${file}: ${e.message}`, {
          exitCode: 3,
          hint:
            e.code === "EACCES" || e.code === "EPERM"
              ? "run as root"
              : "check the directory (--systemd-dir, env EGRESSD_SYSTEMD_DIR)",
          cause: err,
        });
      }
      return file;
    },
  };
}
