/**
 * agent/dns/exchange.sock.ts against real sockets on loopback (no namespace needed): test DNS
 * servers on [::1] and 127.0.0.1 answer as each case scripts them. UDP, truncated-then-TCP,
 * IPv6 resolvers, random ids, and replies that must be ignored (wrong id, other question,
 * another source port).
 */
import { createSocket, type Socket as UdpSocket } from "node:dgram";
import { createServer, type Server, type Socket } from "node:net";
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { dnsResolver, queryMessage } from "../../agent/dns/dns.client.ts";
import {
  exchange,
  ExchangeError,
  questionEnd,
  type ExchangeEvent,
} from "../../agent/dns/exchange.sock.ts";
import { parse, TYPE } from "../../agent/dns/message.ts";
import type { ResolverAddr } from "../../rules/compile.ts";

const test = suite("the DNS exchange: UDP, TCP after truncation, IPv6 resolvers, ids, questions");

/** What the test server sends back for one query: zero or more replies, in order. */
type Script = (query: Buffer, transport: "udp" | "tcp") => Buffer[];

/**
 * A reply to `query`: its id and question unless overridden, QR set, TC when `tc`, one A
 * record per address (name compressed to the question's).
 */
function reply(
  query: Buffer,
  opts: { addresses?: string[]; tc?: boolean; id?: number; question?: Buffer } = {},
): Buffer {
  const question = opts.question ?? query.subarray(12, questionEnd(query));
  const addresses = opts.addresses ?? [];
  const header = Buffer.alloc(12);
  header.writeUInt16BE(opts.id ?? query.readUInt16BE(0), 0);
  header.writeUInt16BE(0x8180 | (opts.tc ? 0x0200 : 0), 2); // QR, RD, RA; TC when asked
  header.writeUInt16BE(1, 4);
  header.writeUInt16BE(addresses.length, 6);
  const answers = addresses.map((a) => {
    const rr = Buffer.alloc(16);
    rr.writeUInt16BE(0xc00c, 0); // the question's name
    rr.writeUInt16BE(TYPE.A, 2);
    rr.writeUInt16BE(1, 4);
    rr.writeUInt32BE(60, 6);
    rr.writeUInt16BE(4, 10);
    a.split(".").forEach((octet, i) => rr.writeUInt8(Number(octet), 12 + i));
    return rr;
  });
  return Buffer.concat([header, question, ...answers]);
}

/** The question section of a query for another name. */
const otherQuestion = () => {
  const q = queryMessage("other.example.test", TYPE.A);
  return q.subarray(12, questionEnd(q));
};

const addressesOf = (buf: Buffer) =>
  parse(buf)
    .answers.filter((r) => r.type === TYPE.A)
    .map((r) => String(r.address));

interface TestServer {
  addr: ResolverAddr;
  /** Every query received: transport and id. */
  seen: { transport: "udp" | "tcp"; id: number }[];
  /** The UDP socket, to send datagrams from the server's own port. */
  udp: UdpSocket;
  close(): Promise<void>;
}

