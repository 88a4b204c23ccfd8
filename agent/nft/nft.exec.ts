/**
 * Runs the `nft` program: the fallback when libnftables cannot be loaded, and the path tests
 * force with EGRESSD_NFT. Failures become one EgressError with command, exit code and stderr.
 */
import { closeSync, writeSync } from "node:fs";
import { execa, ExecaError } from "execa";
import { EgressError } from "../../rules/errors.ts";
import type { Batch } from "../../rules/batch.ts";
import { validateBatch } from "../../rules/nft-schema.ts";
import { nftFailed, noSuchTable, parseCounters, type Nft } from "./nft.ts";
import { batchFiles } from "./batch-files.fs.ts";

export type { Nft } from "./nft.ts";

/** `nft`, or the program named by EGRESSD_NFT (tests point it at a wrapper that counts calls). */
function nftBinary(): string {
  return process.env.EGRESSD_NFT || "nft";
}

async function run(bin: string, args: string[], stdin: number | "ignore" = "ignore") {
  try {
    // An open descriptor is a valid stdin (execa's types list only 3-9 among integers).
    const r = await execa(bin, args, { stdin: stdin as "ignore", timeout: 120_000 });
    return r.stdout;
  } catch (err) {
    if (err instanceof ExecaError) {
      const details = {
        command: `${bin} ${args.join(" ")}`,
        exitCode: err.exitCode,
        signal: err.signal,
      };
      if (err.code === "ENOENT") {
        throw new EgressError(
          "ERR_EGRESS_NFT_MISSING",
          `cannot run "${bin}": not installed or not on PATH`,
          {
            exitCode: 3,
            hint: "install nftables (apt-get install nftables / dnf install nftables)",
            details,
            cause: err,
          },
        );
      }
      const how = `exit ${String(err.exitCode ?? err.signal)}`;
      throw nftFailed(how, String(err.stderr ?? "").trim() || err.shortMessage, details, err);
    }
    throw err;
  }
}

/**
 * `nft -f -` cannot read a pipe that is a socket (Node's child stdio is one: nft opens
 * /dev/stdin and gets ENXIO). So the batch goes into a file in a private per-uid directory,
 * which is unlinked before nft starts: nft reads it through its stdin, an open descriptor of
 * the unnamed file, and nothing is left behind whatever happens to either process.
 */
async function runBatch(bin: string, batch: Batch, check: boolean): Promise<void> {
  validateBatch(batch);
  const fd = batchFiles().unnamed();
  try {
    const text = Buffer.from(JSON.stringify(batch));
    for (let off = 0; off < text.length;) off += writeSync(fd, text, off);
    await run(bin, [...(check ? ["-c"] : []), "-j", "-f", "/dev/stdin"], fd);
  } finally {
    closeSync(fd);
  }
}

/** The `nft` program, run through execa. */
export function execNft(bin: string = nftBinary(), detail = `nft program (${bin})`): Nft {
  return {
    backend: "nft",
    detail,
    apply: (batch) => runBatch(bin, batch, false),
    check: (batch) => runBatch(bin, batch, true),
    async listTable(table) {
      try {
        return JSON.parse(await run(bin, ["-j", "list", "table", "inet", table])) as unknown;
      } catch (err) {
        if (noSuchTable(err)) return null;
        throw err;
      }
    },
    async listSet(table, set) {
      try {
        return JSON.parse(await run(bin, ["-j", "list", "set", "inet", table, set])) as unknown;
      } catch (err) {
        if (noSuchTable(err)) return null;
        throw err;
      }
    },
    async listCounters(table) {
      try {
        return parseCounters(await run(bin, ["-j", "list", "counters", "table", "inet", table]));
      } catch (err) {
        if (noSuchTable(err)) return new Map();
        throw err;
      }
    },
  };
}
