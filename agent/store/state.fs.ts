/** The daemon's state dir: last-known resolutions and the last applied ruleset's digest, written atomically. */
import { mkdir, readFile, stat } from "node:fs/promises";
import { join } from "node:path";
import writeFileAtomic from "write-file-atomic";

export interface SavedState {
  version: 1;
  savedAt: number;
  names: unknown;
  applied?: { digest: string; at: number };
}

export class StateStore {
  constructor(readonly dir: string) {}

  get file(): string {
    return join(this.dir, "state.json");
  }

  /** The saved state, or null when there is none or it cannot be read (a fresh start). */
  async load(): Promise<{ state: SavedState | null; problem?: string }> {
    let text: string;
    try {
      text = await readFile(this.file, "utf8");
    } catch (err) {
      const e = err as NodeJS.ErrnoException;
      return e.code === "ENOENT"
        ? { state: null }
        : { state: null, problem: `cannot read ${this.file}: ${e.message}` };
    }
    try {
      const data = JSON.parse(text) as SavedState;
      if (data?.version !== 1)
        return { state: null, problem: `${this.file}: unknown state version` };
      return { state: data };
    } catch (err) {
      return { state: null, problem: `${this.file} is not valid JSON: ${(err as Error).message}` };
    }
  }

  /**
   * Writes the state atomically, owned by the state dir's owner: when root runs a one-shot
   * `egressctl apply`, the daemon (its own unprivileged user under systemd) can still read it.
   */
  async save(state: SavedState): Promise<void> {
    await mkdir(this.dir, { recursive: true, mode: 0o700 });
    const owner = await stat(this.dir);
    await writeFileAtomic(this.file, JSON.stringify(state) + "\n", {
      mode: 0o600,
      fsync: true,
      ...(process.getuid?.() === 0 ? { chown: { uid: owner.uid, gid: owner.gid } } : {}),
    });
  }
}
