/**
 * Reading and writing files in directories another user may control, without being steered by
 * them: root's `egressctl apply` writes state into the state dir, which the daemon's own
 * unprivileged user owns. A link planted there must never make root read, write or chown
 * anything else, so:
 *  - reads open with O_NOFOLLOW (and O_NONBLOCK, so a FIFO cannot hang us) and accept only a
 *    regular file with one link, owned by an expected owner;
 *  - writes create a temp file with O_CREAT|O_EXCL|O_NOFOLLOW (a planted name fails, it is
 *    never followed), set mode and ownership on the open descriptor, fsync, and rename over
 *    the final name (rename replaces a link itself, never its target);
 *  - a final path that exists but is not a regular file owned as expected is refused before
 *    anything is written.
 */
import { randomBytes } from "node:crypto";
import { constants, type Stats } from "node:fs";
import { lstat, open, rename, rm, stat, type FileHandle } from "node:fs/promises";
import { basename, dirname, join } from "node:path";
import { EgressError } from "../../rules/errors.ts";

const { O_RDONLY, O_WRONLY, O_CREAT, O_EXCL, O_NOFOLLOW, O_NONBLOCK, O_DIRECTORY } = constants;

function unsafe(path: string, what: string): EgressError {
  return new EgressError("ERR_EGRESS_UNSAFE_PATH", `refusing ${path}: ${what}`, {
    exitCode: 3,
    hint: "egressd creates this file itself: remove whatever is there (and find out who put it there), then retry",
    details: { path },
  });
}

function describe(st: Stats): string {
  if (st.isSymbolicLink()) return "a symbolic link";
  if (st.isDirectory()) return "a directory";
  if (st.isFIFO()) return "a FIFO";
  if (st.isSocket()) return "a socket";
  if (!st.isFile()) return "not a regular file";
  return "a file";
}

/** The owner of `dir`: a real directory, or a link to one that root owns (systemd makes those). */
export async function dirOwner(dir: string): Promise<{ uid: number; gid: number }> {
  const l = await lstat(dir);
  if (l.isSymbolicLink() && l.uid !== 0) throw unsafe(dir, `a symbolic link owned by uid ${l.uid}`);
  const st = l.isSymbolicLink() ? await stat(dir) : l;
  if (!st.isDirectory()) throw unsafe(dir, describe(st));
  return { uid: st.uid, gid: st.gid };
}

/** Checks an existing file's status: a regular file, one link, owned by one of `owners`. */
function checkFile(path: string, st: Stats, owners: readonly number[]): void {
  if (!st.isFile()) throw unsafe(path, describe(st));
  if (st.nlink > 1) throw unsafe(path, `a file with ${st.nlink} hard links`);
  if (!owners.includes(st.uid))
    throw unsafe(path, `owned by uid ${st.uid}, not by ${owners.join(" or ")}`);
}

/** Whoever may own files in a directory owned by `dirUid`: that owner, and root. */
export const ownersFor = (dirUid: number) => [...new Set([dirUid, 0])];

/**
 * Opens `path` without following a link and without blocking on a FIFO (O_NOFOLLOW|O_NONBLOCK
 * are added to `flags`), then checks the open descriptor: a regular file with one link, owned
 * by one of `owners`. Null when it does not exist (and `flags` has no O_CREAT); an EgressError
 * (exit 3) when it is anything else. Checking the descriptor, not the name, leaves no window
 * for a swap between the check and the use.
 */
export async function openSafely(
  path: string,
  flags: number,
  owners: readonly number[],
  mode?: number,
): Promise<FileHandle | null> {
  let fh: FileHandle;
  try {
    fh = await open(path, flags | O_NOFOLLOW | O_NONBLOCK, mode);
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    if (e.code === "ENOENT") return null;
    if (e.code === "ELOOP") throw unsafe(path, "a symbolic link");
    throw err;
  }
  try {
    checkFile(path, await fh.stat(), owners);
  } catch (err) {
    await fh.close();
    throw err;
  }
  return fh;
}

/**
 * Reads `path` without following a link. Null when it does not exist; an EgressError (exit 3)
 * when it is anything but a regular file owned by one of `owners`.
 */
export async function readSafely(path: string, owners: readonly number[]): Promise<string | null> {
  const fh = await openSafely(path, O_RDONLY, owners);
  if (!fh) return null;
  try {
    return await fh.readFile("utf8");
  } finally {
    await fh.close();
  }
}

/** Fails unless `path` is absent or a regular file owned by one of `owners` (checked with lstat). */
export async function checkReplaceable(path: string, owners: readonly number[]): Promise<void> {
  let st: Stats;
  try {
    st = await lstat(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return;
    throw err;
  }
  checkFile(path, st, owners);
}

export interface WriteOptions {
  mode: number;
  /** Ownership to give the file (on the descriptor); only root may, and only root does. */
  owner?: { uid: number; gid: number };
  /** Who may own the file being replaced; default: the owner given, or ourselves. */
  owners?: readonly number[];
  /** Temp file names; tests pass a fixed one to plant a link there. */
  tempName?: (file: string) => string;
}

const randomTemp = (file: string) => `.${file}.${randomBytes(8).toString("hex")}.tmp`;

/** Writes `data` to `path` atomically, never following or chowning through a link. */
export async function writeSafely(path: string, data: string, opts: WriteOptions): Promise<void> {
  const dir = dirname(path);
  const me = process.getuid?.() ?? 0;
  const owners = opts.owners ?? [...new Set([opts.owner?.uid ?? me, me])];
  await checkReplaceable(path, owners);
  const temp = join(dir, (opts.tempName ?? randomTemp)(basename(path)));
  let fh;
  try {
    fh = await open(temp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, opts.mode);
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    if (e.code === "EEXIST" || e.code === "ELOOP")
      throw unsafe(temp, "something already exists at the temporary name");
    throw err;
  }
  try {
    try {
      await fh.writeFile(data);
      await fh.chmod(opts.mode);
      if (opts.owner && me === 0) await fh.chown(opts.owner.uid, opts.owner.gid);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await rename(temp, path);
  } catch (err) {
    await rm(temp, { force: true });
    throw err;
  }
  // The rename is durable once the directory is.
  const d = await open(dir, O_RDONLY | O_DIRECTORY);
  try {
    await d.sync();
  } finally {
    await d.close();
  }
}
