import { spawnSync } from "node:child_process";
import {
  chmodSync,
  chownSync,
  existsSync,
  fstatSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  rmSync,
  symlinkSync,
  writeFileSync,
  closeSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { batchFiles, privateDir, sweep } from "../../agent/nft/batch-files.fs.ts";
import { chooseNft } from "../../agent/nft/index.ts";
import { EgressError } from "../../rules/errors.ts";

const test = suite("nft backends: choice, and the nft program's private batch directory");

let base = "";
test.before.each(() => {
  base = mkdtempSync(join(tmpdir(), "egressd-unit-nft-"));
});
test.after.each(() => rmSync(base, { recursive: true, force: true }));

const refusal = (dir: string): EgressError => {
  try {
    privateDir(dir);
  } catch (err) {
    assert.instance(err, EgressError);
    return err as EgressError;
  }
  throw new Error(`privateDir accepted ${dir}`);
};

test("the private directory is made 0700 and owned by us; an existing good one is accepted", () => {
  const dir = join(base, "egressd-0");
  privateDir(dir);
  privateDir(dir);
  assert.equal(readdirSync(dir), []);
});

test("a symlink, a file, another uid's directory or a loose mode are refused, naming the path", () => {
  const link = join(base, "link");
  symlinkSync(base, link);
  assert.match(refusal(link).message, `${link}: it is a symbolic link`);
  const file = join(base, "file");
  writeFileSync(file, "");
  assert.match(refusal(file).message, "it is not a directory");
  const theirs = join(base, "theirs");
  mkdirSync(theirs, { mode: 0o700 });
  chownSync(theirs, 12_345, 12_345);
  assert.match(refusal(theirs).message, "owned by uid 12345");
  const loose = join(base, "loose");
  mkdirSync(loose);
  chmodSync(loose, 0o777);
  const e = refusal(loose);
  assert.match(e.message, "its mode is 0777, not 0700");
  assert.is(e.code, "ERR_EGRESS_TEMP_DIR");
  assert.is(e.exitCode, 3);
  assert.match(String(e.hint), `rm -r ${loose}`);
});

test("sweeping removes batch files of dead processes only", () => {
  const dir = join(base, "egressd-0");
  privateDir(dir);
  const dead = spawnSync(process.execPath, ["-e", "0"]).pid as number;
  for (const name of [
    `batch-${dead}-1.json`,
    `batch-${process.pid}-9.json`,
    `batch-${process.ppid}-1.json`,
    "notes.txt",
  ])
    writeFileSync(join(dir, name), "{}");
  assert.is(sweep(dir), 1);
  assert.equal(
    readdirSync(dir).sort(),
    [`batch-${process.pid}-9.json`, `batch-${process.ppid}-1.json`, "notes.txt"].sort(),
  );
});

test("a batch file is open but already unlinked, and the first use sweeps", () => {
  const dir = join(base, `egressd-${process.geteuid?.() ?? 0}`);
  mkdirSync(dir, { mode: 0o700 });
  const dead = spawnSync(process.execPath, ["-e", "0"]).pid as number;
  writeFileSync(join(dir, `batch-${dead}-3.json`), "{}");
  const files = batchFiles(base);
  assert.is(files.dir, dir);
  assert.equal(readdirSync(dir), [], "swept on first use");
  const fd = files.unnamed();
  assert.is(fstatSync(fd).mode & 0o777, 0o600);
  assert.is(fstatSync(fd).nlink, 0, "no name left on disk");
  closeSync(fd);
  // The directory vanished meanwhile: a new one is made and checked.
  rmSync(dir, { recursive: true });
  closeSync(files.unnamed());
  assert.ok(existsSync(dir));
});

test("EGRESSD_NFT forces the nft program; a library that will not load falls back to it, saying why", () => {
  const forced = chooseNft({ EGRESSD_NFT: "/opt/nft-wrapper" });
  assert.is(forced.backend, "nft");
  assert.is(forced.detail, "nft program (/opt/nft-wrapper, forced by EGRESSD_NFT)");
  const fallback = chooseNft({ EGRESSD_LIBNFTABLES: join(base, "libnftables.so.1") });
  assert.is(fallback.backend, "nft");
  assert.match(fallback.detail, `libnftables not loaded from ${join(base, "libnftables.so.1")}`);
});

test("libnftables is the default where it loads (it does here: nftables is installed)", () => {
  const nft = chooseNft({});
  assert.is(nft.backend, "libnftables");
  assert.match(nft.detail, "libnftables.so.1");
  (nft as { close?: () => void }).close?.();
});

test.run();
