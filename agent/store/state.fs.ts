/**
 * The state dir: last-known resolutions and the last applied ruleset's digest. A cache, never
 * an authority (what is loaded is filtered like a fresh DNS answer, see dns/names.ts). The
 * dir belongs to the daemon's own user; root writes into it too (one-shot apply), so every
 * read and write goes through safe-file.fs.ts and never follows a link planted there.
 */
import { mkdir } from "node:fs/promises";
import { join } from "node:path";
import { EgressError } from "../../rules/errors.ts";
import { acquire, holder, type Held } from "./pid-lock.fs.ts";
import { checkReplaceable, dirOwner, ownersFor, readSafely, writeSafely } from "./safe-file.fs.ts";

export interface SavedState {
  /** 2: per-family resolutions; 1 (read only): one address list per name. */
  version: 1 | 2;
  savedAt: number;
  names: unknown;
  /** What DNS-aware services' proxies learned: service -> name -> address -> [expires, answered]. */
  learned?: unknown;
  /** The loopback port of each DNS-aware service's proxy, so a restart keeps it. */
  proxyPorts?: unknown;
  applied?: { digest: string; at: number };
}

export class StateStore {
  constructor(readonly dir: string) {}

  get file(): string {
    return join(this.dir, "state.json");
  }

  /** The lock a running daemon holds on this state dir for its whole life. */
  get lockFile(): string {
    return join(this.dir, "egressd.pid");
  }

  /** Takes the daemon's lock, or says which live egressd holds it. */
  async lockForDaemon(): Promise<Held | { owner: number }> {
    await mkdir(this.dir, { recursive: true, mode: 0o700 });
    await dirOwner(this.dir);
    return acquire(this.lockFile, { waitMs: 0 });
  }

  /**
   * Fails (exit 3) when a daemon runs on this state dir: it owns the kernel's table, and a
   * one-shot apply beside it would be a second writer.
   */
  async assertNoDaemon(what: string): Promise<void> {
    const pid = await holder(this.lockFile);
    if (pid === null) return;
    throw new EgressError(
      "ERR_EGRESS_RUNNING",
      `egressd (pid ${pid}) is running on ${this.dir}, so ${what} would be a second writer of its table`,
      {
        exitCode: 3,
        hint: "let the daemon apply it: egressctl apply (with the daemon's --socket), or systemctl reload egressd",
        details: { pid },
      },
    );
  }

  /**
   * The saved state, or null with the reason when there is none or it is unreadable (a fresh
   * start: DNS refills it). Throws (exit 3) when the path is unsafe: a link, or a file someone
   * else owns.
   */
  async load(): Promise<{ state: SavedState | null; problem?: string }> {
    let text: string | null;
    try {
      const owner = await dirOwner(this.dir);
      text = await readSafely(this.file, ownersFor(owner.uid));
    } catch (err) {
      if (err instanceof EgressError) throw err;
      const e = err as NodeJS.ErrnoException;
      if (e.code === "ENOENT") return { state: null };
      return { state: null, problem: `cannot read ${this.file}: ${e.message}` };
    }
    if (text === null) return { state: null };
    let data: SavedState;
    try {
      data = JSON.parse(text) as SavedState;
    } catch (err) {
      return { state: null, problem: `${this.file} is not valid JSON: ${(err as Error).message}` };
    }
    if (!data || typeof data !== "object" || (data.version !== 1 && data.version !== 2))
      return { state: null, problem: `${this.file}: unknown state version` };
    return { state: data };
  }

  /** Fails (exit 3) unless the state file could be written safely; writes nothing. */
  async checkWritable(): Promise<void> {
    try {
      const owner = await dirOwner(this.dir);
      await checkReplaceable(this.file, ownersFor(owner.uid));
    } catch (err) {
      if (err instanceof EgressError) throw err;
      if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
    }
  }

  /**
   * Writes the state atomically, owned by the state dir's owner: when root runs a one-shot
   * `egressctl apply`, the daemon (its own unprivileged user under systemd) can still read it.
   */
  async save(state: SavedState): Promise<void> {
    await mkdir(this.dir, { recursive: true, mode: 0o700 });
    const owner = await dirOwner(this.dir);
    await writeSafely(this.file, JSON.stringify(state) + "\n", {
      mode: 0o600,
      owner,
      owners: ownersFor(owner.uid),
    });
  }
}
