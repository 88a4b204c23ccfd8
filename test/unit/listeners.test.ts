import { suite } from "uvu";
import * as assert from "uvu/assert";
import { listenerText, parseProcNet, undeclaredListeners } from "../../rules/listeners.ts";

const test = suite("listening sockets from the kernel's socket tables");

const HEAD =
  "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n";
const row = (local: string, remote: string, state: string, uid: number) =>
  `   0: ${local} ${remote} ${state} 00000000:00000000 00:00000000 00000000  ${uid}        0 12345 1 0000000000000000 100 0 0 10 0\n`;

test("a TCP socket in LISTEN is a listener; an established one is not", () => {
  const text =
    HEAD +
    row("0100007F:1F90", "00000000:0000", "0A", 2001) + // 127.0.0.1:8080, LISTEN
    row("0100007F:C350", "0100007F:1F90", "01", 2001); // a client connection
  assert.equal(parseProcNet(text, "tcp", 4, true), [
    { protocol: "tcp", family: 4, address: "127.0.0.1", port: 8080, uid: 2001 },
  ]);
});

test("IPv6 addresses are read word by word in the host's byte order", () => {
  const any = "00000000000000000000000000000000";
  const doc = "B80D0120000000000000000001000000"; // 2001:db8::1 on a little-endian host
  const text =
    HEAD + row(`${any}:1F91`, `${any}:0000`, "0A", 0) + row(`${doc}:01BB`, `${any}:0000`, "0A", 7);
  assert.equal(
    parseProcNet(text, "tcp", 6, true).map((l) => [l.address, l.port, l.uid]),
    [
      ["::", 8081, 0],
      ["2001:db8::1", 443, 7],
    ],
  );
  assert.equal(
    parseProcNet(HEAD + row("7F000001:0035", "00000000:0000", "0A", 0), "tcp", 4, false)[0]
      ?.address,
    "127.0.0.1",
    "big-endian hosts print the address as it is",
  );
});

test("a bound, unconnected UDP socket is a listener; a connected one is not", () => {
  const text =
    HEAD +
    row("017100CB:18D1", "00000000:0000", "07", 2001) + // 203.0.113.1:6353, unconnected
    row("017100CB:D431", "0100007F:0035", "01", 2001); // connected to a DNS server
  assert.equal(parseProcNet(text, "udp", 4, true).map(listenerText), ["6353/udp (on 203.0.113.1)"]);
});

test("only ports the policy does not declare are reported, once per port and protocol", () => {
  const l = (protocol: "tcp" | "udp", port: number, address = "0.0.0.0") => ({
    protocol,
    family: 4 as const,
    address,
    port,
    uid: 2001,
  });
  const got = undeclaredListeners(
    [l("tcp", 9090), l("tcp", 8080), l("tcp", 9090, "127.0.0.1"), l("udp", 8080), l("tcp", 8050)],
    [
      { ports: "8080", protocol: "tcp" },
      { ports: "8000-8060", protocol: "tcp", from: ["192.0.2.0/24"] },
    ],
  );
  assert.equal(got.map(listenerText), ["8080/udp (on 0.0.0.0)", "9090/tcp (on 0.0.0.0)"]);
});

test.run();
