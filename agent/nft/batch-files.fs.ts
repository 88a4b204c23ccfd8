/**
 * Where the `nft` program's batch files are made: a private directory per uid under the
 * temporary directory (`$TMPDIR/egressd-<uid>`), checked before use because /tmp is
 * world-writable and anyone may have planted a symlink or a directory of their own there.
 * Files are created O_EXCL|O_NOFOLLOW and unlinked at once (the caller keeps the descriptor),
 * so a process killed at any point leaves nothing; files a process left in the instant between
 * create and unlink are swept, once per process, when their owner is no longer alive.
 */
import {
  chmodSync,
  constants,
  lstatSync,
  mkdirSync,
  openSync,
  readdirSync,
  unlinkSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { EgressError } from "../../rules/errors.ts";

const NAME = /^batch-([0-9]+)-[0-9]+\.json$/;

export interface BatchFiles {
  readonly dir: string;
  /** A new file's descriptor (read/write, mode 0600), already unlinked. */
  unnamed(): number;
}

function unsafe(dir: string, why: string): EgressError {
  return new EgressError(
    "ERR_EGRESS_TEMP_DIR",
    `unsafe directory for nft batch files ${dir}: ${why}`,
    {
      exitCode: 3,
      hint: `remove it (rm -r ${dir}) so egressd can create its own, or point TMPDIR at a private directory`,
      details: { dir },
    },
  );
}

/** Makes (or accepts) `dir` only if it is a real directory owned by this uid with mode 0700. */
export function privateDir(dir: string): void {
  const uid = process.geteuid?.() ?? 0;
  try {
    mkdirSync(dir, { mode: 0o700 });
    chmodSync(dir, 0o700); // the umask may have taken bits away; never added any
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
  }
  const st = lstatSync(dir);
  if (st.isSymbolicLink()) throw unsafe(dir, "it is a symbolic link");
  if (!st.isDirectory()) throw unsafe(dir, "it is not a directory");
  if (st.uid !== uid) throw unsafe(dir, `it is owned by uid ${st.uid}, not by uid ${uid}`);
  if ((st.mode & 0o7777) !== 0o700)
    throw unsafe(dir, `its mode is ${(st.mode & 0o7777).toString(8).padStart(4, "0")}, not 0700`);
}

const alive = (pid: number): boolean => {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
};

/** Removes batch files whose process is gone; returns how many. */
export function sweep(dir: string): number {
  let removed = 0;
  for (const name of readdirSync(dir)) {
    const pid = Number(NAME.exec(name)?.[1] ?? NaN);
    if (Number.isNaN(pid) || pid === process.pid || alive(pid)) continue;
    try {
      unlinkSync(join(dir, name));
      removed++;
    } catch {
      // Another process swept it first.
    }
  }
  return removed;
}

let made: BatchFiles | null = null;
let counter = 0;

/** The process's batch-file maker, for `$TMPDIR/egressd-<uid>` (checked and swept on first use). */
export function batchFiles(base: string = tmpdir()): BatchFiles {
  const dir = join(base, `egressd-${process.geteuid?.() ?? 0}`);
  if (made?.dir === dir) return made;
  privateDir(dir);
  sweep(dir);
  made = {
    dir,
    unnamed() {
      const file = join(dir, `batch-${process.pid}-${++counter}.json`);
      const { O_RDWR, O_CREAT, O_EXCL, O_NOFOLLOW } = constants;
      const open = () => openSync(file, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW, 0o600);
      let fd: number;
      try {
        fd = open();
      } catch (err) {
        // Someone removed the directory since it was checked: check a new one.
        if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
        privateDir(dir);
        fd = open();
      }
      unlinkSync(file);
      return fd;
    },
  };
  return made;
}
