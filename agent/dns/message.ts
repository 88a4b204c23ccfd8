/**
 * Reading and rewriting DNS messages for the proxy (pure; dns2 parses and builds them): which
 * addresses an answer gives the client, including the ipv4hint/ipv6hint of HTTPS and SVCB
 * records (browsers connect to those directly), and the answer without the records the address
 * filter refused.
 */
import DNS from "dns2";

export const TYPE = { A: 1, CNAME: 5, AAAA: 28, SVCB: 64, HTTPS: 65, OPT: 41 } as const;
export const RCODE = { NOERROR: 0, FORMERR: 1, SERVFAIL: 2, NXDOMAIN: 3, NOTIMP: 4, REFUSED: 5 };

export interface Rr {
  name: string;
  type: number;
  class: number;
  ttl: number;
  address?: string;
  domain?: string;
  /** Raw rdata of types dns2 does not know (HTTPS, SVCB). */
  data?: Buffer;
}

export interface Message {
  header: {
    id: number;
    qr: number;
    opcode: number;
    rd: number;
    tc: number;
    rcode: number;
    cd?: number;
  };
  questions: { name: string; type: number; class: number }[];
  answers: Rr[];
  authorities: Rr[];
  additionals: (Rr & { class: number; doFlag?: boolean })[];
  toBuffer(): Buffer;
}

export function parse(buf: Buffer): Message {
  return DNS.Packet.parse(buf) as unknown as Message;
}

function ipv6(bytes: Buffer): string {
  const groups: string[] = [];
  for (let i = 0; i < 16; i += 2) groups.push(bytes.readUInt16BE(i).toString(16));
  return groups.join(":");
}

/** The address hints of an HTTPS/SVCB record's rdata (RFC 9460 keys 4 and 6); null if malformed. */
export function svcbHints(rdata: Buffer): string[] | null {
  let i = 2; // SvcPriority
  // TargetName: uncompressed labels.
  for (let hops = 0; hops < 128; hops++) {
    const len = rdata[i];
    if (len === undefined || len >= 0xc0) return null;
    i += 1 + len;
    if (len === 0) break;
  }
  const out: string[] = [];
  while (i + 4 <= rdata.length) {
    const key = rdata.readUInt16BE(i);
    const len = rdata.readUInt16BE(i + 2);
    const value = rdata.subarray(i + 4, i + 4 + len);
    if (value.length !== len) return null;
    if (key === 4) {
      if (len % 4) return null;
      for (let j = 0; j < len; j += 4) out.push([...value.subarray(j, j + 4)].join("."));
    } else if (key === 6) {
      if (len % 16) return null;
      for (let j = 0; j < len; j += 16) out.push(ipv6(value.subarray(j, j + 16)));
    }
    i += 4 + len;
  }
  return i === rdata.length ? out : null;
}

const lower = (n: string) => n.toLowerCase().replace(/\.$/, "");

export interface AnswerAddresses {
  /** Addresses the client may connect to: A/AAAA and HTTPS/SVCB hints of the name and its CNAME chain. */
  addresses: string[];
  /** Smallest TTL among the records that gave them (and the CNAMEs on the way). */
  ttl: number;
}

/**
 * The addresses an answer gives for `qname`: records owned by the name or by a name its CNAME
 * chain (inside the answer) leads to. Records for other owners are not the client's answer and
 * add nothing.
 */
export function answerAddresses(msg: Message, qname: string): AnswerAddresses {
  const chain = new Set([lower(qname)]);
  let ttl = Infinity;
  for (let hops = 0; hops < 16; hops++) {
    const next = msg.answers.find(
      (r) =>
        r.type === TYPE.CNAME &&
        chain.has(lower(r.name)) &&
        r.domain &&
        !chain.has(lower(r.domain)),
    );
    if (!next) break;
    chain.add(lower(next.domain as string));
    ttl = Math.min(ttl, next.ttl);
  }
  const addresses: string[] = [];
  for (const r of msg.answers) {
    if (!chain.has(lower(r.name))) continue;
    if ((r.type === TYPE.A || r.type === TYPE.AAAA) && r.address) {
      addresses.push(r.address);
      ttl = Math.min(ttl, r.ttl);
    } else if ((r.type === TYPE.HTTPS || r.type === TYPE.SVCB) && r.data) {
      const hints = svcbHints(r.data);
      if (hints?.length) {
        addresses.push(...hints);
        ttl = Math.min(ttl, r.ttl);
      }
    }
  }
  return { addresses, ttl: addresses.length ? ttl : 0 };
}

/**
 * The answer without the records that carry a refused address: A/AAAA records of it, and
 * HTTPS/SVCB records with it among their hints (the client falls back to A/AAAA then).
 */
export function withoutAddresses(msg: Message, refused: ReadonlySet<string>): Buffer {
  const keep = (r: Rr) => {
    if ((r.type === TYPE.A || r.type === TYPE.AAAA) && r.address) return !refused.has(r.address);
    if ((r.type === TYPE.HTTPS || r.type === TYPE.SVCB) && r.data)
      return !(svcbHints(r.data) ?? []).some((a) => refused.has(a));
    return true;
  };
  msg.answers = msg.answers.filter(keep);
  msg.additionals = msg.additionals.filter(keep);
  return msg.toBuffer();
}

/** A reply to `request` carrying only a code (NXDOMAIN, REFUSED, SERVFAIL, FORMERR). */
export function codeReply(request: Message, rcode: number): Buffer {
  const r = DNS.Packet.createResponseFromRequest(request as never) as unknown as Message;
  r.header.rcode = rcode;
  (r.header as unknown as { ra: number }).ra = 1;
  return r.toBuffer();
}

/** A truncated reply (TC set, question only): the client asks again over TCP. */
export function truncatedReply(request: Message): Buffer {
  const r = DNS.Packet.createResponseFromRequest(request as never) as unknown as Message;
  r.header.tc = 1;
  (r.header as unknown as { ra: number }).ra = 1;
  return r.toBuffer();
}

/** The query to send upstream for a client's question: recursion desired, EDNS0 kept (DO bit too). */
export function upstreamQuery(request: Message): Buffer {
  const q = request.questions[0] as Message["questions"][number];
  const p = new DNS.Packet();
  p.header.rd = 1;
  (p.header as unknown as { cd: number }).cd = request.header.cd ?? 0;
  p.questions.push(q as never);
  const opt = request.additionals.find((r) => r.type === TYPE.OPT);
  const edns = DNS.Packet.Resource.EDNS as unknown as (rdata: unknown[], o: object) => unknown;
  p.additionals.push(edns([], { udpPayloadSize: 1232, doFlag: Boolean(opt?.doFlag) }) as never);
  return p.toBuffer();
}

/** The largest UDP reply the client accepts: its EDNS0 size, else 512. */
export function clientUdpLimit(request: Message): number {
  const opt = request.additionals.find((r) => r.type === TYPE.OPT);
  return opt ? Math.max(512, Math.min(opt.class, 4096)) : 512;
}
