/** Finds and reads the files `egressctl check` validates: a config dir, a services.d dir, or single files. */
import { readdir, readFile, stat } from "node:fs/promises";
import { basename, join } from "node:path";
import type { CheckInput, FileKind, Finding } from "../../rules/check.ts";
import { CONFIG_FILE, SERVICES_DIR } from "./policy-store.fs.ts";

const isPolicyName = (entry: string) => entry.endsWith(".json") && !entry.startsWith(".");

async function entries(dir: string): Promise<string[]> {
  try {
    return (await readdir(dir)).sort();
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return [];
    throw err;
  }
}

/**
 * The files under `paths`. A directory is a config dir (its egressd.json and services.d/*.json)
 * and may itself be a services.d (its *.json); a file is a daemon config when named
 * egressd.json, else a service policy, unless `kind` says which. Paths that cannot be read
 * are findings, not exceptions, so one run reports them all.
 */
export async function readConfigFiles(
  paths: readonly string[],
  kind?: FileKind,
): Promise<{ inputs: CheckInput[]; unreadable: Finding[] }> {
  const inputs: CheckInput[] = [];
  const unreadable: Finding[] = [];
  const add = async (file: string, fileKind: FileKind) => {
    try {
      const text = await readFile(file, "utf8");
      const name = basename(file);
      // services.d/<name>.json must hold service <name>; a temporary file (an Ansible
      // `validate:` run) has another name and is checked for its content only.
      const expectedName =
        fileKind === "service" && name.endsWith(".json")
          ? name.slice(0, -".json".length)
          : undefined;
      inputs.push({ file, kind: fileKind, text, ...(expectedName ? { expectedName } : {}) });
    } catch (err) {
      unreadable.push({ file, path: null, text: `cannot read: ${(err as Error).message}` });
    }
  };
  for (const path of paths) {
    let isDir: boolean;
    try {
      isDir = (await stat(path)).isDirectory();
    } catch (err) {
      unreadable.push({ file: path, path: null, text: `cannot read: ${(err as Error).message}` });
      continue;
    }
    if (!isDir) {
      await add(path, kind ?? (basename(path) === CONFIG_FILE ? "config" : "service"));
      continue;
    }
    try {
      const top = await entries(path);
      if (top.includes(CONFIG_FILE)) await add(join(path, CONFIG_FILE), "config");
      for (const e of top.filter((e) => isPolicyName(e) && e !== CONFIG_FILE))
        await add(join(path, e), "service");
      const services = join(path, SERVICES_DIR);
      for (const e of (await entries(services)).filter(isPolicyName))
        await add(join(services, e), "service");
    } catch (err) {
      unreadable.push({ file: path, path: null, text: `cannot read: ${(err as Error).message}` });
    }
  }
  return { inputs, unreadable };
}
