/**
 * A lock file: flock(2) on it is the lock, the pid written into it names the holder for
 * messages. The kernel drops the lock the moment its holder ends, however it ends (exit,
 * crash, kill -9), so a killed writer never delays the next one and there is no staleness
 * guess, no takeover race and no pid-reuse mistake. The file stays when released (emptied):
 * deleting a lock file races with a process that has just opened it.
 * Used for the policy lock (writers of the config dir) and for the daemon's lock on its state
 * dir (one daemon per state dir).
 */
import { constants } from "node:fs";
import { open, readFile, type FileHandle } from "node:fs/promises";
import { EgressError } from "../../rules/errors.ts";
import { loadKoffi } from "../koffi.ffi.ts";

const { O_RDWR, O_RDONLY, O_CREAT, O_NOFOLLOW } = constants;
const LOCK_EX = 2;
const LOCK_NB = 4;
const LOCK_UN = 8;

type Flock = (fd: number, operation: number) => number;
let flockFn: Flock | null = null;

/** libc's flock, through koffi (Node has no binding of its own). */
function flock(): Flock {
  if (flockFn) return flockFn;
  try {
    const f = loadKoffi().load("libc.so.6").func("int flock(int fd, int operation)");
    return (flockFn = (fd, op) => f(fd, op) as number);
  } catch (err) {
    throw new EgressError(
      "ERR_EGRESS_LOCK",
      `cannot lock files: libc's flock is not reachable (${(err as Error).message})`,
      {
        exitCode: 4,
        hint: "egressd needs glibc (libc.so.6) and its bundled koffi module: reinstall the package",
        cause: err,
      },
    );
  }
}

/** Tries the lock once, without waiting. */
const tryLock = (fh: FileHandle) => flock()(fh.fd, LOCK_EX | LOCK_NB) === 0;

async function readPid(path: string): Promise<number | null> {
  try {
    const text = (await readFile(path, "utf8")).trim();
    const pid = Number(text);
    return text !== "" && Number.isInteger(pid) && pid > 0 ? pid : null;
  } catch {
    return null;
  }
}

/** The pid in the lock file of a holder: read a few times, as a new holder may be writing it. */
async function ownerOf(path: string): Promise<number> {
  for (let i = 0; i < 20; i++) {
    const pid = await readPid(path);
    if (pid !== null) return pid;
    await new Promise((r) => setTimeout(r, 5));
  }
  return 0; // held, by a process that has not written its pid (yet)
}

export interface Held {
  path: string;
  release(): Promise<void>;
}

/**
 * Takes the lock at `path`: at once, or after waiting up to `waitMs` for its holder to let
 * go. Resolves with the lock, or with the pid of the holder that kept it (0: unknown).
 */
export async function acquire(
  path: string,
  opts: { waitMs: number; retryMs?: number },
): Promise<Held | { owner: number }> {
  const end = Date.now() + opts.waitMs;
  const fh = await open(path, O_RDWR | O_CREAT | O_NOFOLLOW, 0o644);
  try {
    while (!tryLock(fh)) {
      if (Date.now() >= end) {
        await fh.close();
        return { owner: await ownerOf(path) };
      }
      await new Promise((r) => setTimeout(r, opts.retryMs ?? 10));
    }
    await fh.truncate(0);
    await fh.write(`${process.pid}\n`, 0);
  } catch (err) {
    await fh.close().catch(() => undefined);
    throw err;
  }
  let released = false;
  return {
    path,
    release: async () => {
      if (released) return;
      released = true;
      await fh.truncate(0).catch(() => undefined);
      flock()(fh.fd, LOCK_UN);
      await fh.close();
    },
  };
}

/** The pid of the process holding the lock at `path` (not this one), or null when nobody does. */
export async function holder(path: string): Promise<number | null> {
  let fh: FileHandle;
  try {
    fh = await open(path, O_RDONLY | O_NOFOLLOW);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return null;
    throw err;
  }
  try {
    if (tryLock(fh)) return null; // free (closing the file lets go again)
  } finally {
    await fh.close();
  }
  const pid = await ownerOf(path);
  return pid === process.pid ? null : pid;
}
