import { suite } from "uvu";
import * as assert from "uvu/assert";
import { EgressError } from "../../rules/errors.ts";
import { validateService } from "../../rules/policy.ts";
import {
  dropIn,
  nsswitchUsesResolve,
  parseSystemdVersion,
  unitNameError,
  type DropIn,
  type DropInInput,
  type SystemdHostFacts,
} from "../../rules/systemd-dropin.ts";

const test = suite("systemd drop-in from a policy");

const DEBIAN12: SystemdHostFacts = { version: 252, bpfFramework: false, nssResolve: false };
const FEDORA: SystemdHostFacts = { version: 256, bpfFramework: true, nssResolve: true };

/** A drop-in for a policy document (validated as a file would be) and optional overrides. */
function gen(doc: Record<string, unknown>, over: Partial<DropInInput> = {}): DropIn {
  const policy = validateService({ name: "svc-web", user: "svc-web", ...doc }, "test.json");
  return dropIn({
    policy,
    unit: "web.service",
    uid: 2001,
    resolvers: [{ address: "127.0.0.53", family: 4, port: 53 }],
    table: "egressd",
    allowPrivateAddresses: true,
    host: DEBIAN12,
    ...over,
  });
}

/** The assignments of the drop-in, as written, without comments and blank lines. */
const assignments = (d: DropIn) =>
  d.text.split("\n").filter((l) => l && !l.startsWith("#") && !l.startsWith("["));

/** The assignments of one key, without the resetting empty assignment. */
const values = (d: DropIn, key: string) =>
  d.directives.filter((x) => x.key === key && x.value !== "").map((x) => x.value);

