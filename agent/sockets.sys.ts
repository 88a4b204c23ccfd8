/** Reads the kernel's socket tables (/proc/net/*, which belong to the caller's network namespace). */
import { readFile } from "node:fs/promises";
import { endianness } from "node:os";
import { join } from "node:path";
import { EgressError } from "../rules/errors.ts";
import { parseProcNet, type Listener } from "../rules/listeners.ts";

export interface Sockets {
  /** The listening TCP and bound UDP sockets owned by `uid`, IPv4 and IPv6. */
  listeners(uid: number): Promise<Listener[]>;
}

const TABLES = [
  { file: "tcp", protocol: "tcp", family: 4 },
  { file: "tcp6", protocol: "tcp", family: 6 },
  { file: "udp", protocol: "udp", family: 4 },
  { file: "udp6", protocol: "udp", family: 6 },
] as const;

export function systemSockets(procNet = "/proc/net"): Sockets {
  const littleEndian = endianness() === "LE";
  return {
    async listeners(uid) {
      const out: Listener[] = [];
      for (const t of TABLES) {
        let text: string;
        try {
          text = await readFile(join(procNet, t.file), "utf8");
        } catch (err) {
          // No IPv6 in this kernel (or namespace): nothing listens there.
          if ((err as NodeJS.ErrnoException).code === "ENOENT") continue;
          throw new EgressError(
            "ERR_EGRESS_SOCKETS",
            `cannot read the kernel's socket table ${join(procNet, t.file)}: ${(err as Error).message}`,
            {
              exitCode: 3,
              hint: "register checks which ports the user listens on; pass --force to skip the check",
              cause: err,
            },
          );
        }
        out.push(
          ...parseProcNet(text, t.protocol, t.family, littleEndian).filter((l) => l.uid === uid),
        );
      }
      return out;
    },
  };
}