/** A UDP and a TCP DNS server on the same port of `host` (::1 or 127.0.0.1), run by `script`. */
async function serve(host: "::1" | "127.0.0.1", script: Script): Promise<TestServer> {
  const family = host === "::1" ? 6 : 4;
  const udp = createSocket(family === 6 ? "udp6" : "udp4");
  await new Promise<void>((r) => udp.bind(0, host, () => r()));
  const port = udp.address().port;
  const seen: TestServer["seen"] = [];
  udp.on("message", (q, rinfo) => {
    seen.push({ transport: "udp", id: q.readUInt16BE(0) });
    for (const r of script(q, "udp")) udp.send(r, rinfo.port, rinfo.address);
  });
  const conns = new Set<Socket>();
  const tcp: Server = createServer((c) => {
    conns.add(c);
    c.on("close", () => conns.delete(c));
    c.on("error", () => undefined);
    let buf = Buffer.alloc(0);
    c.on("data", (chunk: Buffer) => {
      buf = Buffer.concat([buf, chunk]);
      while (buf.length >= 2 && buf.length >= 2 + buf.readUInt16BE(0)) {
        const q = Buffer.from(buf.subarray(2, 2 + buf.readUInt16BE(0)));
        buf = buf.subarray(2 + q.length);
        seen.push({ transport: "tcp", id: q.readUInt16BE(0) });
        for (const r of script(q, "tcp")) {
          const len = Buffer.alloc(2);
          len.writeUInt16BE(r.length);
          c.write(Buffer.concat([len, r]));
        }
      }
    });
  });
  await new Promise<void>((r, j) => {
    tcp.once("error", j);
    tcp.listen(port, host, () => r());
  });
  return {
    addr: { address: host, family, port },
    seen,
    udp,
    close: async () => {
      for (const c of conns) c.destroy();
      await new Promise<void>((r) => tcp.close(() => r()));
      await new Promise<void>((r) => udp.close(() => r()));
    },
  };
}

async function withServer<T>(
  host: "::1" | "127.0.0.1",
  script: Script,
  fn: (s: TestServer) => Promise<T>,
): Promise<T> {
  const s = await serve(host, script);
  try {
    return await fn(s);
  } finally {
    await s.close();
  }
}

const A = (name: string) => queryMessage(name, TYPE.A);

for (const host of ["::1", "127.0.0.1"] as const) {
  test(`UDP against ${host}: the answer comes back, over UDP only`, async () => {
    await withServer(
      host,
      (q) => [reply(q, { addresses: ["192.0.2.1"] })],
      async (s) => {
        const events: ExchangeEvent[] = [];
        const r = await exchange(s.addr, A("api.example.test"), 2000, (e) => events.push(e));
        assert.equal(addressesOf(r), ["192.0.2.1"]);
        assert.equal(
          s.seen.map((x) => x.transport),
          ["udp"],
        );
        assert.equal(
          events.map((e) => [e.server, e.transport, e.outcome]),
          [[host === "::1" ? `[::1]:${s.addr.port}` : `127.0.0.1:${s.addr.port}`, "udp", 0]],
        );
      },
    );
  });

  test(`a truncated UDP answer from ${host} is asked again over TCP, with the same id`, async () => {
    await withServer(
      host,
      (q, transport) =>
        transport === "udp" ? [reply(q, { tc: true })] : [reply(q, { addresses: ["192.0.2.2"] })],
      async (s) => {
        const events: ExchangeEvent[] = [];
        const r = await exchange(s.addr, A("big.example.test"), 2000, (e) => events.push(e));
        assert.equal(addressesOf(r), ["192.0.2.2"]);
        assert.equal(
          s.seen.map((x) => x.transport),
          ["udp", "tcp"],
        );
        assert.is(s.seen[0]?.id, s.seen[1]?.id, "one query, one id");
        assert.equal(
          events.map((e) => e.transport),
          ["tcp"],
          "reported once, as TCP",
        );
      },
    );
  });
}

test("the resolver (dns.client.ts) gets its addresses from an IPv6 resolver that truncates", async () => {
  await withServer(
    "::1",
    (q, transport) =>
      transport === "udp"
        ? [reply(q, { tc: true })]
        : [reply(q, { addresses: ["192.0.2.3", "192.0.2.4"] })],
    async (s) => {
      const r = await dnsResolver([s.addr], { timeoutMs: 2000 }).resolve("big.example.test", 4);
      assert.ok(r.ok, JSON.stringify(r));
      if (r.ok) assert.equal([...r.answer.addresses].sort(), ["192.0.2.3", "192.0.2.4"]);
    },
  );
});

