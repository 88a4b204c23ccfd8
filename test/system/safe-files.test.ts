/** Link-safe reads and writes in a directory another user owns (as root, in a temp dir). */
import {
  chownSync,
  existsSync,
  lchownSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  statSync,
  symlinkSync,
  linkSync,
  writeFileSync,
} from "node:fs";
import { execa } from "execa";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { readSafely, writeSafely } from "../../agent/store/safe-file.fs.ts";
import { StateStore } from "../../agent/store/state.fs.ts";
import { acquire, holder } from "../../agent/store/pid-lock.fs.ts";
import { EgressError } from "../../rules/errors.ts";

const test = suite("safe files: root is never steered by links in a directory another user owns");

const OTHER_UID = 64_997;

function scene() {
  const base = mkdtempSync(join(tmpdir(), "egressd-safe-"));
  const dir = join(base, "state");
  mkdirSync(dir);
  chownSync(dir, OTHER_UID, OTHER_UID);
  const precious = join(base, "precious");
  writeFileSync(precious, "root's\n", { mode: 0o600 });
  return { base, dir, precious, done: () => rmSync(base, { recursive: true, force: true }) };
}

async function refused(p: Promise<unknown>, text: string): Promise<void> {
  try {
    await p;
    assert.unreachable("expected a refusal");
  } catch (err) {
    assert.instance(err, EgressError);
    assert.is((err as EgressError).code, "ERR_EGRESS_UNSAFE_PATH");
    assert.is((err as EgressError).exitCode, 3);
    assert.match((err as EgressError).message, text);
  }
}

test("a link planted at the temporary name is never followed: the write is refused and the target untouched", async () => {
  const s = scene();
  try {
    const temp = join(s.dir, ".state.json.planted.tmp");
    symlinkSync(s.precious, temp);
    lchownSync(temp, OTHER_UID, OTHER_UID);
    await refused(
      writeSafely(join(s.dir, "state.json"), "{}", {
        mode: 0o600,
        owner: { uid: OTHER_UID, gid: OTHER_UID },
        owners: [OTHER_UID, 0],
        tempName: () => ".state.json.planted.tmp",
      }),
      "something already exists at the temporary name",
    );
    assert.is(readFileSync(s.precious, "utf8"), "root's\n");
    assert.is(statSync(s.precious).uid, 0, "not chowned");
    assert.ok(lstatSync(temp).isSymbolicLink(), "the planted link is left as it was");
  } finally {
    s.done();
  }
});

test("root's write gives the file to the directory's owner, through the descriptor", async () => {
  const s = scene();
  try {
    const store = new StateStore(s.dir);
    await store.save({ version: 2, savedAt: 1, names: {} });
    const st = statSync(join(s.dir, "state.json"));
    assert.equal([st.uid, st.gid, st.mode & 0o777], [OTHER_UID, OTHER_UID, 0o600]);
    assert.equal((await store.load()).state?.version, 2);
  } finally {
    s.done();
  }
});

test("reading through a planted link is refused, so root never reads another file's contents", async () => {
  const s = scene();
  try {
    writeFileSync(s.precious, '{"version":2,"names":{"secret":1}}');
    const file = join(s.dir, "state.json");
    symlinkSync(s.precious, file);
    await refused(readSafely(file, [OTHER_UID, 0]), "a symbolic link");
    await refused(new StateStore(s.dir).load(), "a symbolic link");
  } finally {
    s.done();
  }
});

test("a file owned by a third user is refused for reading and replacing", async () => {
  const s = scene();
  try {
    const file = join(s.dir, "state.json");
    writeFileSync(file, "{}");
    chownSync(file, 12345, 12345);
    await refused(readSafely(file, [OTHER_UID, 0]), "owned by uid 12345");
    await refused(
      new StateStore(s.dir).save({ version: 2, savedAt: 1, names: {} }),
      "owned by uid 12345",
    );
  } finally {
    s.done();
  }
});

test("a state dir that is a link someone else owns is refused", async () => {
  const s = scene();
  try {
    const link = join(s.base, "linked");
    symlinkSync(s.dir, link);
    lchownSync(link, OTHER_UID, OTHER_UID);
    await refused(new StateStore(link).load(), "a symbolic link owned by uid 64997");
  } finally {
    s.done();
  }
});

test("the daemon's lock file is never taken, truncated or read through a link, hard link or FIFO", async () => {
  const s = scene();
  try {
    const store = new StateStore(s.dir);
    const pidFile = store.lockFile;
    linkSync(s.precious, pidFile);
    await refused(store.lockForDaemon(), "a file with 2 hard links");
    await refused(holder(pidFile), "a file with 2 hard links");
    assert.is(readFileSync(s.precious, "utf8"), "root's\n", "not truncated, no pid written");
    rmSync(pidFile);

    symlinkSync(s.precious, pidFile);
    await refused(acquire(pidFile, { waitMs: 0 }), "a symbolic link");
    await refused(holder(pidFile), "a symbolic link");
    rmSync(pidFile);
    symlinkSync(join(s.base, "absent"), pidFile);
    await refused(acquire(pidFile, { waitMs: 0 }), "a symbolic link");
    assert.not.ok(existsSync(join(s.base, "absent")), "a dangling link is not created through");
    rmSync(pidFile);

    await execa("mkfifo", [pidFile]);
    await refused(acquire(pidFile, { waitMs: 0 }), "a FIFO");
    await refused(holder(pidFile), "a FIFO");
    rmSync(pidFile);

    writeFileSync(pidFile, "1\n");
    chownSync(pidFile, 12345, 12345);
    await refused(holder(pidFile), "owned by uid 12345");
    rmSync(pidFile);

    // A sound lock file works as before.
    const held = await store.lockForDaemon();
    assert.ok("release" in held);
    assert.is(readFileSync(pidFile, "utf8"), `${process.pid}\n`);
    assert.is(await holder(pidFile), null, "our own lock is not another holder");
    await held.release();
  } finally {
    s.done();
  }
});

test.run();
