/**
 * The control socket (SPEC §3): one JSON request per connection, one JSON reply.
 * A malformed, oversized or slow request gets an error reply; it never crashes the daemon.
 */
import { chmod, mkdir, unlink } from "node:fs/promises";
import { createConnection, createServer, type Server, type Socket } from "node:net";
import { dirname } from "node:path";
import type { Logger } from "pino";
import { EgressError } from "../../rules/errors.ts";

export const MAX_REQUEST = 64 * 1024;
const IDLE_MS = 10_000;

export interface Request {
  op: string;
  service?: string;
  dryRun?: boolean;
  repair?: boolean;
}

export type Reply =
  | { ok: true; result: unknown }
  | { ok: false; error: Record<string, unknown> & { exitCode: number } };

export type Handler = (req: Request) => Promise<unknown>;

function errorReply(err: unknown): Reply {
  const e =
    err instanceof EgressError
      ? err
      : new EgressError(
          "ERR_EGRESS_INTERNAL",
          `internal error: ${(err as Error)?.message ?? String(err)}`,
          { exitCode: 4 },
        );
  return { ok: false, error: { ...e.toJSON(), exitCode: e.exitCode } };
}

/** Parses one request line; throws a usage error naming what was wrong. */
export function parseRequest(line: string): Request {
  let raw: unknown;
  try {
    raw = JSON.parse(line);
  } catch {
    throw new EgressError("ERR_EGRESS_BAD_REQUEST", "control request is not JSON", { exitCode: 2 });
  }
  if (!raw || typeof raw !== "object" || typeof (raw as Request).op !== "string") {
    throw new EgressError("ERR_EGRESS_BAD_REQUEST", 'control request needs an "op" string', {
      exitCode: 2,
    });
  }
  const r = raw as Record<string, unknown>;
  for (const k of Object.keys(r)) {
    if (!["op", "service", "dryRun", "repair"].includes(k)) {
      throw new EgressError("ERR_EGRESS_BAD_REQUEST", `control request has unknown key "${k}"`, {
        exitCode: 2,
      });
    }
  }
  if (r.service !== undefined && typeof r.service !== "string") {
    throw new EgressError("ERR_EGRESS_BAD_REQUEST", '"service" must be a string', { exitCode: 2 });
  }
  return r as unknown as Request;
}

function handle(sock: Socket, handler: Handler, log: Logger): void {
  let buf = "";
  let done = false;
  const reply = (r: Reply) => {
    if (done) return;
    done = true;
    sock.end(JSON.stringify(r) + "\n");
  };
  sock.setEncoding("utf8");
  sock.setTimeout(IDLE_MS, () => {
    reply(
      errorReply(
        new EgressError("ERR_EGRESS_BAD_REQUEST", "control request not completed in time", {
          exitCode: 2,
        }),
      ),
    );
    sock.destroy();
  });
  sock.on("error", (err) => log.debug({ err: err.message }, "control connection error"));
  sock.on("data", (chunk: string) => {
    if (done) return;
    buf += chunk;
    if (buf.length > MAX_REQUEST) {
      log.warn({ code: "ERR_EGRESS_BAD_REQUEST", bytes: buf.length }, "control request too large");
      reply(
        errorReply(
          new EgressError(
            "ERR_EGRESS_BAD_REQUEST",
            `control request larger than ${MAX_REQUEST} bytes`,
            { exitCode: 2 },
          ),
        ),
      );
      sock.destroy();
      return;
    }
    const nl = buf.indexOf("\n");
    if (nl === -1) return;
    sock.setTimeout(0);
    let req: Request;
    try {
      req = parseRequest(buf.slice(0, nl));
    } catch (err) {
      log.warn(
        { code: "ERR_EGRESS_BAD_REQUEST", error: (err as Error).message },
        "bad control request",
      );
      reply(errorReply(err));
      return;
    }
    handler(req).then(
      (result) => reply({ ok: true, result }),
      (err: unknown) => reply(errorReply(err)),
    );
  });
}

