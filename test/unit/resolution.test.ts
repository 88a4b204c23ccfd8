import { suite } from "uvu";
import * as assert from "uvu/assert";
import { parseResolvConf } from "../../agent/dns/resolvers.fs.ts";
import { filterAddresses } from "../../rules/resolution.ts";

const test = suite("what DNS answers may allow");

test("loopback, link-local, unspecified, multicast and mapped addresses are never allowed", () => {
  const r = filterAddresses(
    [
      "127.0.0.1",
      "169.254.169.254",
      "0.0.0.0",
      "224.0.0.1",
      "255.255.255.255",
      "::1",
      "fe80::1",
      "::",
      "ff02::1",
      "::ffff:192.0.2.1",
      "192.0.2.1",
    ],
    { allowPrivate: true, max: 64 },
  );
  assert.equal(r.kept, ["192.0.2.1"]);
  assert.equal(
    r.dropped.map((d) => d.reason),
    [
      "loopback",
      "link-local",
      "unspecified",
      "multicast",
      "multicast",
      "loopback",
      "link-local",
      "unspecified",
      "multicast",
      "mapped",
    ],
  );
});

test("private ranges follow allowPrivateAddresses", () => {
  const addrs = ["10.1.2.3", "172.16.0.1", "192.168.1.1", "100.64.0.1", "fd00::1", "198.51.100.1"];
  assert.equal(filterAddresses(addrs, { allowPrivate: true, max: 64 }).kept.length, 6);
  const r = filterAddresses(addrs, { allowPrivate: false, max: 64 });
  assert.equal(r.kept, ["198.51.100.1"]);
  assert.ok(r.dropped.every((d) => d.reason === "private"));
});

test("at most maxAddressesPerName are kept, the same ones whatever the answer order", () => {
  const addrs = ["192.0.2.9", "192.0.2.3", "192.0.2.10", "2001:db8::1", "192.0.2.1"];
  const a = filterAddresses(addrs, { allowPrivate: true, max: 3 });
  const b = filterAddresses([...addrs].reverse(), { allowPrivate: true, max: 3 });
  assert.equal(a.kept, ["192.0.2.1", "192.0.2.3", "192.0.2.9"]);
  assert.equal(b.kept, a.kept);
  assert.is(a.dropped.length, 2);
});

test("duplicates and non-canonical spellings collapse", () => {
  assert.equal(
    filterAddresses(["2001:DB8:0::1", "2001:db8::1"], { allowPrivate: true, max: 8 }).kept,
    ["2001:db8::1"],
  );
});

test("resolv.conf nameserver lines are read; zoned link-local servers are skipped", () => {
  const r = parseResolvConf(
    "# comment\nnameserver 127.0.0.53\nsearch example\nnameserver 2001:db8::53\nnameserver fe80::1%eth0\noptions edns0\n",
  );
  assert.equal(r, [
    { address: "127.0.0.53", family: 4, port: 53 },
    { address: "2001:db8::53", family: 6, port: 53 },
  ]);
});

test.run();
