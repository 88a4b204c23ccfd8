/** Runs `nft` (the only place that does). Failures become one EgressError with command, exit code and stderr. */
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { execa, ExecaError } from "execa";
import { EgressError } from "../../rules/errors.ts";
import type { Batch } from "../../rules/batch.ts";
import { validateBatch } from "../../rules/nft-schema.ts";

export interface Nft {
  /** Applies a batch as one kernel transaction; all of it or none. */
  apply(batch: Batch): Promise<void>;
  /** Checks a batch in the kernel (`nft -c`) without applying it. */
  check(batch: Batch): Promise<void>;
  /** `nft -j list table inet <table>`, or null when the table does not exist. */
  listTable(table: string): Promise<unknown | null>;
  /** Named counters of the table (packets, bytes); empty when the table does not exist. */
  listCounters(table: string): Promise<Map<string, { packets: number; bytes: number }>>;
}

/** `nft`, or the program named by EGRESSD_NFT (tests point it at a wrapper that counts calls). */
function nftBinary(): string {
  return process.env.EGRESSD_NFT || "nft";
}

async function run(bin: string, args: string[]): Promise<string> {
  try {
    const r = await execa(bin, args, { stdin: "ignore", timeout: 120_000 });
    return r.stdout;
  } catch (err) {
    if (err instanceof ExecaError) {
      const stderr = String(err.stderr ?? "").trim();
      const notFound = err.code === "ENOENT";
      throw new EgressError(
        notFound ? "ERR_EGRESS_NFT_MISSING" : "ERR_EGRESS_NFT_FAILED",
        notFound
          ? `cannot run "${bin}": not installed or not on PATH`
          : `nft failed (exit ${String(err.exitCode ?? err.signal)}): ${stderr.split("\n").find((l) => l.trim()) ?? err.shortMessage}`,
        {
          exitCode: 3,
          hint: notFound
            ? "install nftables (apt-get install nftables / dnf install nftables)"
            : /Operation not permitted/.test(stderr)
              ? "run as root (or with CAP_NET_ADMIN)"
              : "the previous ruleset is still in force; see nft's message above",
          details: {
            command: `${bin} ${args.join(" ")}`,
            exitCode: err.exitCode,
            signal: err.signal,
            stderr,
          },
          cause: err,
        },
      );
    }
    throw err;
  }
}

/**
 * `nft -f -` cannot read a pipe that is a socket (Node's child stdio is one: nft opens
 * /dev/stdin and gets ENXIO), so the batch goes through a private temporary file.
 */
async function runBatch(bin: string, batch: Batch, check: boolean): Promise<void> {
  validateBatch(batch);
  const dir = await mkdtemp(join(tmpdir(), "egressd-"));
  try {
    const file = join(dir, "batch.json");
    await writeFile(file, JSON.stringify(batch), { mode: 0o600 });
    await run(bin, [...(check ? ["-c"] : []), "-j", "-f", file]);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

const noSuchTable = (err: unknown) =>
  err instanceof EgressError && /No such file or directory/.test(String(err.details?.stderr));

/** The real `nft`, run through execa. */
export function execNft(bin: string = nftBinary()): Nft {
  return {
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
    async listCounters(table) {
      const out = new Map<string, { packets: number; bytes: number }>();
      type Listing = {
        nftables?: { counter?: { name: string; packets: number; bytes: number } }[];
      };
      let listing: Listing;
      try {
        listing = JSON.parse(
          await run(bin, ["-j", "list", "counters", "table", "inet", table]),
        ) as Listing;
      } catch (err) {
        if (noSuchTable(err)) return out;
        throw err;
      }
      for (const o of listing.nftables ?? []) {
        if (o.counter)
          out.set(o.counter.name, { packets: o.counter.packets, bytes: o.counter.bytes });
      }
      return out;
    },
  };
}
