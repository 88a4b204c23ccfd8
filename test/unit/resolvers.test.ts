import { suite } from "uvu";
import * as assert from "uvu/assert";
import { parseResolvConf } from "../../agent/dns/resolvers.fs.ts";

const test = suite("which resolvers egressd uses");

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
