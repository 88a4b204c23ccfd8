import DNS from "dns2";
import { suite } from "uvu";
import * as assert from "uvu/assert";
import {
  answerAddresses,
  parse,
  svcbHints,
  withoutAddresses,
  type Message,
} from "../../agent/dns/message.ts";

const test = suite("DNS messages the proxy reads: which addresses an answer gives the client");

type Rr = {
  name: string;
  type: number;
  ttl: number;
  address?: string;
  domain?: string;
  data?: Buffer;
};

function answer(qname: string, answers: Rr[]): Message {
  const p = new DNS.Packet();
  p.header.qr = 1;
  p.questions.push({ name: qname, type: 1, class: 1 } as never);
  for (const r of answers) p.answers.push({ class: 1, ...r } as never);
  return parse(p.toBuffer());
}

/** HTTPS rdata: priority 1, target ".", alpn h2, then the given hints. */
function https(v4: number[][], v6: Buffer[] = []): Buffer {
  const parts: Buffer[] = [Buffer.from([0, 1, 0]), Buffer.from([0, 1, 0, 3, 2, 0x68, 0x32])];
  if (v4.length) parts.push(Buffer.from([0, 4, 0, v4.length * 4, ...v4.flat()]));
  if (v6.length) parts.push(Buffer.from([0, 6, 0, v6.length * 16]), ...v6);
  return Buffer.concat(parts);
}

test("the hints of an HTTPS record are read, IPv4 and IPv6; a malformed record gives none", () => {
  const v6 = Buffer.alloc(16);
  v6.writeUInt16BE(0x2001, 0);
  v6.writeUInt16BE(0x0db8, 2);
  v6.writeUInt16BE(0x0001, 14);
  assert.equal(
    svcbHints(
      https(
        [
          [192, 0, 2, 1],
          [192, 0, 2, 2],
        ],
        [v6],
      ),
    ),
    ["192.0.2.1", "192.0.2.2", "2001:db8:0:0:0:0:0:1"],
  );
  assert.is(svcbHints(Buffer.from([0, 1, 0, 0, 4, 0, 3, 1, 2, 3])), null, "ipv4hint of 3 bytes");
  assert.is(svcbHints(Buffer.from([0, 1, 0xc0, 0x0c])), null, "a compressed target");
});

test("addresses come from the name and its CNAME chain, A, AAAA and HTTPS hints alike; the smallest TTL on the way counts", () => {
  const m = answer("www.example.test", [
    { name: "www.example.test", type: 5, ttl: 300, domain: "edge.cdn.test" },
    { name: "edge.cdn.test", type: 1, ttl: 20, address: "192.0.2.7" },
    { name: "edge.cdn.test", type: 28, ttl: 60, address: "2001:db8::7" },
    { name: "edge.cdn.test", type: 65, ttl: 90, data: https([[192, 0, 2, 8]]) },
  ]);
  assert.equal(answerAddresses(m, "WWW.example.test."), {
    addresses: ["192.0.2.7", "2001:db8::7", "192.0.2.8"],
    ttl: 20,
  });
});

test("records for owners outside the chain are not the client's answer and add nothing", () => {
  const m = answer("api.example.test", [
    { name: "api.example.test", type: 1, ttl: 60, address: "192.0.2.1" },
    { name: "evil.example.test", type: 1, ttl: 60, address: "198.51.100.66" },
  ]);
  assert.equal(answerAddresses(m, "api.example.test").addresses, ["192.0.2.1"]);
  assert.equal(answerAddresses(answer("x.test", []), "x.test"), { addresses: [], ttl: 0 });
});

test("refused addresses are taken out of the answer, with the HTTPS records that carry them", () => {
  const m = answer("api.example.test", [
    { name: "api.example.test", type: 1, ttl: 60, address: "192.0.2.1" },
    { name: "api.example.test", type: 1, ttl: 60, address: "127.0.0.1" },
    { name: "api.example.test", type: 65, ttl: 60, data: https([[127, 0, 0, 1]]) },
  ]);
  const out = parse(withoutAddresses(m, new Set(["127.0.0.1"])));
  assert.equal(answerAddresses(out, "api.example.test").addresses, ["192.0.2.1"]);
  assert.is(out.answers.length, 1);
});

test.run();
