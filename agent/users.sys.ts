/** Looks users and groups up in the system's user database (NSS, via getent) and creates service users. */
import { existsSync } from "node:fs";
import { execa } from "execa";
import { EgressError } from "../rules/errors.ts";

export interface Principal {
  id: number;
  name?: string;
}

export interface Users {
  /** Looks up many users at once; the map has an entry for each spec that exists. */
  users(specs: readonly (string | number)[]): Promise<Map<string | number, Principal>>;
  groups(specs: readonly (string | number)[]): Promise<Map<string | number, Principal>>;
  /** Creates a locked system account with no login shell and a group of the same name. */
  createUser(name: string): Promise<Principal>;
}

const CHUNK = 256;

/** `getent DB key...` for many keys in few calls; missing keys are simply absent. */
async function getentMany(
  db: "passwd" | "group",
  keys: readonly string[],
): Promise<Map<string, Principal>> {
  const out = new Map<string, Principal>();
  for (let i = 0; i < keys.length; i += CHUNK) {
    const r = await execa("getent", [db, ...keys.slice(i, i + CHUNK)], {
      reject: false,
      stdin: "ignore",
    });
    if (r.exitCode !== 0 && r.exitCode !== 2) {
      throw new EgressError(
        "ERR_EGRESS_GETENT",
        `getent ${db} failed (exit ${String(r.exitCode)}): ${r.stderr}`,
        {
          exitCode: 3,
          hint: 'the user database did not answer: check /etc/nsswitch.conf and that "getent passwd root" works',
        },
      );
    }
    for (const line of r.stdout.split("\n")) {
      const [name, , idText] = line.split(":");
      const id = Number(idText);
      if (name && Number.isInteger(id)) out.set(name, { id, name });
    }
  }
  return out;
}

/** Numeric ids need no entry (containers use unnamed subordinate ids); names must exist. */
async function lookup(
  db: "passwd" | "group",
  specs: readonly (string | number)[],
): Promise<Map<string | number, Principal>> {
  const names = [...new Set(specs.filter((s): s is string => typeof s === "string"))];
  const found = names.length ? await getentMany(db, names) : new Map<string, Principal>();
  const out = new Map<string | number, Principal>();
  for (const s of specs) {
    if (typeof s === "number") out.set(s, { id: s });
    else {
      const p = found.get(s);
      if (p) out.set(s, p);
    }
  }
  return out;
}

export function systemUsers(): Users {
  return {
    users: (specs) => lookup("passwd", specs),
    groups: (specs) => lookup("group", specs),
    async createUser(name) {
      const shell = existsSync("/usr/sbin/nologin") ? "/usr/sbin/nologin" : "/sbin/nologin";
      const r = await execa(
        "useradd",
        [
          "--system",
          "--user-group",
          "--no-create-home",
          "--home-dir",
          "/nonexistent",
          "--shell",
          shell,
          "--comment",
          `egressd service ${name}`,
          name,
        ],
        { reject: false, stdin: "ignore" },
      );
      if (r.exitCode !== 0) {
        throw new EgressError(
          "ERR_EGRESS_USERADD",
          `could not create user "${name}": ${r.stderr.trim() || `useradd exited ${String(r.exitCode)}`}`,
          {
            exitCode: 3,
            hint: "create the account yourself (useradd --system) and register with --user",
            details: { command: r.command, exitCode: r.exitCode, stderr: r.stderr },
          },
        );
      }
      const made = (await getentMany("passwd", [name])).get(name);
      if (!made)
        throw new EgressError(
          "ERR_EGRESS_USERADD",
          `user "${name}" was created but cannot be looked up`,
          { exitCode: 3 },
        );
      return made;
    },
  };
}
