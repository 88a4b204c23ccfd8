import { suite } from "uvu";
import * as assert from "uvu/assert";
import { formatTarget, parseTarget } from "../../rules/target.ts";

const test = suite("targets");

const valid: [string, { host: string; ports: string; protocol: string }][] = [
  ["api.example.com:443", { host: "api.example.com", ports: "443", protocol: "tcp" }],
  ["API.Example.COM.:443", { host: "api.example.com", ports: "443", protocol: "tcp" }],
  [
    "api.example.com:8000-8100/udp",
    { host: "api.example.com", ports: "8000-8100", protocol: "udp" },
  ],
  ["api.example.com:53/UDP", { host: "api.example.com", ports: "53", protocol: "udp" }],
  ["bücher.example:443", { host: "xn--bcher-kva.example", ports: "443", protocol: "tcp" }],
  ["10.0.0.5:5432", { host: "10.0.0.5", ports: "5432", protocol: "tcp" }],
  ["10.0.0.0/8:5432", { host: "10.0.0.0/8", ports: "5432", protocol: "tcp" }],
  ["10.0.0.5/32:5432", { host: "10.0.0.5", ports: "5432", protocol: "tcp" }],
  ["0.0.0.0/0:443", { host: "0.0.0.0/0", ports: "443", protocol: "tcp" }],
  ["[2001:db8::1]:443", { host: "2001:db8::1", ports: "443", protocol: "tcp" }],
  ["[2001:DB8:0:0::1]:443/tcp", { host: "2001:db8::1", ports: "443", protocol: "tcp" }],
  ["[2001:db8::/32]:443", { host: "2001:db8::/32", ports: "443", protocol: "tcp" }],
  ["a.b:1-65535", { host: "a.b", ports: "1-65535", protocol: "tcp" }],
  ["x-1.example.test:7-7", { host: "x-1.example.test", ports: "7", protocol: "tcp" }],
];

for (const [text, want] of valid) {
  test(`"${text}" is a valid target`, () => {
    const got = parseTarget(text);
    assert.equal(got, want);
    // The printed form parses back to the same allowance.
    if (!("error" in got)) assert.equal(parseTarget(formatTarget(got)), want);
  });
}

/** [input, a fragment the error must contain] */
const invalid: [string, string][] = [
  ["api.example.com:70000", 'invalid port "70000" in "api.example.com:70000": ports are 1-65535'],
  ["api.example.com:0", 'invalid port "0"'],
  ["api.example.com", 'missing port in "api.example.com"'],
  ["api.example.com:", "missing port"],
  [":443", "missing host"],
  ["api.example.com:https", 'invalid port "https"'],
  ["api.example.com:200-100", 'invalid port range "200-100"'],
  ["api.example.com:443/icmp", 'invalid protocol "icmp"'],
  ["api.example.com:443/", 'invalid protocol ""'],
  ["2001:db8::1:443", "write it in brackets"],
  ["[2001:db8::1:443", 'missing "]"'],
  ["[2001:db8::1]443", "missing port"],
  ["[10.0.0.1]:443", "only IPv6 addresses go in brackets"],
  ["[2001:db8::zz]:443", 'invalid address "2001:db8::zz"'],
  ["300.1.1.1:443", 'invalid address "300.1.1.1"'],
  ["10.0.0.1/8:443", "host bits are set; the network is 10.0.0.0/8"],
  ["10.0.0.0/33:443", 'invalid prefix length "/33"'],
  ["[2001:db8::/129]:443", 'invalid prefix length "/129"'],
  ["[::ffff:10.0.0.1]:443", "IPv4-mapped"],
  ["*example.com:443", 'a wildcard is "*." followed by a domain'],
  ["api.*.example.com:443", 'a wildcard is "*." followed by a domain'],
  ["*.*.example.com:443", 'a wildcard is "*." followed by a domain'],
  ["*.com:443", "write the fully qualified name"],
  ["localhost:443", "fully qualified"],
  ["exa_mple..com:443", "invalid domain name"],
  ["-bad.example.com:443", "invalid domain name"],
  ["1.2.3:443", 'invalid address "1.2.3"'],
  ["api.example.com/24:443", "neither an IP network nor a domain name"],
];

test("a wildcard names every name below a domain, stored in lowercase ASCII", () => {
  assert.equal(parseTarget("*.CDN.Example.test:443"), {
    host: "*.cdn.example.test",
    ports: "443",
    protocol: "tcp",
  });
  assert.equal(parseTarget("*.bücher.example:8443/udp"), {
    host: "*.xn--bcher-kva.example",
    ports: "8443",
    protocol: "udp",
  });
});

for (const [text, fragment] of invalid) {
  test(`"${text}" is rejected, naming the problem`, () => {
    const got = parseTarget(text);
    assert.ok("error" in got, `accepted: ${JSON.stringify(got)}`);
    if ("error" in got) assert.match(got.error, fragment);
  });
}

test.run();
