/**
 * The metrics endpoint (SPEC §3 `metrics.listen`): plain HTTP answering GET /metrics and GET /
 * with the Prometheus text, on a unix socket (mode 0660: the daemon's user and group, and root)
 * or on HOST:PORT exactly. No authentication: bind TCP to loopback (docs/security.md).
 */
import { chmod, lstat, mkdir, unlink } from "node:fs/promises";
import { dirname } from "node:path";
import { createServer, type Server } from "node:http";
import { createConnection } from "node:net";
import { EgressError } from "../../rules/errors.ts";
import { parseListen, type Listen } from "../../rules/policy.ts";

export interface MetricsEndpoint {
  readonly listen: string;
  close(): Promise<void>;
}

function listenError(listen: string, why: string, hint: string): EgressError {
  return new EgressError("ERR_EGRESS_METRICS_LISTEN", `metrics.listen "${listen}": ${why}`, {
    exitCode: 3,
    hint,
  });
}

/** True when something accepts connections on the unix socket `path`. */
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

/**
 * Removes a socket file a killed daemon left at `path`; refuses when the path is anything but
 * a socket, or a socket someone still answers on.
 */
async function clearStale(listen: string, path: string): Promise<void> {
  const st = await lstat(path).catch((err: NodeJS.ErrnoException) => {
    if (err.code === "ENOENT") return null;
    throw listenError(listen, err.message, "check the path and its directory's permissions");
  });
  if (!st) return;
  if (!st.isSocket())
    throw listenError(
      listen,
      `${path} exists and is not a socket; egressd does not remove it`,
      "remove or move that file, or choose another metrics.listen path in egressd.json",
    );
  if (await answers(path))
    throw listenError(
      listen,
      `something already answers on ${path}`,
      "stop the other egressd, or choose another metrics.listen path in egressd.json",
    );
  await unlink(path);
}

/** Starts the endpoint. Rejects with ERR_EGRESS_METRICS_LISTEN, naming the address and why. */
export async function serveMetrics(
  listen: string,
  render: () => Promise<{ text: string; contentType: string }>,
  log: { warn(o: object, m: string): void },
): Promise<MetricsEndpoint> {
  const where: Listen | { error: string } = parseListen(listen);
  if ("error" in where)
    throw listenError(listen, where.error, "fix metrics.listen in egressd.json");
  const server: Server = createServer((req, res) => {
    const path = (req.url ?? "/").split("?")[0];
    if (req.method !== "GET" && req.method !== "HEAD") {
      res.writeHead(405, { allow: "GET, HEAD", "content-type": "text/plain" }).end("GET only\n");
      return;
    }
    if (path !== "/metrics" && path !== "/") {
      res.writeHead(404, { "content-type": "text/plain" }).end("see /metrics\n");
      return;
    }
    render().then(
      ({ text, contentType }) => {
        res.writeHead(200, { "content-type": contentType });
        res.end(req.method === "HEAD" ? undefined : text);
      },
      (err: unknown) => {
        log.warn({ code: "ERR_EGRESS_INTERNAL", error: String(err) }, "metrics scrape failed");
        res.writeHead(500, { "content-type": "text/plain" }).end("metrics unavailable\n");
      },
    );
  });
  server.requestTimeout = 10_000;
  server.headersTimeout = 5_000;
  if (where.kind === "unix") {
    await mkdir(dirname(where.path), { recursive: true, mode: 0o755 }).catch(() => undefined);
    await clearStale(listen, where.path);
  }
  try {
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      if (where.kind === "unix") server.listen(where.path, () => resolve());
      else server.listen({ host: where.host, port: where.port, exclusive: true }, () => resolve());
    });
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    throw listenError(
      listen,
      `cannot listen: ${e.message}`,
      e.code === "EADDRINUSE"
        ? "another program holds that address: choose another metrics.listen in egressd.json"
        : e.code === "EADDRNOTAVAIL"
          ? "that address is not on this host: use 127.0.0.1:PORT or [::1]:PORT"
          : "check the address and its permissions (ports below 1024 need privileges egressd's user does not have)",
    );
  }
  if (where.kind === "unix") await chmod(where.path, 0o660);
  return {
    listen,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}
