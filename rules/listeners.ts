/**
 * Listening sockets, from the kernel's socket tables (/proc/net/tcp, tcp6, udp, udp6), and
 * which of them a service's policy would cut off (pure: the text is read elsewhere).
 */
import { formatAddr, type Family } from "./addresses.ts";
import type { InboundRule } from "./policy.ts";
import { parsePorts, type Protocol } from "./target.ts";

/** A socket that accepts traffic: a TCP socket in LISTEN, or a bound, unconnected UDP socket. */
export interface Listener {
  protocol: Protocol;
  family: Family;
  address: string;
  port: number;
  uid: number;
}

const TCP_LISTEN = "0A";
/** An unconnected UDP socket shows the state TCP_CLOSE; a connected one, ESTABLISHED. */
const UDP_UNCONNECTED = "07";

/** "0100007F" (host byte order words, as the kernel prints them) -> 127.0.0.1. */
function hexAddress(hex: string, family: Family, littleEndian: boolean): string | null {
  if (hex.length !== (family === 4 ? 8 : 32) || !/^[0-9A-Fa-f]+$/.test(hex)) return null;
  let n = 0n;
  for (let i = 0; i < hex.length; i += 8) {
    const word = hex.slice(i, i + 8);
    const bytes = littleEndian ? (word.match(/../g) ?? []).reverse().join("") : word;
    n = (n << 32n) | BigInt(`0x${bytes}`);
  }
  return formatAddr(family, n);
}

/**
 * Parses one of /proc/net/{tcp,tcp6,udp,udp6}: the sockets that accept traffic, with their
 * owner's uid. `littleEndian` is the host's byte order (the kernel prints addresses in it).
 */
export function parseProcNet(
  text: string,
  protocol: Protocol,
  family: Family,
  littleEndian: boolean,
): Listener[] {
  const out: Listener[] = [];
  for (const line of text.split("\n").slice(1)) {
    const f = line.trim().split(/\s+/);
    if (f.length < 10) continue;
    const [addrHex, portHex] = (f[1] ?? "").split(":");
    const state = f[3];
    if (state !== (protocol === "tcp" ? TCP_LISTEN : UDP_UNCONNECTED)) continue;
    const port = parseInt(portHex ?? "", 16);
    const uid = Number(f[7]);
    const address = hexAddress(addrHex ?? "", family, littleEndian);
    if (!address || !Number.isInteger(port) || port === 0 || !Number.isInteger(uid)) continue;
    out.push({ protocol, family, address, port, uid });
  }
  return out;
}

/** The listeners whose port and protocol no inbound rule declares, one per protocol and port. */
export function undeclaredListeners(
  listeners: readonly Listener[],
  inbound: readonly InboundRule[],
): Listener[] {
  const declared = (l: Listener) =>
    inbound.some((r) => {
      const ports = parsePorts(r.ports);
      return (
        r.protocol === l.protocol &&
        !("error" in ports) &&
        ports.low <= l.port &&
        l.port <= ports.high
      );
    });
  const seen = new Set<string>();
  return [...listeners]
    .sort((a, b) => a.port - b.port || a.protocol.localeCompare(b.protocol))
    .filter((l) => {
      const key = `${l.protocol}/${l.port}`;
      if (declared(l) || seen.has(key)) return false;
      seen.add(key);
      return true;
    });
}

/** "8080/tcp (on ::)" */
export function listenerText(l: Listener): string {
  return `${l.port}/${l.protocol} (on ${l.family === 6 ? `[${l.address}]` : l.address})`;
}
