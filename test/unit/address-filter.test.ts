import { suite } from "uvu";
import * as assert from "uvu/assert";
import {
  classify,
  filterAddresses,
  refuseReason,
  sortAddresses,
} from "../../rules/address-filter.ts";

const test = suite("the address filter: what a DNS answer may allow");

const open = { allowPrivateAddresses: true, hostAddresses: new Set<string>() };
const strict = { allowPrivateAddresses: false, hostAddresses: new Set<string>() };

/** [address, verdict with private addresses allowed, verdict without] (null: allowed). */
const TABLE: [string, string | null, string | null][] = [
  // Global unicast and documentation ranges pass.
  ["8.8.8.8", null, null],
  ["192.0.2.10", null, null],
  ["198.51.100.7", null, null],
  ["203.0.113.5", null, null],
  ["2606:4700::1111", null, null],
  ["2001:db8::10", null, null],
  ["3fff::1", null, null],
  // Never, whatever the config.
  ["127.0.0.1", "loopback", "loopback"],
  ["127.255.0.9", "loopback", "loopback"],
  ["::1", "loopback", "loopback"],
  ["0.0.0.0", "unspecified", "unspecified"],
  ["::", "unspecified", "unspecified"],
  ["0.1.2.3", "reserved", "reserved"],
  ["240.0.0.1", "reserved", "reserved"],
  ["198.18.0.1", "reserved", "reserved"],
  ["192.0.0.8", "reserved", "reserved"],
  ["255.255.255.255", "broadcast", "broadcast"],
  ["224.0.0.1", "multicast", "multicast"],
  ["ff02::1", "multicast", "multicast"],
  ["169.254.1.1", "link-local", "link-local"],
  ["fe80::1", "link-local", "link-local"],
  ["fec0::1", "site-local (deprecated)", "site-local (deprecated)"],
  ["100::1", "reserved", "reserved"],
  ["4000::1", "reserved", "reserved"],
  ["2001:2::1", "reserved", "reserved"],
  // Cloud metadata, even where the range itself would pass.
  ["169.254.169.254", "cloud metadata", "cloud metadata"],
  ["100.100.100.200", "cloud metadata", "cloud metadata"],
  ["168.63.129.16", "cloud metadata", "cloud metadata"],
  ["fd00:ec2::254", "cloud metadata", "cloud metadata"],
  // Private space follows allowPrivateAddresses.
  ["10.1.2.3", null, "private, and refresh.allowPrivateAddresses is false"],
  ["172.16.0.1", null, "private, and refresh.allowPrivateAddresses is false"],
  ["192.168.1.1", null, "private, and refresh.allowPrivateAddresses is false"],
  [
    "100.64.0.1",
    null,
    "shared address space (100.64.0.0/10), and refresh.allowPrivateAddresses is false",
  ],
  ["fd12:3456::1", null, "unique-local, and refresh.allowPrivateAddresses is false"],
  // IPv6 forms that carry IPv4 are judged by the IPv4 they carry.
  ["64:ff9b::7f00:1", "NAT64 of 127.0.0.1: loopback", "NAT64 of 127.0.0.1: loopback"],
  ["64:ff9b::c000:20a", null, null],
  [
    "64:ff9b::a9fe:a9fe",
    "NAT64 of 169.254.169.254: cloud metadata",
    "NAT64 of 169.254.169.254: cloud metadata",
  ],
  [
    "64:ff9b:1:7f00:0:100::",
    "NAT64 (local use) of 127.0.0.1: loopback",
    "NAT64 (local use) of 127.0.0.1: loopback",
  ],
  ["::ffff:127.0.0.1", "IPv4-mapped of 127.0.0.1: loopback", "IPv4-mapped of 127.0.0.1: loopback"],
  [
    "::ffff:169.254.169.254",
    "IPv4-mapped of 169.254.169.254: cloud metadata",
    "IPv4-mapped of 169.254.169.254: cloud metadata",
  ],
  [
    "::127.0.0.1",
    "IPv4-compatible of 127.0.0.1: loopback",
    "IPv4-compatible of 127.0.0.1: loopback",
  ],
  ["::2", "IPv4-compatible of 0.0.0.2: reserved", "IPv4-compatible of 0.0.0.2: reserved"],
  [
    "64:ff9b:1::7f00:1",
    "NAT64 (local use) of 127.0.0.1: loopback",
    "NAT64 (local use) of 127.0.0.1: loopback",
  ],
  ["64:ff9b:1::c000:20a", null, null],
  ["2002:a00:1::1", null, "6to4 of 10.0.0.1: private, and refresh.allowPrivateAddresses is false"],
  ["2002:7f00:1::1", "6to4 of 127.0.0.1: loopback", "6to4 of 127.0.0.1: loopback"],
  ["2002:c000:20a::1", null, null],
  [
    "2001:0:4136:e378:8000:63bf:80ff:fffe",
    "Teredo of 127.0.0.1: loopback",
    "Teredo of 127.0.0.1: loopback",
  ],
];

