/** What egressd needs from nftables, whichever way it reaches the kernel; and the one error a refusal becomes. */
import { EgressError } from "../../rules/errors.ts";
import type { Batch } from "../../rules/batch.ts";

/** How batches reach the kernel: libnftables in-process, or the `nft` program. */
export type NftBackend = "libnftables" | "nft";

export interface Nft {
  /** Applies a batch as one kernel transaction; all of it or none. */
  apply(batch: Batch): Promise<void>;
  /** Checks a batch in the kernel (`nft -c`) without applying it. */
  check(batch: Batch): Promise<void>;
  /** `nft -j list table inet <table>`, or null when the table does not exist. */
  listTable(table: string): Promise<unknown | null>;
  /** `nft -j list set inet <table> <set>`, or null when the table or the set does not exist. */
  listSet(table: string, set: string): Promise<unknown | null>;
  /** Named counters of the table (packets, bytes); empty when the table does not exist. */
  listCounters(table: string): Promise<Map<string, { packets: number; bytes: number }>>;
  /** The path in use; reading it may load libnftables (once). */
  readonly backend: NftBackend;
  /** One line for logs and status: the library or program, and why the fallback was taken. */
  readonly detail: string;
  /** Releases what the adapter holds (a library context, a helper process); optional. */
  close?(): void;
}

export type Counters = Map<string, { packets: number; bytes: number }>;

/** nftables refused a command: the same error whether it came from the program or the library. */
export function nftFailed(
  how: string,
  stderr: string,
  details: Record<string, unknown>,
  cause?: unknown,
): EgressError {
  const first = stderr.split("\n").find((l) => l.trim()) ?? "no message";
  return new EgressError("ERR_EGRESS_NFT_FAILED", `nft failed (${how}): ${first}`, {
    exitCode: 3,
    hint: /Operation not permitted/.test(stderr)
      ? "run as root (or with CAP_NET_ADMIN)"
      : "the previous ruleset is still in force; see nft's message above",
    details: { ...details, stderr },
    ...(cause === undefined ? {} : { cause }),
  });
}

/** A listing of a table that is not there fails with ENOENT. */
export const noSuchTable = (err: unknown): boolean =>
  err instanceof EgressError && /No such file or directory/.test(String(err.details?.stderr));

/** The named counters of an `nft -j list counters` listing. */
export function parseCounters(text: string): Counters {
  type Listing = { nftables?: { counter?: { name: string; packets: number; bytes: number } }[] };
  const out: Counters = new Map();
  for (const o of (JSON.parse(text) as Listing).nftables ?? []) {
    if (o.counter) out.set(o.counter.name, { packets: o.counter.packets, bytes: o.counter.bytes });
  }
  return out;
}
