/**
 * One DNS query to one resolver over the network, with a deadline: UDP first, and TCP when the
 * answer comes back truncated, both within the same deadline. Used by the refresh loop's
 * lookups and by the DNS proxy, so every query egressd sends has the same guarantees:
 * a fresh socket (random source port) and a random id per query, replies accepted only from
 * the resolver asked and only when id and question match, and nothing waits past the deadline.
 */
import { randomInt } from "node:crypto";
import { createSocket } from "node:dgram";
import { connect } from "node:net";
import type { ResolverAddr } from "../../rules/compile.ts";

export type ExchangeFailure = "TIMEOUT" | "UNREACHABLE" | "BAD_REPLY";

export class ExchangeError extends Error {
  constructor(
    readonly code: ExchangeFailure,
    message: string,
  ) {
    super(message);
  }
}

/** What one exchange did, for logs and metrics. */
export interface ExchangeEvent {
  server: string;
  transport: "udp" | "tcp";
  ms: number;
  /** The reply's rcode, or the failure. */
  outcome: number | ExchangeFailure;
}

export type ExchangeObserver = (e: ExchangeEvent) => void;

export const where = (s: ResolverAddr) =>
  s.family === 6 ? `[${s.address}]:${s.port}` : `${s.address}:${s.port}`;

/** The end of the question section (offset), or -1 when the message is malformed. */
export function questionEnd(msg: Buffer): number {
  if (msg.length < 12 || msg.readUInt16BE(4) !== 1) return -1;
  let i = 12;
  for (let hops = 0; hops < 128; hops++) {
    const len = msg[i];
    if (len === undefined) return -1;
    if (len === 0) return i + 5 <= msg.length ? i + 5 : -1;
    if (len >= 0xc0) return -1; // a question name is never compressed
    i += 1 + len;
  }
  return -1;
}

/** Same id, one question, and the same question (names compared case-insensitively). */
function matches(query: Buffer, reply: Buffer, qEnd: number): boolean {
  if (reply.length < qEnd || reply.readUInt16BE(0) !== query.readUInt16BE(0)) return false;
  if ((reply[2] as number) >> 7 !== 1 || reply.readUInt16BE(4) !== 1) return false;
  for (let i = 12; i < qEnd; i++) {
    const a = query[i] as number;
    const b = reply[i] as number;
    if (a !== b && (a | 0x20) !== (b | 0x20)) return false;
  }
  return true;
}

const truncated = (reply: Buffer) => ((reply[2] as number) & 0x02) !== 0;

/** Sends `query` (its id is replaced by a random one) to `server`; resolves with the reply. */
export async function exchange(
  server: ResolverAddr,
  query: Buffer,
  timeoutMs: number,
  observe?: ExchangeObserver,
): Promise<Buffer> {
  const msg = Buffer.from(query);
  msg.writeUInt16BE(randomInt(0, 65536), 0);
  const qEnd = questionEnd(msg);
  if (qEnd === -1) throw new ExchangeError("BAD_REPLY", "malformed query");
  const deadline = Date.now() + timeoutMs;
  const t0 = performance.now();
  const report = (transport: "udp" | "tcp", outcome: number | ExchangeFailure) =>
    observe?.({ server: where(server), transport, ms: performance.now() - t0, outcome });
  let reply: Buffer;
  try {
    reply = await udp(server, msg, qEnd, deadline);
  } catch (err) {
    report("udp", err instanceof ExchangeError ? err.code : "UNREACHABLE");
    throw err;
  }
  if (!truncated(reply)) {
    report("udp", (reply[3] as number) & 0x0f);
    return reply;
  }
  try {
    reply = await tcp(server, msg, qEnd, deadline);
  } catch (err) {
    report("tcp", err instanceof ExchangeError ? err.code : "UNREACHABLE");
    throw err;
  }
  report("tcp", (reply[3] as number) & 0x0f);
  return reply;
}

