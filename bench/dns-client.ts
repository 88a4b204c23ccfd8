/**
 * DNS load client for bench/dns-proxy.ts, run inside the benchmark namespace under a test uid
 * (setpriv), bundled like the test fixtures. Sends raw UDP queries (dns2 builds and parses the
 * messages) and prints one JSON object: the latency of each query in ms, and what went wrong
 * with those that did not come back NOERROR with an address.
 *
 * argv[2]: JSON { host, port, names: string[], concurrency, timeoutMs }
 *   concurrency 1: one query at a time, in order;
 *   concurrency N: the names in rounds of N, every query of a round sent at once (each from
 *   its own socket, as resolvers in separate processes or threads would), the next round
 *   once the whole round is answered.
 * Each query's socket is bound and connected before its clock starts: the figure is send to
 * answer, nothing else.
 */
import { createSocket, type Socket } from "node:dgram";
import DNS from "dns2";

interface Spec {
  host: string;
  port: number;
  names: string[];
  concurrency: number;
  timeoutMs: number;
}

const spec = JSON.parse(process.argv[2] ?? "{}") as Spec;
const RCODES = ["NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED"];

function query(name: string): Buffer {
  const p = new DNS.Packet();
  p.header.id = Math.floor(Math.random() * 65536);
  p.header.rd = 1;
  p.questions.push({ name, type: DNS.Packet.TYPE.A, class: DNS.Packet.CLASS.IN } as never);
  return p.toBuffer();
}

/** "" when the answer is NOERROR with an address, else what it was. */
function check(buf: Buffer): string {
  const r = DNS.Packet.parse(buf) as unknown as {
    header: { rcode: number };
    answers: { address?: string }[];
  };
  if (r.header.rcode !== 0) return RCODES[r.header.rcode] ?? String(r.header.rcode);
  return r.answers.some((a) => a.address) ? "" : "NODATA";
}

function open(): Promise<Socket> {
  const s = createSocket(spec.host.includes(":") ? "udp6" : "udp4");
  return new Promise((resolve, reject) => {
    s.once("error", reject);
    s.bind(0, () => s.connect(spec.port, spec.host, () => resolve(s)));
  });
}

/** Sends `name` on `s` (already connected) and resolves with [ms, problem]. */
function ask(s: Socket, name: string): Promise<[number, string]> {
  const msg = query(name);
  return new Promise((resolve) => {
    let t0 = 0;
    const done = (problem: string) => {
      const ms = performance.now() - t0;
      clearTimeout(timer);
      s.removeAllListeners("message");
      s.close();
      resolve([ms, problem ? `${name}=${problem}` : ""]);
    };
    const timer = setTimeout(() => done("timeout"), spec.timeoutMs);
    s.on("message", (m) => done(check(m)));
    s.on("error", (e: NodeJS.ErrnoException) => done(e.code ?? "error"));
    t0 = performance.now();
    s.send(msg);
  });
}

const ms: number[] = [];
const failed: string[] = [];
const step = Math.max(1, spec.concurrency);
for (let i = 0; i < spec.names.length; i += step) {
  const round = spec.names.slice(i, i + step);
  const sockets = await Promise.all(round.map(() => open()));
  const results = await Promise.all(round.map((name, j) => ask(sockets[j] as Socket, name)));
  for (const [t, problem] of results) {
    ms.push(t);
    if (problem) failed.push(problem);
  }
}
process.stdout.write(JSON.stringify({ ms, failed }) + "\n");