/** The text with comment lines joined, so a sentence can be matched across wrapped lines. */
const prose = (d: DropIn) => d.text.replace(/\n# /g, " ");

const NEVER =
  "0.0.0.0/8 localhost link-local multicast ::/128 100.100.100.200 168.63.129.16 fd00:ec2::254";

/** [behaviour, policy, expected assignments in order] */
const TABLE: [string, Record<string, unknown>, Partial<DropInInput>, string[]][] = [
  [
    "addresses only: everything else is refused at the cgroup layer too",
    {
      dns: "system",
      outbound: [
        { host: "10.0.0.5", ports: "5432" },
        { host: "2001:db8::/32", ports: "443" },
      ],
    },
    {},
    [
      "User=svc-web",
      "RestrictAddressFamilies=",
      "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
      "IPAddressDeny=",
      "IPAddressDeny=any",
      "IPAddressAllow=",
      "IPAddressAllow=10.0.0.5 2001:db8::/32",
      "IPAddressAllow=127.0.0.53",
      "SocketBindAllow=",
      "SocketBindDeny=",
      "SocketBindDeny=any",
    ],
  ],
  [
    "names: only what DNS never yields is denied, literals and resolvers stay allowed",
    {
      dns: "system",
      outbound: [
        { host: "api.example.com", ports: "443" },
        { host: "192.0.2.7", ports: "25" },
      ],
    },
    {},
    [
      "User=svc-web",
      "RestrictAddressFamilies=",
      "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
      "IPAddressDeny=",
      `IPAddressDeny=${NEVER}`,
      "IPAddressAllow=",
      "IPAddressAllow=192.0.2.7",
      "IPAddressAllow=127.0.0.53",
      "SocketBindAllow=",
      "SocketBindDeny=",
      "SocketBindDeny=any",
    ],
  ],
  [
    "names with allowPrivateAddresses false: private ranges are denied too",
    { dns: "none", outbound: [{ host: "api.example.com", ports: "443" }] },
    { allowPrivateAddresses: false },
    [
      "User=svc-web",
      "RestrictAddressFamilies=",
      "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
      "IPAddressDeny=",
      `IPAddressDeny=${NEVER} 10.0.0.0/8 172.16.0.0/12 192.168.0.0/16 100.64.0.0/10 fc00::/7`,
      "IPAddressAllow=",
      "SocketBindAllow=",
      "SocketBindDeny=",
      "SocketBindDeny=any",
    ],
  ],
  [
    "inbound sources are allowed (both directions) and their ports bindable",
    {
      dns: "none",
      inbound: [
        { ports: "8080", from: ["192.0.2.0/24", "2001:db8:1::/48"] },
        { ports: "5353-5355", protocol: "udp", from: ["198.51.100.1"] },
      ],
    },
    {},
    [
      "User=svc-web",
      "RestrictAddressFamilies=",
      "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
      "IPAddressDeny=",
      "IPAddressDeny=any",
      "IPAddressAllow=",
      "IPAddressAllow=192.0.2.0/24 2001:db8:1::/48 198.51.100.1",
      "SocketBindAllow=",
      "SocketBindAllow=tcp:8080",
      "SocketBindAllow=udp:5353-5355",
      "SocketBindDeny=",
      "SocketBindDeny=any",
    ],
  ],
  [
    "a port open to anywhere leaves address filtering to nftables",
    {
      dns: "system",
      outbound: [{ host: "10.0.0.5", ports: "5432" }],
      inbound: [{ ports: "443" }],
    },
    {},
    [
      "User=svc-web",
      "RestrictAddressFamilies=",
      "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
      "SocketBindAllow=",
      "SocketBindAllow=tcp:443",
      "SocketBindDeny=",
      "SocketBindDeny=any",
    ],
  ],
  [
    "no allowances and no DNS: AF_UNIX only, every IP packet refused",
    { dns: "none" },
    {},
    [
      "User=svc-web",
      "RestrictAddressFamilies=",
      "RestrictAddressFamilies=AF_UNIX",
      "IPAddressDeny=",
      "IPAddressDeny=any",
      "IPAddressAllow=",
      "SocketBindAllow=",
      "SocketBindDeny=",
      "SocketBindDeny=any",
    ],
  ],
  [
    "dns proxy: localhost and the resolvers allowed, resolved's and nscd's sockets hidden",
    { dns: "proxy", outbound: [{ host: "10.0.0.5", ports: "5432" }] },
    {},
    [
      "After=systemd-resolved.service",
      "User=svc-web",
      "RestrictAddressFamilies=",
      "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
      "IPAddressDeny=",
      "IPAddressDeny=any",
      "IPAddressAllow=",
      "IPAddressAllow=10.0.0.5",
      "IPAddressAllow=127.0.0.1 ::1 127.0.0.53",
      "SocketBindAllow=",
      "SocketBindDeny=",
      "SocketBindDeny=any",
      "InaccessiblePaths=-/run/systemd/resolve/io.systemd.Resolve",
      "InaccessiblePaths=-/run/nscd/socket",
    ],
  ],
  [
    "a group is set with the user",
    { user: 2001, group: "web", dns: "none" },
    { gid: 3001 },
    [
      "User=2001",
      "Group=web",
      "RestrictAddressFamilies=",
      "RestrictAddressFamilies=AF_UNIX",
      "IPAddressDeny=",
      "IPAddressDeny=any",
      "IPAddressAllow=",
      "SocketBindAllow=",
      "SocketBindDeny=",
      "SocketBindDeny=any",
    ],
  ],
  [
    "audit mode: only the user, nothing systemd would refuse",
    { mode: "audit", dns: "system", outbound: [{ host: "10.0.0.5", ports: "5432" }] },
    {},
    ["User=svc-web"],
  ],
  [
    "rootless containers: AF_NETLINK for slirp4netns and pasta, no cgroup filters",
    {
      dns: "system",
      outbound: [{ host: "10.0.0.5", ports: "5432" }],
      inbound: [{ ports: "8080" }],
    },
    { rootlessContainers: true },
    [
      "User=svc-web",
      "RestrictAddressFamilies=",
      "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
    ],
  ],
];

for (const [behaviour, doc, over, want] of TABLE) {
  test(behaviour, () => {
    assert.equal(assignments(gen(doc, over)), want);
  });
}

test("the structured form and the text say the same", () => {
  const d = gen({
    dns: "proxy",
    outbound: [{ host: "api.example.com", ports: "443" }],
    inbound: [{ ports: "8080", from: ["192.0.2.0/24"] }],
  });
  assert.equal(
    assignments(d),
    d.directives.map((x) => `${x.key}=${x.value}`),
  );
  assert.is(d.addressFilter.mode, "partial");
  assert.equal(d.addressFilter.allow, ["192.0.2.0/24", "127.0.0.1", "::1", "127.0.0.53"]);
  assert.equal(d.bind, { allow: ["tcp:8080"], deny: ["any"], enforcedByThisHost: false });
  assert.equal(d.inaccessiblePaths, [
    "/run/systemd/resolve/io.systemd.Resolve",
    "/run/nscd/socket",
  ]);
  assert.equal(d.families, ["AF_UNIX", "AF_INET", "AF_INET6"]);
});

test("names are named in the comment that explains why this layer cannot list them", () => {
  const d = gen({ dns: "system", outbound: [{ host: "api.example.com", ports: "443" }] });
  assert.match(prose(d), /The policy allows names \(api\.example\.com\)\. systemd.s address lists/);
  assert.match(prose(d), /cannot follow DNS/);
});

test("a port open to anywhere is named where the address filter is left out", () => {
  const d = gen({ dns: "none", inbound: [{ ports: "443" }, { ports: "53", protocol: "udp" }] });
  assert.is(d.addressFilter.mode, "off");
  assert.match(prose(d), /No IPAddressAllow=\/IPAddressDeny=: 443\/tcp, 53\/udp accept/);
  assert.not.match(prose(d), /^IPAddress/m);
});

test("on a host using nss-resolve the comment says lookups would bypass the proxy", () => {
  const here = gen({ dns: "proxy" }, { host: FEDORA });
  assert.match(prose(here), /resolves names through systemd-resolved \(nss-resolve\), so glibc/);
  const elsewhere = gen({ dns: "proxy" }, { host: DEBIAN12 });
  assert.match(prose(elsewhere), /does not use nss-resolve now; if it ever does/);
  // The sockets are hidden either way: nsswitch.conf may change after the drop-in is written.
  assert.equal(values(here, "InaccessiblePaths"), values(elsewhere, "InaccessiblePaths"));
  assert.equal(values(gen({ dns: "system" }, { host: FEDORA }), "InaccessiblePaths"), []);
});

test("NFTSet= is offered, commented, from systemd 255, naming egressd's table", () => {
  const d = gen({ dns: "none" }, { host: FEDORA, table: "fw" });
  assert.is(
    d.nftSet.suggestion,
    "NFTSet=user:inet:fw:s_svc_web_unit_uid cgroup:inet:fw:s_svc_web_unit_cgroup",
  );
  assert.ok(d.text.includes(`\n#${d.nftSet.suggestion}\n`), "commented out");
  assert.equal(values(d, "NFTSet"), [], "not active");
  const old = gen({ dns: "none" });
  assert.is(old.nftSet.suggestion, null);
  assert.match(
    prose(old),
    /NFTSet= \(systemd 255 and later\) not offered: this host has systemd 252/,
  );
  const none = gen(
    { dns: "none" },
    { host: { version: null, bpfFramework: null, nssResolve: false } },
  );
  assert.match(prose(none), /systemd was not found on this host/);
  assert.is(none.nftSet.supportedByThisHost, null);
});

test("bind filters say when this host's systemd cannot enforce them", () => {
  assert.match(prose(gen({ dns: "none" })), /built without the BPF framework/);
  const d = gen({ dns: "none" }, { host: FEDORA });
  assert.not.match(prose(d), /BPF framework/);
  assert.is(d.bind?.enforcedByThisHost, true);
});

test("--harden adds the sandboxing, and a private network only when nothing is allowed", () => {
  const d = gen(
    { dns: "system", outbound: [{ host: "10.0.0.5", ports: "5432" }] },
    { harden: true },
  );
  for (const line of [
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "ProtectHome=yes",
    "PrivateTmp=yes",
    "ProtectKernelTunables=yes",
    "ProtectKernelModules=yes",
    "ProtectKernelLogs=yes",
    "ProtectControlGroups=yes",
    "RestrictNamespaces=yes",
    "LockPersonality=yes",
    "RestrictRealtime=yes",
    "RestrictSUIDSGID=yes",
    "SystemCallArchitectures=native",
  ])
    assert.ok(assignments(d).includes(line), line);
  // Settings that break common network daemons are not part of it.
  for (const key of [
    "MemoryDenyWriteExecute",
    "PrivateDevices",
    "CapabilityBoundingSet",
    "PrivateNetwork",
  ])
    assert.equal(values(d, key), [], key);
  assert.ok(
    !assignments(gen({ dns: "none" })).includes("NoNewPrivileges=yes"),
    "only with --harden",
  );
  assert.equal(values(gen({ dns: "none" }, { harden: true }), "PrivateNetwork"), ["yes"]);
});

test("--harden with --rootless-containers is refused with a reason", () => {
  try {
    gen({ dns: "none" }, { harden: true, rootlessContainers: true });
    assert.unreachable("should throw");
  } catch (err) {
    assert.instance(err, EgressError);
    assert.is((err as EgressError).code, "ERR_EGRESS_SYSTEMD_OPTIONS");
    assert.match((err as EgressError).hint ?? "", /user namespaces/);
  }
});

test("more than 128 inbound ports cannot be expressed as SocketBindAllow=", () => {
  const inbound = Array.from({ length: 129 }, (_, i) => ({ ports: String(10000 + i) }));
  try {
    gen({ dns: "none", inbound });
    assert.unreachable("should throw");
  } catch (err) {
    assert.is((err as EgressError).code, "ERR_EGRESS_SYSTEMD_BIND");
    assert.match((err as EgressError).message, /declares 129 inbound ports/);
  }
});

test("the header says how to regenerate it, with the same flags", () => {
  const d = gen({ dns: "none" }, { harden: true });
  assert.match(prose(d), /egressctl systemd svc-web --unit web\.service --harden --write/);
  assert.ok(
    d.text.split("\n").every((l) => !l.startsWith("#") || l.length <= 92),
    "wrapped",
  );
});

for (const name of [
  "web.service",
  "web@.service",
  "web@blue.service",
  "a-b_c:d.e.service",
  "dev-disk-by\\x2dlabel.service",
]) {
  test(`"${name}" is a service unit name`, () => {
    assert.is(unitNameError(name), null);
  });
}

for (const [name, why] of [
  ["web", "ends in .service, e.g. web.service"],
  ["web.socket", "ends in .service, e.g. web.service"],
  ["", "ends in .service"],
  ["../etc/x.service", "letters, digits"],
  ["we b.service", "letters, digits"],
  ["a@b@c.service", "at most one @"],
  [".service", "letters, digits"],
  [`${"a".repeat(250)}.service`, "at most 255 characters"],
] as const) {
  test(`"${name.slice(0, 40)}" is not a service unit name`, () => {
    assert.match(unitNameError(name) ?? "", why);
  });
}

test("systemd's version and BPF framework are read from --version", () => {
  assert.equal(
    parseSystemdVersion(
      "systemd 252 (252.39-1~deb12u2)\n+PAM +AUDIT +SELINUX +SECCOMP -BPF_FRAMEWORK -XKBCOMMON +UTMP",
    ),
    { version: 252, bpfFramework: false },
  );
  assert.equal(parseSystemdVersion("systemd 256 (256.7-1.fc41)\n+PAM +BPF_FRAMEWORK +TPM2"), {
    version: 256,
    bpfFramework: true,
  });
  assert.equal(parseSystemdVersion(""), { version: null, bpfFramework: null });
});

test("nsswitch.conf's hosts line decides whether nss-resolve is in use", () => {
  assert.ok(nsswitchUsesResolve("passwd: files\nhosts: files resolve [!UNAVAIL=return] dns\n"));
  assert.ok(nsswitchUsesResolve("hosts:\tfiles mymachines resolve [!UNAVAIL=return] myhostname"));
  assert.not.ok(nsswitchUsesResolve("hosts: files dns\n"));
  assert.not.ok(nsswitchUsesResolve("# hosts: resolve\nhosts: files dns # resolve\n"));
  assert.not.ok(nsswitchUsesResolve("hosts: files resolver-not-this\n"));
});

test.run();