test("every address class gets its verdict, with and without private addresses", () => {
  for (const [address, withPrivate, without] of TABLE) {
    assert.is(refuseReason(address, open), withPrivate, `${address} (private allowed)`);
    assert.is(refuseReason(address, strict), without, `${address} (private refused)`);
  }
});

test("the host's own addresses are refused, also when carried inside IPv6", () => {
  const host = {
    allowPrivateAddresses: true,
    hostAddresses: new Set(["203.0.113.1", "2001:db8:ffff::1"]),
  };
  assert.is(refuseReason("203.0.113.1", host), "an address of this host");
  assert.is(refuseReason("2001:db8:ffff::1", host), "an address of this host");
  assert.is(refuseReason("2001:DB8:FFFF:0::1", host), "an address of this host", "any spelling");
  assert.is(
    refuseReason("64:ff9b::cb00:7101", host),
    "NAT64 of 203.0.113.1: an address of this host",
  );
  assert.is(refuseReason("203.0.113.2", host), null);
});

test("classify names the carrier and the IPv4 it carries", () => {
  assert.equal(classify("2001:0:4136:e378:8000:63bf:80ff:fffe")?.carrier, {
    name: "Teredo",
    ipv4: ["65.54.227.120", "127.0.0.1"],
  });
  assert.is(classify("not-an-address"), null);
  assert.is(classify("10.0.0.0/8"), null, "a network is not an address");
});

test("the filter keeps canonical, unique addresses, IPv4 first, and says why it dropped the rest", () => {
  const r = filterAddresses(
    ["2001:DB8:0::1", "192.0.2.9", "2001:db8::1", "127.0.0.1", "192.0.2.10"],
    open,
  );
  assert.equal(r.kept, ["192.0.2.9", "192.0.2.10", "2001:db8::1"]);
  assert.equal(r.dropped, [{ address: "127.0.0.1", reason: "loopback" }]);
});

test("addresses sort IPv4 first, then by value as numbers, not as text", () => {
  assert.equal(
    sortAddresses(["2001:db8::10", "192.0.2.10", "2001:db8::9", "192.0.2.9", "10.0.0.1"]),
    ["10.0.0.1", "192.0.2.9", "192.0.2.10", "2001:db8::9", "2001:db8::10"],
  );
  const many = Array.from({ length: 300 }, (_, i) => `198.51.${(i * 7) % 256}.${(i * 13) % 256}`);
  const sorted = sortAddresses(many);
  const num = (a: string) => a.split(".").reduce((n, o) => n * 256 + Number(o), 0);
  for (let i = 1; i < sorted.length; i++)
    assert.ok(
      num(sorted[i - 1] as string) <= num(sorted[i] as string),
      `${sorted[i - 1]} > ${sorted[i]}`,
    );
});

test.run();