function timeoutError(server: ResolverAddr, transport: string, deadline: number, start: number) {
  return new ExchangeError(
    "TIMEOUT",
    `no ${transport} answer from ${where(server)} within ${Math.max(0, deadline - start)} ms`,
  );
}

function udp(server: ResolverAddr, msg: Buffer, qEnd: number, deadline: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const start = Date.now();
    const sock = createSocket(server.family === 6 ? "udp6" : "udp4");
    let done = false;
    const timers: NodeJS.Timeout[] = [];
    const finish = (err: Error | null, reply?: Buffer) => {
      if (done) return;
      done = true;
      for (const t of timers) clearTimeout(t);
      sock.close();
      if (err) reject(err);
      else resolve(reply as Buffer);
    };
    const send = () =>
      sock.send(msg, (err) => {
        if (err) finish(new ExchangeError("UNREACHABLE", `${where(server)}: ${err.message}`));
      });
    timers.push(
      setTimeout(
        () => finish(timeoutError(server, "UDP", deadline, start)),
        Math.max(0, deadline - start),
      ),
    );
    sock.on("error", (err) =>
      finish(new ExchangeError("UNREACHABLE", `${where(server)}: ${err.message}`)),
    );
    // A connected socket: the kernel delivers only datagrams from the resolver's address and
    // port, and an ICMP refusal comes back as an error instead of silence.
    sock.on("message", (reply) => {
      if (matches(msg, reply, qEnd)) finish(null, reply);
    });
    sock.connect(server.port, server.address, () => {
      send();
      // One retransmission, for a datagram lost on the way.
      const again = Math.floor((deadline - start) * 0.4);
      if (again > 0) timers.push(setTimeout(() => done || send(), again));
    });
  });
}

function tcp(server: ResolverAddr, msg: Buffer, qEnd: number, deadline: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const start = Date.now();
    const sock = connect({ host: server.address, port: server.port });
    let buf = Buffer.alloc(0);
    let done = false;
    const finish = (err: Error | null, reply?: Buffer) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      sock.destroy();
      if (err) reject(err);
      else resolve(reply as Buffer);
    };
    const timer = setTimeout(
      () => finish(timeoutError(server, "TCP", deadline, start)),
      Math.max(0, deadline - start),
    );
    sock.on("error", (err) =>
      finish(new ExchangeError("UNREACHABLE", `${where(server)} (TCP): ${err.message}`)),
    );
    sock.on("connect", () => {
      const len = Buffer.alloc(2);
      len.writeUInt16BE(msg.length);
      sock.write(Buffer.concat([len, msg]));
    });
    sock.on("data", (chunk: Buffer) => {
      buf = Buffer.concat([buf, chunk]);
      while (buf.length >= 2) {
        const len = buf.readUInt16BE(0);
        if (buf.length < 2 + len) return;
        const reply = buf.subarray(2, 2 + len);
        buf = buf.subarray(2 + len);
        if (matches(msg, reply, qEnd)) return finish(null, Buffer.from(reply));
      }
    });
    sock.on("end", () =>
      finish(new ExchangeError("BAD_REPLY", `${where(server)} (TCP) closed without an answer`)),
    );
  });
}

/**
 * Forwards a query to `servers` in order, each under `timeoutMs`, and returns the first answer
 * that is not SERVFAIL or REFUSED (or the last such answer, when every resolver gave one).
 * Throws the last failure when no resolver answered at all.
 */
export async function forward(
  servers: readonly ResolverAddr[],
  query: Buffer,
  timeoutMs: number,
  observe?: ExchangeObserver,
): Promise<Buffer> {
  let last: Buffer | null = null;
  let failure: Error = new ExchangeError("UNREACHABLE", "no resolvers configured");
  for (const server of servers) {
    try {
      const reply = await exchange(server, query, timeoutMs, observe);
      const rcode = (reply[3] as number) & 0x0f;
      if (rcode !== 2 && rcode !== 5) return reply;
      last = reply;
    } catch (err) {
      failure = err as Error;
    }
  }
  if (last) return last;
  throw failure;
}
