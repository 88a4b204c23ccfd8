import { createHash } from "node:crypto";
import {
  chmodSync,
  copyFileSync,
  cpSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { execa } from "execa";
import { EGRESSCTL } from "../helpers/sandbox.ts";

const test = suite("egressctl: argv in, stdout/stderr/exit code out");

let dir = "";

function run(...args: string[]) {
  return execa(
    process.execPath,
    [
      EGRESSCTL,
      "--config-dir",
      dir,
      "--state-dir",
      join(dir, "state"),
      "--socket",
      join(dir, "sock"),
      ...args,
    ],
    {
      reject: false,
      stdin: "ignore",
      env: { EGRESSD_NFT: "/nonexistent/nft" },
    },
  );
}

/** A digest of every file under the config dir (names and bytes). */
function snapshot(): string {
  const h = createHash("sha256");
  const walk = (d: string) => {
    for (const e of readdirSync(d).sort()) {
      const p = join(d, e);
      if (e === ".egressctl.lock") continue;
      if (statSync(p).isDirectory()) walk(p);
      else h.update(`${p}\0`).update(readFileSync(p));
    }
  };
  walk(dir);
  return h.digest("hex");
}

test.before.each(async () => {
  dir = mkdtempSync(join(tmpdir(), "egressctl-cli-"));
  for (const args of [
    ["register", "svc-web", "--user", "2001", "--dns", "system"],
    ["allow", "svc-web", "api.example.test:443", "10.0.0.0/8:5432"],
    ["allow-in", "svc-web", "8080", "--from", "192.0.2.0/24"],
    ["register", "svc-db", "--user", "2009"],
  ]) {
    const r = await run(...args);
    assert.is(r.exitCode, 0, r.stderr);
  }
});

test.after.each(() => rmSync(dir, { recursive: true, force: true }));

/** [args, fragment stderr must contain] — every one exits 2 and changes no file. */
const BAD: [string[], string][] = [
  [
    ["allow", "svc-web", "api.example.com:70000"],
    'egressctl: invalid port "70000" in "api.example.com:70000": ports are 1-65535',
  ],
  [
    ["allow", "svc-web", "good.example.test:443", "bad.example.test:0"],
    'invalid port "0" in "bad.example.test:0"',
  ],
  [["allow", "svc-web", "[2001:db8::1]:443", "2001:db8::2:443"], "brackets"],
  [["allow", "svc-web", "10.0.0.1/8:22"], "the network is 10.0.0.0/8"],
  [["allow", "svc-web", "*.example.com:443"], 'svc-web is not DNS-aware (its dns is "system")'],
  [["allow", "svc-web", "*example.com:443"], 'a wildcard is "*." followed by a domain'],
  [["register", "svc-two", "--user", "2002", "--dns", "maybe"], 'invalid DNS mode "maybe"'],
  [["allow", "svc-web", "api.example.test:443/sctp"], 'invalid protocol "sctp"'],
  [["allow", "svc-nope", "a.example.test:443"], 'service "svc-nope" is not registered'],
  [["allow", "Svc_Web", "a.example.test:443"], 'invalid service name "Svc_Web"'],
  [["allow", "svc-web"], "missing required argument 'target'"],
  [["revoke", "svc-web", "api.example.test:444"], "svc-web does not allow api.example.test:444"],
  [
    ["revoke", "svc-web", "api.example.test:443", "nope.example.test:1"],
    "does not allow nope.example.test:1",
  ],
  [["register", "svc-two", "--user", "no-such-user-egt"], 'user "no-such-user-egt" does not exist'],
  [["register", "svc-two", "--user", "2001"], "uid 2001 is already used by service svc-web"],
  [["register", "svc-two", "--user", "2002", "--mode", "paranoid"], 'invalid mode "paranoid"'],
  [
    ["register", "svc-two", "--user", "2002", "--group", "no-such-group-egt"],
    'group "no-such-group-egt" does not exist',
  ],
  [["register", "svc-two", "--user", "4294967295"], 'invalid user id "4294967295"'],
  [["register", "svc-two", "--user", "Bad User"], 'invalid user name "Bad User"'],
  [["register", "svc-two", "--user", "2002", "--create-user"], "--create-user needs a user name"],
  [["register", "svc-two"], "required option '--user <name|uid>' not specified"],
  [["register", "svc_two", "--user", "2003"], 'invalid service name "svc_two"'],
  [["register", "a-service-name-that-is-far-too-long-x", "--user", "2003"], "invalid service name"],
  [["register", "svc-", "--user", "2003"], 'invalid service name "svc-"'],
  [["unregister", "svc-nope"], 'service "svc-nope" is not registered'],
  [["list", "svc-nope"], 'service "svc-nope" is not registered'],
  [["frobnicate"], "unknown command 'frobnicate'"],
  [["allow-in", "svc-web", "70000"], 'invalid port "70000": ports are 1-65535'],
  [["allow-in", "svc-web", "8080/icmp"], 'invalid protocol "icmp"'],
  [["allow-in", "svc-web", "9090", "--from", "10.0.0.1/8"], "the network is 10.0.0.0/8"],
  [["allow-in", "svc-web", "9090", "--from", "nope"], 'invalid address "nope"'],
  [["allow-in", "svc-nope", "9090"], 'service "svc-nope" is not registered'],
  [["allow-in", "svc-web"], "missing required argument 'port'"],
  [
    ["allow-in", "svc-db", "8000-8100"],
    "inbound 8000-8100/tcp overlaps 8080/tcp of service svc-web",
  ],
  [["revoke-in", "svc-web", "9999"], "svc-web does not accept 9999/tcp"],
  [["revoke-in", "svc-web", "8080/udp"], "svc-web does not accept 8080/udp"],
  [["apply", "--dry-rn"], "unknown option '--dry-rn'"],
  [["allow-in", "svc-web", "8080"], "svc-web accepts 8080/tcp only from 192.0.2.0/24"],
  [["allow-in", "svc-web", "8080", "--anywhere", "--from", "10.0.0.0/8"], "contradict"],
  [[], "Usage: egressctl"],
];

for (const [args, fragment] of BAD) {
  test(`egressctl ${args.join(" ")} exits 2 and changes nothing`, async () => {
    const before = snapshot();
    const r = await run(...args);
    assert.is(r.exitCode, 2, `exit ${r.exitCode}\n${r.stdout}\n${r.stderr}`);
    assert.match(r.stderr, fragment);
    assert.is(snapshot(), before, "policy files changed");
  });
}

test("allow-in widens and narrows sources as asked, and list shows it", async () => {
  let r = await run(
    "allow-in",
    "svc-web",
    "8080",
    "--from",
    "198.51.100.0/24",
    "--from",
    "192.0.2.0/24",
  );
  assert.is(r.exitCode, 0, r.stderr);
  assert.match(r.stdout, "8080/tcp accepts from 192.0.2.0/24, 198.51.100.0/24");
  r = await run("allow-in", "svc-web", "8080", "--anywhere");
  assert.match(r.stdout, "8080/tcp now accepts from anywhere");
  r = await run("allow-in", "svc-web", "8080", "--from", "203.0.113.0/24");
  assert.match(r.stdout, "already accepts from anywhere");
  r = await run("allow-in", "svc-web", "5353/udp", "--from", "2001:db8::/32");
  assert.is(r.exitCode, 0, r.stderr);
  r = await run("list", "svc-web");
  assert.match(r.stdout, "in  8080/tcp from anywhere");
  assert.match(r.stdout, "in  5353/udp from 2001:db8::/32");
  r = await run("revoke-in", "svc-web", "5353/udp");
  assert.is(r.exitCode, 0, r.stderr);
  assert.not.match((await run("list", "svc-web")).stdout, "5353");
});

/** [args, the exact last two stderr lines: message and hint] — each hint follows from the cause. */
const HINTS: [string[], string, string][] = [
  [
    ["allow", "svc-web", "bad:host:1"],
    'egressctl: invalid host "bad:host" in "bad:host:1": too many colons; a name cannot contain ":" and HOST:PORT has exactly one',
    "hint: targets are HOST:PORT[/tcp|/udp] or HOST:LOW-HIGH[/tcp|/udp]; HOST is a name, an IPv4 address or CIDR, or [IPv6] / [IPv6/len]",
  ],
  [
    ["allow", "svc-web", "https://api.example.com:443/"],
    'egressctl: "https://api.example.com:443/" is a URL, not a target: write HOST:PORT, e.g. api.example.com:443',
    "hint: targets are HOST:PORT[/tcp|/udp] or HOST:LOW-HIGH[/tcp|/udp]; HOST is a name, an IPv4 address or CIDR, or [IPv6] / [IPv6/len]",
  ],
  [
    ["allow", "svc-web", `${`${"a".repeat(60)}.`.repeat(4)}abcdefghijklmno:443`],
    `egressctl: invalid domain name "${"a".repeat(40)}…" in "${"a".repeat(40)}…": 259 characters; a domain name is at most 253`,
    "hint: a domain name is at most 253 characters: labels of 1-63 letters, digits, hyphens and underscores, separated by dots",
  ],
  [
    ["allow", "svc-web", "localhost:5432"],
    `egressctl: invalid host "localhost" in "localhost:5432": "localhost" is this host's own loopback, which egressd does not look up in DNS`,
    "hint: allow the loopback address instead: 127.0.0.1:5432 or [::1]:5432",
  ],
  [
    ["allow", "svc-web", "api.example.com:70000"],
    'egressctl: invalid port "70000" in "api.example.com:70000": ports are 1-65535',
    "hint: a port is a number from 1 to 65535; a range is LOW-HIGH, e.g. 8000-8100",
  ],
  [
    ["allow-in", "svc-web", "9090", "--from", "10.0.0.1/8"],
    'egressctl: --from "10.0.0.1/8": invalid address "10.0.0.1/8": host bits are set; the network is 10.0.0.0/8',
    "hint: --from takes an address or network: 192.0.2.7, 192.0.2.0/24, 2001:db8::7 or 2001:db8::/32 (host bits clear)",
  ],
  [
    ["allow-in", "svc-web", "9090", "--from", "nope"],
    'egressctl: --from "nope": invalid address "nope": not an IPv4 or IPv6 address',
    "hint: --from takes an address or network: 192.0.2.7, 192.0.2.0/24, 2001:db8::7 or 2001:db8::/32 (host bits clear)",
  ],
  [
    ["allow-in", "svc-web", "70000"],
    'egressctl: port "70000": invalid port "70000": ports are 1-65535',
    "hint: write PORT[/tcp|/udp] or LOW-HIGH[/tcp|/udp], e.g. 8080 or 5353/udp",
  ],
  [
    ["allow-in", "svc-web", "8080"],
    "egressctl: svc-web accepts 8080/tcp only from 192.0.2.0/24; allow-in without --from would open it to anywhere",
    "hint: to add sources: egressctl allow-in svc-web 8080/tcp --from <cidr>; to accept from every source: egressctl allow-in svc-web 8080/tcp --anywhere",
  ],
];

for (const [args, message, hint] of HINTS) {
  test(`egressctl ${args.join(" ").slice(0, 60)} explains the actual cause`, async () => {
    const r = await run(...args);
    assert.is(r.exitCode, 2, r.stderr);
    const lines = r.stderr.split("\n");
    assert.equal(lines.slice(-2), [message, hint]);
  });
}

test("a name with an underscore is accepted, as the hint says it may be", async () => {
  const r = await run("allow", "svc-web", "my_host.example.com:443");
  assert.is(r.exitCode, 0, r.stderr);
  assert.match(r.stdout, "svc-web: allowed my_host.example.com:443");
});

test("a user who is not root is told permission is denied, not that another egressctl holds the lock", async () => {
  chmodSync(dir, 0o755);
  // A copy the test uid can read wherever the checkout lives: the entry and its chunks.
  const ctl = join(dir, "egressctl.js");
  copyFileSync(EGRESSCTL, ctl);
  cpSync(join(dirname(EGRESSCTL), "chunks"), join(dir, "chunks"), { recursive: true });
  chmodSync(ctl, 0o644);
  const r = await execa(
    "setpriv",
    [
      "--reuid=2001",
      "--regid=2001",
      "--clear-groups",
      process.execPath,
      ctl,
      "--config-dir",
      dir,
      "--socket",
      join(dir, "sock"),
      "allow",
      "svc-web",
      "other.example.test:443",
    ],
    { reject: false, stdin: "ignore", timeout: 20_000 },
  );
  assert.is(r.exitCode, 3, r.stderr);
  assert.is(
    r.stderr,
    `egressctl: cannot change the policy in ${dir}: permission denied\nhint: the policy belongs to root: run egressctl as root (sudo egressctl ...)`,
  );
});

/** Usage errors found by the argument parser, with --json: one object on stdout, exit 2. */
const USAGE: [string[], string, string][] = [
  [["frobnicate"], "unknown command 'frobnicate'", "run egressctl --help for usage"],
  [
    ["allow", "svc-web"],
    "missing required argument 'target'",
    "run egressctl allow --help for usage",
  ],
  [["apply", "--dry-rn"], "unknown option '--dry-rn'", "run egressctl apply --help for usage"],
  [
    ["register", "svc-two", "--user"],
    "option '--user <name|uid>' argument missing",
    "run egressctl register --help for usage",
  ],
  [
    ["register", "svc-two"],
    "required option '--user <name|uid>' not specified",
    "run egressctl register --help for usage",
  ],
  [[], "no command given", "run egressctl --help for the commands"],
];

for (const [args, message, hint] of USAGE) {
  test(`--json ${args.join(" ")} answers with one JSON error object`, async () => {
    const r = await run("--json", ...args);
    assert.is(r.exitCode, 2, r.stderr);
    const out = JSON.parse(r.stdout) as { error: { code: string; message: string; hint: string } };
    assert.is(out.error.code, "ERR_EGRESS_USAGE");
    assert.is(out.error.message, message);
    assert.is(out.error.hint, hint);
  });
}

test("--json --version and --json --help answer with JSON too", async () => {
  const v = JSON.parse((await run("--json", "--version")).stdout) as { version: string };
  assert.match(v.version, /^\d+\.\d+\.\d+/);
  const h = JSON.parse((await run("--json", "allow", "--help")).stdout) as { help: string };
  assert.match(h.help, "Usage: egressctl allow");
});

test("check reports every problem of a directory with three broken files at once, and changes nothing", async () => {
  const d = join(dir, "services.d");
  writeFileSync(
    join(d, "svc-a.json"),
    JSON.stringify({
      name: "svc-a",
      user: 2101,
      outbound: [{ host: "a.example.test", port: 443 }],
    }),
  );
  writeFileSync(
    join(d, "svc-b.json"),
    JSON.stringify({ name: "svc-b", user: 2102, inbound: [{ ports: "70000" }] }),
  );
  writeFileSync(join(d, "svc-c.json"), '{\n  "name": "svc-c",\n  "user": 2103,\n}\n');
  const before = snapshot();
  const r = await run("check");
  assert.is(r.exitCode, 2, r.stderr);
  assert.is(r.stdout, "");
  assert.equal(r.stderr.split("\n"), [
    "egressctl: 3 of 5 file(s) invalid; nothing was changed",
    `  ${d}/svc-a.json: $.outbound[0].ports: missing required key "ports"`,
    `  ${d}/svc-a.json: $.outbound[0].port: unknown key "port" (did you mean "ports"? allowed: host, ports, protocol)`,
    `  ${d}/svc-b.json: $.inbound[0].ports: invalid port "70000": ports are 1-65535`,
    `  ${d}/svc-c.json: not valid JSON at line 4, column 1: expected a key in double quotes (or a "}" with no comma before it) (found "}")`,
    "hint: fix each problem at the file and JSON path shown, then run egressctl check again",
  ]);
  assert.is(snapshot(), before);
});

test("check --json gives each problem as file, JSON path and text", async () => {
  writeFileSync(join(dir, "egressd.json"), JSON.stringify({ audit: { schedule: "every day" } }));
  const r = await run("--json", "check", dir);
  assert.is(r.exitCode, 2);
  const out = JSON.parse(r.stdout) as {
    error: {
      code: string;
      details: { problems: unknown[]; files: { file: string; valid: boolean }[] };
    };
  };
  assert.is(out.error.code, "ERR_EGRESS_CHECK");
  assert.equal(out.error.details.problems, [
    {
      file: join(dir, "egressd.json"),
      path: "$.audit.schedule",
      text: '"every day" is not a cron expression, e.g. "*/5 * * * *"',
    },
  ]);
  assert.equal(
    out.error.details.files.map((f) => [f.file.slice(dir.length), f.valid]),
    [
      ["/egressd.json", false],
      ["/services.d/svc-db.json", true],
      ["/services.d/svc-web.json", true],
    ],
  );
});

test("check passes valid files with exit 0, and checks across files: two services may not share a uid", async () => {
  let r = await run("check");
  assert.is(r.exitCode, 0, r.stderr);
  assert.is(
    r.stdout,
    `ok  ${dir}/services.d/svc-db.json (service svc-db)\nok  ${dir}/services.d/svc-web.json (service svc-web)\n2 file(s) valid; nothing was changed`,
  );
  const extra = join(dir, "extra");
  mkdirSync(extra);
  writeFileSync(join(extra, "svc-x.json"), JSON.stringify({ name: "svc-x", user: 2001 }));
  r = await run("check", join(dir, "services.d", "svc-web.json"), join(extra, "svc-x.json"));
  assert.is(r.exitCode, 2);
  assert.match(
    r.stderr,
    `${extra}/svc-x.json: $.user: uid 2001 is already the user of service svc-web: each service needs its own user`,
  );
});

test("check --kind config validates a temporary file (an Ansible validate run) as egressd.json", async () => {
  const tmp = join(dir, "ansible.tmp1234");
  writeFileSync(tmp, JSON.stringify({ refresh: { graceSeconds: 60 } }));
  assert.is((await run("check", "--kind", "config", tmp)).exitCode, 0);
  // Read as a service policy, the same file lacks name and user.
  const r = await run("check", tmp);
  assert.is(r.exitCode, 2);
  assert.match(r.stderr, `${tmp}: $.name: missing required key "name"`);
});

test("check warns about a user that does not exist, but passes", async () => {
  writeFileSync(
    join(dir, "services.d", "svc-new.json"),
    JSON.stringify({ name: "svc-new", user: "no-such-user-egt" }),
  );
  const r = await run("check");
  assert.is(r.exitCode, 0, r.stderr);
  assert.match(
    r.stderr,
    `warning: ${dir}/services.d/svc-new.json: $.user: user "no-such-user-egt" does not exist on this host: egressd refuses the policy until it does`,
  );
});

test("--json gives errors as data with a stable code", async () => {
  const r = await run("--json", "allow", "svc-web", "x.example.test:0");
  assert.is(r.exitCode, 2);
  const out = JSON.parse(r.stdout) as { error: { code: string; message: string } };
  assert.is(out.error.code, "ERR_EGRESS_TARGET");
  assert.match(out.error.message, 'invalid port "0"');
});

test("--json: a system error (exit 3) is one JSON error object too, with its code and hint", async () => {
  for (const [args, code] of [
    [["audit"], "ERR_EGRESS_NFT_MISSING"],
    [["apply"], "ERR_EGRESS_NFT_MISSING"],
    [["status"], "ERR_EGRESS_NOT_RUNNING"],
  ] as const) {
    const r = await run("--json", ...args);
    assert.is(r.exitCode, 3, `${args.join(" ")}: ${r.stderr}`);
    const out = JSON.parse(r.stdout) as { error: { code: string; hint: string } };
    assert.is(out.error.code, code, args.join(" "));
    assert.ok(out.error.hint, `${args.join(" ")} has a hint`);
  }
});

test("a broken policy file stops apply with exit 2, naming the file and JSON path", async () => {
  const file = join(dir, "services.d", "svc-bad.json");
  writeFileSync(
    file,
    JSON.stringify({
      name: "svc-bad",
      user: 2005,
      outbound: [{ host: "a.example.test", port: "443" }],
    }),
  );
  const r = await run("apply");
  assert.is(r.exitCode, 2);
  assert.match(r.stderr, `${file}: $.outbound[0].port: unknown key "port"`);
  assert.match(r.stderr, `${file}: $.outbound[0].ports: missing required key "ports"`);
});

test("a misspelt key in egressd.json is rejected, not ignored", async () => {
  writeFileSync(join(dir, "egressd.json"), JSON.stringify({ refresh: { maxTTLSeconds: 60 } }));
  const r = await run("apply");
  assert.is(r.exitCode, 2);
  assert.match(r.stderr, '$.refresh.maxTTLSeconds: unknown key "maxTTLSeconds"');
});

test("invalid JSON is reported with the file name, line and column", async () => {
  writeFileSync(join(dir, "services.d", "svc-web.json"), '{\n  "name": "svc-web",\n  "user": }\n');
  const r = await run("list");
  assert.is(r.exitCode, 2);
  assert.match(
    r.stderr,
    `${join(dir, "services.d", "svc-web.json")}: not valid JSON at line 3, column 11: expected a value (a string, number, object, array, true, false or null) (found "}")`,
  );
  const one = await run("list", "svc-web");
  assert.match(
    one.stderr,
    "hint: fix the JSON syntax at the place shown; JSON has no comments and no comma after the last entry",
  );
});

test("when nft cannot run, apply exits 3 and says what to install", async () => {
  const r = await run("apply");
  assert.is(r.exitCode, 3, r.stderr);
  assert.match(r.stderr, 'cannot run "/nonexistent/nft"');
  assert.match(r.stderr, "install nftables");
});

test("status, refresh and refused need the daemon: without one they exit 3 and say so", async () => {
  for (const c of ["status", "refresh", "refused"]) {
    const r = await run(c);
    assert.is(r.exitCode, 3, r.stderr);
    assert.match(r.stderr, "egressd is not running");
  }
});

test("a DNS-aware service (the default) may allow a wildcard; leaving DNS-aware mode is refused while it has one", async () => {
  let r = await run("allow", "svc-db", "*.cdn.example.test:443");
  assert.is(r.exitCode, 0, r.stderr);
  assert.match(r.stdout, "svc-db: allowed *.cdn.example.test:443");
  r = await run("list", "svc-db");
  assert.match(r.stdout, "dns proxy");
  r = await run("register", "svc-db", "--user", "2009", "--dns", "system");
  assert.is(r.exitCode, 2);
  assert.match(r.stderr, "wildcards need DNS-aware mode");
  assert.match(r.stderr, "egressctl revoke svc-db *.cdn.example.test:443");
  r = await run("revoke", "svc-db", "*.cdn.example.test:443");
  assert.is(r.exitCode, 0, r.stderr);
  r = await run("register", "svc-db", "--user", "2009", "--dns", "system");
  assert.is(r.exitCode, 0, r.stderr);
  assert.match(r.stdout, "dns system");
});

test("allow, list and revoke round-trip; allowing twice is a no-op", async () => {
  let r = await run(
    "allow",
    "svc-web",
    "[2001:db8::/32]:443",
    "dns.example.test:53/udp",
    "api.example.test:443",
  );
  assert.is(r.exitCode, 0, r.stderr);
  assert.match(r.stdout, "svc-web: allowed [2001:db8::/32]:443, dns.example.test:53/udp");
  assert.match(r.stdout, "already allowed api.example.test:443");
  assert.match(r.stdout, "egressd is not running");
  r = await run("list", "svc-web");
  assert.is(
    r.stdout.replace(/\n {2}in .*/g, ""),
    // (execa strips the final newline)
    "svc-web  user 2001  mode enforce  dns system\n  out api.example.test:443\n  out 10.0.0.0/8:5432\n  out [2001:db8::/32]:443\n  out dns.example.test:53/udp",
  );
  r = await run("revoke", "svc-web", "api.example.test:443", "dns.example.test:53/udp");
  assert.is(r.exitCode, 0, r.stderr);
  r = await run("--json", "list");
  const data = JSON.parse(r.stdout) as {
    services: { name: string; outbound: { host: string }[] }[];
  };
  assert.equal(
    data.services.find((s) => s.name === "svc-web")?.outbound.map((o) => o.host),
    ["10.0.0.0/8", "2001:db8::/32"],
  );
});

test("twenty egressctl allow commands at the same moment all land", async () => {
  const runs = await Promise.all(
    Array.from({ length: 20 }, (_, i) => run("allow", "svc-web", `h${i}.example.test:443`)),
  );
  for (const r of runs) assert.is(r.exitCode, 0, r.stderr);
  const policy = JSON.parse(readFileSync(join(dir, "services.d", "svc-web.json"), "utf8")) as {
    outbound: { host: string }[];
  };
  for (let i = 0; i < 20; i++)
    assert.ok(
      policy.outbound.some((o) => o.host === `h${i}.example.test`),
      `h${i} lost`,
    );
  assert.is(policy.outbound.length, 22);
});

test("a writer killed while it holds the lock does not delay the next one", async () => {
  // A "daemon" that accepts the change request and never answers: egressctl waits for it
  // inside the policy lock, and is killed there.
  const { createServer } = await import("node:net");
  const sockets: import("node:net").Socket[] = [];
  const mute = createServer((s) => void sockets.push(s));
  await new Promise<void>((r) => mute.listen(join(dir, "sock"), r));
  try {
    const stuck = run("allow", "svc-web", "stuck.example.test:443");
    const lock = join(dir, ".egressctl.lock");
    for (let i = 0; i < 500 && sockets.length === 0; i++)
      await new Promise((r) => setTimeout(r, 10));
    assert.ok(sockets.length > 0, "the first egressctl reached the daemon");
    assert.is(readFileSync(lock, "utf8").trim(), String(stuck.pid), "the lock names its holder");
    // While it lives, a second writer waits for it (and would say who holds it).
    const waiting = run("allow", "svc-web", "next.example.test:443");
    await new Promise((r) => setTimeout(r, 300));
    assert.is(waiting.exitCode, null, "the second writer waits while the holder lives");
    const t0 = Date.now();
    stuck.kill("SIGKILL");
    await stuck;
    mute.close();
    for (const s of sockets) s.destroy();
    const r = await waiting;
    const waited = Date.now() - t0;
    assert.is(r.exitCode, 0, r.stderr);
    assert.ok(waited < 5_000, `the next writer went ahead ${waited} ms after the kill`);
    const hosts = (
      JSON.parse(readFileSync(join(dir, "services.d", "svc-web.json"), "utf8")) as {
        outbound: { host: string }[];
      }
    ).outbound.map((o) => o.host);
    assert.ok(hosts.includes("next.example.test"), hosts.join(" "));
  } finally {
    mute.close();
  }
});

test("--help works for every command and --version prints the version", async () => {
  for (const c of [
    "register",
    "unregister",
    "allow",
    "revoke",
    "allow-in",
    "revoke-in",
    "list",
    "status",
    "refresh",
    "apply",
    "check",
  ]) {
    const r = await run(c, "--help");
    assert.is(r.exitCode, 0);
    assert.match(r.stdout, `Usage: egressctl ${c}`);
  }
  const v = await run("--version");
  assert.is(
    v.stdout.trim(),
    (JSON.parse(readFileSync("package.json", "utf8")) as { version: string }).version,
  );
});

test.run();
