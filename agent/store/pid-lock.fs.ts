/**
 * A lock file: flock(2) on it is the lock, the pid written into it names the holder for
 * messages. The kernel drops the lock the moment its holder ends, however it ends (exit,
 * crash, kill -9), so a killed writer never delays the next one and there is no staleness
 * guess, no takeover race and no pid-reuse mistake. The file stays when released (emptied):
 * deleting a lock file races with a process that has just opened it.
 * Used for the policy lock (writers of the config dir) and for the daemon's lock on its state
 * dir (one daemon per state dir). The state dir belongs to the daemon's unprivileged user and
 * root's one-shot `egressctl apply` looks at the lock there, so the file is opened like any
 * file in a directory someone else may write (safe-file.fs.ts): no link followed, no FIFO
 * waited on, nothing but a regular file with one link owned by the directory's owner or root.
 */
import { constants } from "node:fs";
import type { FileHandle } from "node:fs/promises";
import { dirname } from "node:path";
import { EgressError } from "../../rules/errors.ts";
import { loadKoffi } from "../koffi.ffi.ts";
import { dirOwner, openSafely, ownersFor } from "./safe-file.fs.ts";

const { O_RDWR, O_RDONLY, O_CREAT } = constants;
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

async function readPid(fh: FileHandle): Promise<number | null> {
  try {
    const buf = Buffer.alloc(32);
    const { bytesRead } = await fh.read(buf, 0, buf.length, 0);
    const text = buf.subarray(0, bytesRead).toString("utf8").trim();
    const pid = Number(text);
    return text !== "" && Number.isInteger(pid) && pid > 0 ? pid : null;
  } catch {
    return null;
  }
}

/** The pid in the lock file of a holder: read a few times, as a new holder may be writing it. */
async function ownerOf(fh: FileHandle): Promise<number> {
  for (let i = 0; i < 20; i++) {
    const pid = await readPid(fh);
    if (pid !== null) return pid;
    await new Promise((r) => setTimeout(r, 5));
  }
  return 0; // held, by a process that has not written its pid (yet)
}

/** Who may own a lock file: its directory's owner, root, and ourselves. */
async function owners(path: string): Promise<number[]> {
  const dir = await dirOwner(dirname(path));
  return [...new Set([...ownersFor(dir.uid), process.getuid?.() ?? 0])];
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
  // Never through a link, a FIFO or a hard link: truncating and writing the pid would land in
  // whatever it points at.
  const fh = await openSafely(path, O_RDWR | O_CREAT, await owners(path), 0o644);
  if (!fh) throw new Error(`${path} vanished while being created`);
  try {
    while (!tryLock(fh)) {
      if (Date.now() >= end) {
        const owner = await ownerOf(fh);
        await fh.close();
        return { owner };
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
  let fh: FileHandle | null;
  try {
    fh = await openSafely(path, O_RDONLY, await owners(path));
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return null; // no directory either
    throw err;
  }
  if (!fh) return null;
  let pid: number;
  try {
    if (tryLock(fh)) return null; // free (closing the file lets go again)
    pid = await ownerOf(fh);
  } finally {
    await fh.close();
  }
  return pid === process.pid ? null : pid;
}