/** Listens on `path` (mode 0600). Refuses to start when another daemon answers there. */
export async function serveControl(path: string, handler: Handler, log: Logger): Promise<Server> {
  await mkdir(dirname(path), { recursive: true, mode: 0o755 });
  if (await answers(path)) {
    throw new EgressError("ERR_EGRESS_RUNNING", `another egressd is already listening on ${path}`, {
      exitCode: 3,
      hint: "stop it first (systemctl stop egressd), or give this one another --socket",
    });
  }
  await unlink(path).catch(() => undefined);
  const server = createServer((sock) => handle(sock, handler, log));
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(path, () => resolve());
  });
  await chmod(path, 0o600);
  return server;
}

function answers(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = createConnection(path);
    s.once("connect", () => {
      s.destroy();
      resolve(true);
    });
    s.once("error", () => resolve(false));
  });
}

export type Call = (req: Request) => Promise<unknown>;

/**
 * A client for the daemon at `path`, or null when no daemon is running there
 * (no socket, or nobody listening). Errors the daemon returns are rethrown as EgressError.
 */
export async function connectDaemon(path: string, timeoutMs = 120_000): Promise<Call | null> {
  const probe = await new Promise<NodeJS.ErrnoException | null>((resolve) => {
    const s = createConnection(path);
    s.once("connect", () => {
      s.destroy();
      resolve(null);
    });
    s.once("error", (err: NodeJS.ErrnoException) => resolve(err));
  });
  if (probe) {
    if (probe.code === "ENOENT" || probe.code === "ECONNREFUSED") return null;
    throw new EgressError(
      "ERR_EGRESS_SOCKET",
      `cannot reach egressd at ${path}: ${probe.message}`,
      {
        exitCode: 3,
        hint:
          probe.code === "EACCES" ? "the control socket is root's: run as root" : "check --socket",
      },
    );
  }
  return (req) =>
    new Promise((resolve, reject) => {
      const s = createConnection(path);
      let buf = "";
      const timer = setTimeout(() => {
        s.destroy();
        reject(
          new EgressError(
            "ERR_EGRESS_SOCKET",
            `egressd did not answer within ${timeoutMs / 1000} s`,
            {
              exitCode: 3,
              hint: "egressd is busy or stuck: see its log (journalctl -u egressd); the change, if any, is saved",
            },
          ),
        );
      }, timeoutMs);
      s.setEncoding("utf8");
      s.on("connect", () => s.write(JSON.stringify(req) + "\n"));
      s.on("data", (d: string) => (buf += d));
      s.on("error", (err) => {
        clearTimeout(timer);
        reject(
          new EgressError("ERR_EGRESS_SOCKET", `lost egressd at ${path}: ${err.message}`, {
            exitCode: 3,
            hint: "egressd stopped while answering: see its log (journalctl -u egressd)",
          }),
        );
      });
      s.on("end", () => {
        clearTimeout(timer);
        let reply: Reply;
        try {
          reply = JSON.parse(buf) as Reply;
        } catch {
          reject(
            new EgressError("ERR_EGRESS_SOCKET", "egressd sent an unreadable reply", {
              exitCode: 3,
            }),
          );
          return;
        }
        if (reply.ok) resolve(reply.result);
        else {
          const e = reply.error as {
            code: string;
            message: string;
            hint?: string;
            problems?: [];
            details?: Record<string, unknown>;
            exitCode: number;
          };
          reject(
            new EgressError(e.code, e.message, {
              exitCode: (e.exitCode as 0 | 1 | 2 | 3 | 4) ?? 3,
              ...(e.hint ? { hint: e.hint } : {}),
              ...(e.problems ? { problems: e.problems } : {}),
              ...(e.details ? { details: e.details } : {}),
            }),
          );
        }
      });
    });
}