test("query ids are random: 50 queries of one message with id 0, more than 40 distinct ids, not 0", async () => {
  await withServer(
    "::1",
    (q) => [reply(q, { addresses: ["192.0.2.1"] })],
    async (s) => {
      const q = A("api.example.test");
      q.writeUInt16BE(0, 0); // what dns2 used to send every time
      for (let i = 0; i < 50; i++) await exchange(s.addr, q, 2000);
      const ids = s.seen.map((x) => x.id);
      assert.is(ids.length, 50);
      const distinct = new Set(ids).size;
      assert.ok(distinct > 40, `${distinct} distinct ids of 50`);
      // 0 is one id in 65,536: 50 queries all landing off it is what a random id does; a
      // constant or counter-from-zero id fails here.
      assert.ok(ids.filter((x) => x === 0).length <= 1, `ids: ${ids.join(" ")}`);
    },
  );
});

test("a UDP reply with a wrong id or another question is ignored: the right one is taken", async () => {
  await withServer(
    "::1",
    (q) => [
      reply(q, { addresses: ["198.51.100.66"], id: (q.readUInt16BE(0) + 1) % 65536 }),
      reply(q, { addresses: ["198.51.100.67"], question: otherQuestion() }),
      reply(q, { addresses: ["192.0.2.1"] }),
    ],
    async (s) => {
      const r = await exchange(s.addr, A("api.example.test"), 2000);
      assert.equal(addressesOf(r), ["192.0.2.1"]);
    },
  );
});

test("with only a wrong id or another question, the UDP query times out at its deadline", async () => {
  for (const bad of [
    (q: Buffer) => reply(q, { addresses: ["198.51.100.66"], id: q.readUInt16BE(0) ^ 0x5555 }),
    (q: Buffer) => reply(q, { addresses: ["198.51.100.67"], question: otherQuestion() }),
  ]) {
    await withServer(
      "::1",
      (q) => [bad(q)],
      async (s) => {
        const t0 = Date.now();
        try {
          await exchange(s.addr, A("api.example.test"), 300);
          assert.unreachable("a mismatched reply was accepted");
        } catch (err) {
          if (!(err instanceof ExchangeError)) throw err;
          assert.is(err.code, "TIMEOUT");
        }
        const ms = Date.now() - t0;
        assert.ok(ms >= 290 && ms < 1500, `timed out at the deadline (${ms} ms)`);
        assert.ok(s.seen.length >= 1, "the server was asked");
      },
    );
  }
});

test("over TCP too, a reply with a wrong id or another question is skipped for the right one", async () => {
  await withServer(
    "::1",
    (q, transport) =>
      transport === "udp"
        ? [reply(q, { tc: true })]
        : [
            reply(q, { addresses: ["198.51.100.66"], id: q.readUInt16BE(0) ^ 1 }),
            reply(q, { addresses: ["198.51.100.67"], question: otherQuestion() }),
            reply(q, { addresses: ["192.0.2.5"] }),
          ],
    async (s) => {
      const r = await exchange(s.addr, A("api.example.test"), 2000);
      assert.equal(addressesOf(r), ["192.0.2.5"]);
    },
  );
});

test("a reply from another source port (an off-path spoof with the right id) is never seen", async () => {
  const spoofer = createSocket("udp6");
  await new Promise<void>((r) => spoofer.bind(0, "::1", () => r()));
  try {
    await withServer(
      "::1",
      () => [], // the resolver stays silent; only the spoofer answers
      async (s) => {
        s.udp.removeAllListeners("message");
        s.udp.on("message", (q, rinfo) => {
          s.seen.push({ transport: "udp", id: q.readUInt16BE(0) });
          spoofer.send(reply(q, { addresses: ["198.51.100.66"] }), rinfo.port, rinfo.address);
        });
        try {
          await exchange(s.addr, A("api.example.test"), 300);
          assert.unreachable("the spoofed reply was accepted");
        } catch (err) {
          if (!(err instanceof ExchangeError)) throw err;
          assert.is(err.code, "TIMEOUT");
        }
        assert.ok(s.seen.length >= 1, "the spoofer saw the query and answered it");
      },
    );
  } finally {
    spoofer.close();
  }
});

test.run();
