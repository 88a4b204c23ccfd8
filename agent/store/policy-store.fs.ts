/**
 * Reads and writes the config dir: egressd.json and services.d/<service>.json.
 * Writes are atomic (temp file, fsync, rename) and read-modify-write runs under a lock,
 * so two egressctl commands at the same moment never lose either update.
 */
import { createHash } from "node:crypto";
import { constants } from "node:fs";
import { access, mkdir, readdir, readFile, rm } from "node:fs/promises";
import { join, relative } from "node:path";
import { EgressError, invalid, type Problem } from "../../rules/errors.ts";
import { parseJsonText } from "../../rules/json-text.ts";
import { acquire, type Held } from "./pid-lock.fs.ts";
import { writeSafely } from "./safe-file.fs.ts";
import {
  DEFAULT_CONFIG,
  serviceToJSON,
  validateConfig,
  validateService,
  type DaemonConfig,
  type ServicePolicy,
} from "../../rules/policy.ts";

export const CONFIG_FILE = "egressd.json";
export const SERVICES_DIR = "services.d";

/** An error from the file system, its code and hint chosen by errno. */
function fsError(err: unknown, what: string): EgressError {
  if (err instanceof EgressError) return err;
  const e = err as NodeJS.ErrnoException;
  if (e.code === "EACCES" || e.code === "EPERM") {
    return new EgressError("ERR_EGRESS_PERMISSION", `cannot ${what}: permission denied`, {
      exitCode: 3,
      hint: "the policy belongs to root: run egressctl as root (sudo egressctl ...)",
      cause: err,
    });
  }
  return new EgressError("ERR_EGRESS_FS", `cannot ${what}: ${e.message}`, {
    exitCode: 3,
    hint:
      e.code === "EROFS"
        ? "the file system is mounted read-only"
        : e.code === "ENOSPC"
          ? "the file system is full"
          : "check the path and its permissions",
    cause: err,
  });
}

/** What a file held when last read: a digest of its text, "" when it did not exist. */
export const digest = (text: string | null) =>
  text === null ? "" : createHash("sha256").update(text).digest("hex");

export class PolicyStore {
  /** The digest of each file as this store last read it (the daemon notices edits by it). */
  readonly digests = new Map<string, string>();

  constructor(readonly configDir: string) {}

  get configFile(): string {
    return join(this.configDir, CONFIG_FILE);
  }

  /** The digest of what `file` holds now ("" when it does not exist). */
  async currentDigest(file: string): Promise<string> {
    try {
      return digest(await readFile(file, "utf8"));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") return "";
      throw fsError(err, `read ${file}`);
    }
  }

  get servicesDir(): string {
    return join(this.configDir, SERVICES_DIR);
  }

  serviceFile(name: string): string {
    return join(this.servicesDir, `${name}.json`);
  }

  /** The service a policy file belongs to ("x.json" in services.d), or null. */
  serviceNameOf(file: string): string | null {
    const m = /^([^/.][^/]*)\.json$/.exec(relative(this.servicesDir, file));
    return m?.[1] ?? null;
  }

  /** The names of the policy files in services.d (what loadServices reads). */
  async listServiceNames(): Promise<string[]> {
    try {
      return (await readdir(this.servicesDir))
        .filter((e) => e.endsWith(".json") && !e.startsWith("."))
        .map((e) => e.slice(0, -".json".length))
        .sort();
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") return [];
      throw fsError(err, `read ${this.servicesDir}`);
    }
  }

  /** The daemon config; a missing file means all defaults. */
  async loadConfig(): Promise<DaemonConfig> {
    const file = join(this.configDir, CONFIG_FILE);
    let text: string;
    try {
      text = await readFile(file, "utf8");
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") {
        this.digests.set(file, "");
        return structuredClone(DEFAULT_CONFIG);
      }
      throw fsError(err, `read ${file}`);
    }
    this.digests.set(file, digest(text));
    return validateConfig(parseJsonText(text, file), file);
  }

  /** One service's policy, or null when it is not registered. */
  async loadService(name: string): Promise<ServicePolicy | null> {
    const file = this.serviceFile(name);
    let text: string;
    try {
      text = await readFile(file, "utf8");
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") {
        this.digests.set(file, "");
        return null;
      }
      throw fsError(err, `read ${file}`);
    }
    this.digests.set(file, digest(text));
    return validateService(parseJsonText(text, file), file, name);
  }

  /** Every service policy. Problems in all files are collected and reported together. */
  async loadServices(): Promise<ServicePolicy[]> {
    let entries: string[];
    try {
      entries = await readdir(this.servicesDir);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") return [];
      throw fsError(err, `read ${this.servicesDir}`);
    }
    const problems: Problem[] = [];
    const out: ServicePolicy[] = [];
    for (const entry of entries.filter((e) => e.endsWith(".json") && !e.startsWith(".")).sort()) {
      try {
        const p = await this.loadService(entry.slice(0, -".json".length));
        if (p) out.push(p);
      } catch (err) {
        if (err instanceof EgressError && err.exitCode === 2) {
          problems.push(
            ...(err.problems.length
              ? err.problems
              : [{ where: join(this.servicesDir, entry), text: err.message }]),
          );
        } else throw err;
      }
    }
    if (problems.length) {
      throw invalid(
        "ERR_EGRESS_POLICY_INVALID",
        `invalid service policies in ${this.servicesDir}`,
        problems,
        "fix the files named above, then retry",
      );
    }
    return out;
  }

  /** Runs `fn` while holding the config dir's lock. */
  async locked<T>(fn: () => Promise<T>): Promise<T> {
    try {
      await mkdir(this.servicesDir, { recursive: true, mode: 0o755 });
      // The lock library retries every error; say "permission denied" at once instead.
      await access(this.configDir, constants.W_OK);
      await access(this.servicesDir, constants.W_OK);
    } catch (err) {
      throw fsError(err, `change the policy in ${this.configDir}`);
    }
    const lockPath = join(this.configDir, ".egressctl.lock");
    let lock;
    try {
      // A lock left by a killed writer is taken over at once (its pid no longer runs).
      lock = await acquire(lockPath, { waitMs: 10_000 });
    } catch (err) {
      throw fsError(err, `lock ${this.configDir}`);
    }
    if ("owner" in lock) {
      throw new EgressError(
        "ERR_EGRESS_LOCKED",
        `cannot lock ${this.configDir}: egressctl (pid ${lock.owner}) has been changing the policy for 10 s`,
        {
          exitCode: 3,
          hint: `wait for it to finish, then retry (${lockPath} names the writer)`,
          details: { owner: lock.owner },
        },
      );
    }
    const release = () => (lock as Held).release();
    try {
      return await fn();
    } finally {
      await release();
    }
  }

  /** Writes a service policy atomically (call inside `locked`). */
  async writeService(p: ServicePolicy): Promise<void> {
    try {
      await writeSafely(this.serviceFile(p.name), serviceToJSON(p), { mode: 0o644 });
    } catch (err) {
      throw fsError(err, `write ${this.serviceFile(p.name)}`);
    }
  }

  async removeService(name: string): Promise<void> {
    try {
      await rm(this.serviceFile(name));
    } catch (err) {
      throw fsError(err, `remove ${this.serviceFile(name)}`);
    }
  }
}
