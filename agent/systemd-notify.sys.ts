/**
 * Tells systemd egressd is ready (Type=notify): once the cached ruleset is in the kernel, so
 * units ordered After=egressd.service start only when their traffic is already enforced.
 * libsystemd's sd_notify through koffi (no process: the main pid sends it, as the unit's
 * NotifyAccess=main requires); else the systemd-notify program, which systemd accepts only
 * with NotifyAccess=all (a drop-in can set it where koffi cannot load).
 */
import { execa } from "execa";
import type { Logger } from "pino";
import { loadKoffi } from "./koffi.ffi.ts";

/** Sends `state` ("READY=1\nSTATUS=...") to $NOTIFY_SOCKET; does nothing without one. */
export async function sdNotify(state: string, log: Logger): Promise<void> {
  if (!process.env.NOTIFY_SOCKET) return;
  try {
    const notify = loadKoffi()
      .load("libsystemd.so.0")
      .func("int sd_notify(int unset_environment, const char *state)");
    if ((notify(0, state) as number) > 0) return;
  } catch (err) {
    log.debug(
      { error: (err as Error).message },
      "sd_notify through libsystemd failed; trying systemd-notify",
    );
  }
  const args = state.split("\n").flatMap((kv) => {
    const [k, v = ""] = kv.split("=", 2);
    return k === "READY" ? ["--ready"] : k === "STATUS" ? [`--status=${v}`] : [];
  });
  const r = await execa("systemd-notify", [`--pid=${process.pid}`, ...args], {
    reject: false,
    stdin: "ignore",
  });
  if (r.exitCode !== 0)
    log.warn(
      { code: "ERR_EGRESS_NOTIFY", error: r.stderr || r.shortMessage },
      "could not tell systemd egressd is ready",
    );
}
