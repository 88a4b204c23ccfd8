/**
 * The daemon's nft helper process: started with the daemon's own Node.js flags, so that the
 * second resident Node.js process of the service keeps the same small young generation.
 */
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { helperNft } from "../../agent/nft/helper.proc.ts";
import { DAEMON_NODE_FLAGS } from "../../agent/paths.ts";

const test = suite("nft helper process");

test("the helper runs with the daemon's Node.js flags and the helper flag", async () => {
  const dir = mkdtempSync(join(tmpdir(), "egressd-helper-"));
  // A stand-in for egressd's bundle: answers every request with how it was started.
  const entry = join(dir, "entry.cjs");
  writeFileSync(
    entry,
    "process.on('message', (m) => process.send({ id: m.id, ok: true, result: { execArgv: process.execArgv, argv: process.argv.slice(2) } }));\n" +
      "process.on('disconnect', () => process.exit(0));\n",
  );
  const nft = helperNft(entry);
  try {
    const got = (await nft.listTable("egressd")) as unknown as {
      execArgv: string[];
      argv: string[];
    };
    assert.equal(got.execArgv, DAEMON_NODE_FLAGS);
    assert.ok(DAEMON_NODE_FLAGS.includes("--max-semi-space-size=2"));
    assert.equal(got.argv, ["--nft-helper"]);
  } finally {
    nft.close();
    rmSync(dir, { recursive: true, force: true });
  }
});

test.run();
