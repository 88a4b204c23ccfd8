/**
 * A lock that is a file holding its owner's pid, created with O_EXCL|O_NOFOLLOW. A lock whose
 * owner is gone (killed, crashed) is taken over at once, not after a staleness timeout: its pid
 * no longer runs egressd or egressctl. Used for the policy lock (writers of the config dir) and
 * for the daemon's lock on its state dir (one daemon per state dir).
 */
import { constants } from "node:fs";
import { open, readFile, unlink } from "node:fs/promises";

const { O_WRONLY, O_CREAT, O_EXCL, O_NOFOLLOW } = constants;

/** Whether `pid` is a live egressd or egressctl process (a reused pid is not). */
export async function ownerAlive(pid: number): Promise<boolean> {
  if (!Number.isInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
  } catch (err) {
    // EPERM: it exists but belongs to someone else; then look at what it runs.
    if ((err as NodeJS.ErrnoException).code !== "EPERM") return false;
  }
  try {
    const cmdline = await readFile(`/proc/${pid}/cmdline`, "utf8");
    return /egress/.test(cmdline);
  } catch {
    return false;
  }
}

async function readPid(path: string): Promise<number | null> {
  try {
    const text = await readFile(path, "utf8");
    const pid = Number(text.trim());
    return Number.isInteger(pid) ? pid : null;
  } catch {
    return null;
  }
}

export interface Held {
  path: string;
  release(): Promise<void>;
}

/**
 * Takes the lock at `path`: at once, or after waiting up to `waitMs` for a live owner to let
 * go. Resolves with the lock, or with the pid of the live owner that kept it.
 */
export async function acquire(
  path: string,
  opts: { waitMs: number; retryMs?: number },
): Promise<Held | { owner: number }> {
  const end = Date.now() + opts.waitMs;
  for (;;) {
    try {
      const fh = await open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0o644);
      try {
        await fh.writeFile(`${process.pid}\n`);
      } finally {
        await fh.close();
      }
      return {
        path,
        release: async () => {
          // Only our own lock: a taken-over lock belongs to its new owner.
          if ((await readPid(path)) === process.pid) await unlink(path).catch(() => undefined);
        },
      };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
    }
    const owner = await readPid(path);
    if (owner === null || !(await ownerAlive(owner))) {
      // A dead owner's lock (or one being written this instant: then the retry sees it whole).
      if (owner !== null && (await readPid(path)) === owner)
        await unlink(path).catch(() => undefined);
      else await new Promise((r) => setTimeout(r, 5));
      continue;
    }
    if (Date.now() >= end) return { owner };
    await new Promise((r) => setTimeout(r, opts.retryMs ?? 20));
  }
}

/** The pid of the live owner of the lock at `path`, or null when nobody holds it. */
export async function holder(path: string): Promise<number | null> {
  const pid = await readPid(path);
  return pid !== null && pid !== process.pid && (await ownerAlive(pid)) ? pid : null;
}
