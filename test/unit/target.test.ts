import { suite } from "uvu";
import * as assert from "uvu/assert";
import {
  ADDRESS_HINT,
  DOMAIN_HINT,
  formatTarget,
  parseHost,
  parseTarget,
  PORT_HINT,
  PROTOCOL_HINT,
  TARGET_HINT,
} from "../../rules/target.ts";

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
  // Underscores occur in real DNS names (_dmarc, service records), so names may carry them.
  ["my_host.example.com:443", { host: "my_host.example.com", ports: "443", protocol: "tcp" }],
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
  ["db:5432", "write the fully qualified name, e.g. db.example.com"],
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

const LONG = `${"a".repeat(60)}.`.repeat(4) + "abcdefghijklmno"; // 259 characters

/** [input, the exact error, the exact hint]: the hint follows from the part that failed. */
const explained: [string, string, string][] = [
  [
    "bad:host:1",
    'invalid host "bad:host" in "bad:host:1": too many colons; a name cannot contain ":" and HOST:PORT has exactly one',
    TARGET_HINT,
  ],
  [
    "https://api.example.com:443/",
    '"https://api.example.com:443/" is a URL, not a target: write HOST:PORT, e.g. api.example.com:443',
    TARGET_HINT,
  ],
  [
    "https://api.example.com/v1",
    '"https://api.example.com/v1" is a URL, not a target: write HOST:PORT, e.g. api.example.com:443',
    TARGET_HINT,
  ],
  [
    "2001:db8::1:443",
    'unbracketed IPv6 address "2001:db8::1" in "2001:db8::1:443": write it in brackets, e.g. [2001:db8::1]:443',
    TARGET_HINT,
  ],
  [
    `${LONG}:443`,
    `invalid domain name "${"a".repeat(40)}…" in "${"a".repeat(40)}…": 259 characters; a domain name is at most 253`,
    DOMAIN_HINT,
  ],
  [
    `${"a".repeat(64)}.com:443`,
    `invalid domain name "${"a".repeat(40)}…" in "${"a".repeat(40)}…": the label "${"a".repeat(64)}" is 64 characters; labels are at most 63`,
    DOMAIN_HINT,
  ],
  [
    "localhost:5432",
    'invalid host "localhost" in "localhost:5432": "localhost" is this host\'s own loopback, which egressd does not look up in DNS',
    "allow the loopback address instead: 127.0.0.1:5432 or [::1]:5432",
  ],
  [
    "exa_mple..com:443",
    'invalid domain name "exa_mple..com" in "exa_mple..com:443": an empty label (two dots in a row, or a leading dot)',
    DOMAIN_HINT,
  ],
  [
    "bad host.example.com:443",
    'invalid domain name "bad host.example.com" in "bad host.example.com:443": " " is not allowed in a domain name',
    DOMAIN_HINT,
  ],
  ["api.example.com:0", 'invalid port "0" in "api.example.com:0": ports are 1-65535', PORT_HINT],
  [
    "api.example.com:443/icmp",
    'invalid protocol "icmp" in "api.example.com:443/icmp": use tcp or udp',
    PROTOCOL_HINT,
  ],
  [
    "1.2.3:443",
    'invalid address "1.2.3" in "1.2.3:443": not an IPv4 or IPv6 address',
    ADDRESS_HINT,
  ],
];

for (const [text, error, hint] of explained) {
  test(`"${text.slice(0, 40)}" is rejected with a message and a hint about what failed`, () => {
    assert.equal(parseTarget(text), { error, hint });
  });
}

test("the domain-name hint lists underscores, as the parser accepts them", () => {
  assert.match(DOMAIN_HINT, "letters, digits, hyphens and underscores");
  assert.equal(parseHost("_dmarc.example.com"), { kind: "domain", name: "_dmarc.example.com" });
});

test("a policy file's host of localhost suggests the loopback addresses", () => {
  const r = parseHost("localhost");
  assert.ok("error" in r);
  if ("error" in r) assert.is(r.hint, "allow the loopback address instead: 127.0.0.1 or ::1");
});

test.run();
