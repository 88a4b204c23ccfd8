import { suite } from "uvu";
import * as assert from "uvu/assert";
import { HOST_ADDRESSES, withSandbox, type Sandbox } from "../helpers/sandbox.ts";
import { API4, API6, DB, OTHER, SVC_UID, UNMANAGED_UID, V6HOST, WORLD } from "./world.ts";

const test = suite(
  "inbound allowances (servers under the service uid, clients from chosen sources)",
);

// The service's server answers on the host's own addresses; its clients are on the internet side.
const HOST = HOST_ADDRESSES.v4;
const HOST6 = HOST_ADDRESSES.v6;
const GOOD = API4[0] as string; // inside 192.0.2.0/24
const BAD = OTHER; // 198.51.100.20, outside it
const GOOD6 = V6HOST; // inside 2001:db8:1::/48
const BAD6 = API6; // 2001:db8::10, outside it

const SERVERS = [
  { proto: "tcp" as const, host: "::", port: 9080 },
  { proto: "tcp" as const, host: "::", port: 9081 },
  { proto: "tcp" as const, host: "::", port: 9082 },
  // UDP servers bind the served address: a wildcard socket may answer from another source address.
  { proto: "udp" as const, host: HOST, port: 6353 },
  { proto: "udp" as const, host: HOST, port: 6354 },
];

/** A client on the internet side, from `source`, to the service's server on the host. */
async function from(
  sb: Sandbox,
  source: string,
  proto: "tcp" | "udp",
  port: number,
  host = source.includes(":") ? HOST6 : HOST,
) {
  const [r] = await sb.probeFrom(UNMANAGED_UID, [{ proto, host, port, source, timeoutMs: 2000 }]);
  return r?.result;
}

async function setup(sb: Sandbox): Promise<void> {
  await sb.ok("register", "svc-web", "--user", String(SVC_UID));
  await sb.ok("allow-in", "svc-web", "9080", "--from", "192.0.2.0/24", "--from", "2001:db8:1::/48");
  await sb.ok("allow-in", "svc-web", "9081/tcp");
  await sb.ok("allow-in", "svc-web", "6353/udp", "--from", "192.0.2.0/24");
  await sb.ok("apply");
  await sb.serveAs(SVC_UID, SERVERS);
}

test("a declared port is reachable from its declared sources and refused from others; a port with no sources is open to all", async () => {
  await withSandbox(WORLD, async (sb) => {
    await setup(sb);
    assert.is(await from(sb, GOOD, "tcp", 9080), "connected");
    assert.is(await from(sb, BAD, "tcp", 9080), "ECONNREFUSED", "refused at once with a reset");
    assert.is(await from(sb, GOOD, "tcp", 9081), "connected");
    assert.is(await from(sb, BAD, "tcp", 9081), "connected");
  });
});

test("the service cannot complete a connection on a port it did not declare; another uid can", async () => {
  await withSandbox(WORLD, async (sb) => {
    await setup(sb);
    assert.is(await from(sb, GOOD, "tcp", 9082), "timeout", "its SYN-ACK never leaves");
    await sb.serveAs(UNMANAGED_UID, [{ proto: "tcp", host: "::", port: 9083 }]);
    assert.is(
      await from(sb, GOOD, "tcp", 9083),
      "connected",
      "an unmanaged server on an undeclared port is untouched",
    );
    const counters = await sb.nftJson("list", "counter", "inet", "egressd", "i_svc_web");
    assert.ok(Number(counters.nftables.find((o) => o.counter)?.counter?.packets) >= 1, "counted");
  });
});

test("UDP: declared port answers its sources only; an undeclared port gets no answer", async () => {
  await withSandbox(WORLD, async (sb) => {
    await setup(sb);
    assert.is(await from(sb, GOOD, "udp", 6353), "reply");
    assert.not.equal(await from(sb, BAD, "udp", 6353), "reply");
    assert.is(await from(sb, GOOD, "udp", 6354), "timeout");
  });
});

test("IPv6: declared sources connect, others are refused, undeclared ports never complete", async () => {
  await withSandbox(WORLD, async (sb) => {
    await setup(sb);
    assert.is(await from(sb, GOOD6, "tcp", 9080), "connected");
    assert.is(await from(sb, BAD6, "tcp", 9080), "ECONNREFUSED");
    assert.is(await from(sb, BAD6, "tcp", 9081), "connected");
    assert.is(await from(sb, GOOD6, "tcp", 9082), "timeout");
  });
});

test("an egress-locked server serves its port while its own outbound attempts are refused", async () => {
  await withSandbox(WORLD, async (sb) => {
    await setup(sb);
    assert.is(await from(sb, GOOD, "tcp", 9080), "connected");
    assert.is(await sb.try1(SVC_UID, "tcp", OTHER, 443), "ECONNREFUSED");
    assert.is(await sb.try1(SVC_UID, "udp", DB, 5353), "EPERM");
  });
});

test("revoke-in takes effect; list and dry-run show inbound allowances", async () => {
  await withSandbox(WORLD, async (sb) => {
    await setup(sb);
    assert.match(await sb.ok("list", "svc-web"), "in  9080/tcp from 192.0.2.0/24, 2001:db8:1::/48");
    assert.is(await from(sb, BAD, "tcp", 9081), "connected");
    await sb.ok("revoke-in", "svc-web", "9081");
    const dry = await sb.ok("apply", "--dry-run");
    // 9080 and 9081 were one range; now only 9080 is left.
    assert.match(dry, "- element in map in_dispatch: tcp . 9080-9081 : goto i_svc_web");
    assert.match(dry, "+ element in map in_dispatch: tcp . 9080 : goto i_svc_web");
    assert.match(dry, "- element in set s_svc_web_srvp: tcp . 9080-9081");
    await sb.ok("apply");
    assert.is(await from(sb, BAD, "tcp", 9081), "timeout");
    assert.is(await from(sb, GOOD, "tcp", 9080), "connected");
  });
});

test.run();
