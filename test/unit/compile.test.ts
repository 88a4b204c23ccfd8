import { suite } from "uvu";
import * as assert from "uvu/assert";
import { replaceBatch } from "../../rules/batch.ts";
import { assemble, compile, compileService, type ServiceInput } from "../../rules/compile.ts";
import { EgressError } from "../../rules/errors.ts";
import { validateBatch } from "../../rules/nft-schema.ts";
import { elemText, ruleText } from "../../rules/render.ts";
import type { Ruleset } from "../../rules/ruleset.ts";
import { policy } from "../helpers/builders.ts";

const test = suite("compiler");

const chain = (r: Ruleset, name: string) => r.chains.find((c) => c.name === name);
const set = (r: Ruleset, name: string) => r.sets.find((s) => s.name === name);
const rules = (r: Ruleset, name: string) => chain(r, name)?.rules.map(ruleText);
const elems = (r: Ruleset, name: string) => set(r, name)?.elem.map(elemText);

test("the output chain keeps DNS-aware services' DNS on their own proxy, checks a service's answers, accepts established traffic, then dispatches by uid and gid through maps", () => {
  const r = compile(policy().service("svc-web", 2001).allow("api.example.test:443").build());
  assert.equal(chain(r, "output")?.base, {
    type: "filter",
    hook: "output",
    prio: 0,
    policy: "accept",
  });
  assert.equal(rules(r, "output"), [
    "th dport 53 meta l4proto { tcp, udp } ct direction original meta skuid @uid_dnsaware reject with icmpx admin-prohibited",
    "th dport 53 meta l4proto { tcp, udp } ct direction original meta skgid @gid_dnsaware reject with icmpx admin-prohibited",
    "ct status dnat ct direction original meta l4proto { tcp, udp } th dport @proxy_ports meta skuid . th dport != @uid_proxyport meta skgid . th dport != @gid_proxyport reject with icmpx admin-prohibited",
    "ct direction reply meta skuid vmap @uid_serve",
    "ct direction reply meta skgid vmap @gid_serve",
    "ct state established,related accept",
    "ct status dnat meta skuid . th dport @uid_proxyport accept",
    "ct status dnat meta skgid . th dport @gid_proxyport accept",
    "meta skuid vmap @uid_dispatch",
    "meta skgid vmap @gid_dispatch",
  ]);
  assert.equal(elems(r, "uid_dispatch"), ["2001 : goto s_svc_web"]);
  assert.equal(elems(r, "uid_serve"), ["2001 : goto r_svc_web"]);
  assert.equal(elems(r, "gid_dispatch"), []);
  assert.equal(chain(r, "input")?.base, {
    type: "filter",
    hook: "input",
    prio: 0,
    policy: "accept",
  });
  assert.equal(rules(r, "input"), [
    "ct state established,related accept",
    "meta l4proto . th dport vmap @in_dispatch",
  ]);
});

test("inbound: declared ports accept only their sources; replies leave only from declared ports", () => {
  const b = policy().service("svc-web", 2001);
  b.input.policy.inbound.push(
    { ports: "8080", protocol: "tcp", from: ["192.0.2.0/24", "2001:db8::/32"] },
    { ports: "5353", protocol: "udp" },
  );
  const r = compile(b.build());
  assert.equal(elems(r, "in_dispatch"), [
    "tcp . 8080 : goto i_svc_web",
    "udp . 5353 : goto i_svc_web",
  ]);
  assert.equal(elems(r, "s_svc_web_inb4")?.sort(), [
    "tcp . 8080 . 192.0.2.0/24",
    "udp . 5353 . 0.0.0.0/0",
  ]);
  assert.equal(elems(r, "s_svc_web_inb6")?.sort(), [
    "tcp . 8080 . 2001:db8::/32",
    "udp . 5353 . ::/0",
  ]);
  assert.equal(elems(r, "s_svc_web_srvp"), ["tcp . 8080", "udp . 5353"]);
  assert.equal(rules(r, "i_svc_web"), [
    "meta l4proto . th dport . ip saddr @s_svc_web_inb4 accept",
    "meta l4proto . th dport . ip6 saddr @s_svc_web_inb6 accept",
    'counter name "i_svc_web"',
    'limit rate 5/second burst 10 packets log prefix "egressd reject-in svc-web: "',
    "meta l4proto tcp reject with tcp reset",
    "reject with icmpx admin-prohibited",
  ]);
  assert.equal(rules(r, "r_svc_web"), [
    "meta l4proto . th sport @s_svc_web_srvp accept",
    'counter name "i_svc_web"',
    'limit rate 5/second burst 10 packets log prefix "egressd reject-serve svc-web: "',
    "drop",
  ]);
});

test("a service that declares no inbound port cannot answer on any", () => {
  const r = compile(policy().service("svc-web", 2001).build());
  assert.equal(rules(r, "r_svc_web"), [
    'counter name "i_svc_web"',
    'limit rate 5/second burst 10 packets log prefix "egressd reject-serve svc-web: "',
    "drop",
  ]);
  assert.is(chain(r, "i_svc_web"), undefined);
  assert.equal(elems(r, "in_dispatch"), []);
});

test("two services may not declare overlapping inbound ports", () => {
  const b = policy();
  b.service("svc-a", 2001).input.policy.inbound.push({ ports: "8000-8100", protocol: "tcp" });
  b.service("svc-b", 2002).input.policy.inbound.push({ ports: "8080", protocol: "tcp" });
  try {
    compile(b.build());
    assert.unreachable("compiled");
  } catch (err) {
    assert.instance(err, EgressError);
    assert.match(
      (err as EgressError).problems[0]?.text ?? "",
      "inbound 8080/tcp overlaps 8000-8100/tcp of service svc-a",
    );
  }
});

test("a service chain allows resolvers, literals and resolved names, then counts, logs and rejects", () => {
  const r = compile(
    policy()
      .service("svc-web", 2001)
      .set({ dns: "system" })
      .allow("api.example.test:443", "10.0.0.0/8:5432", "[2001:db8::/32]:443", "192.0.2.7:53/udp")
      .resolve("api.example.test", "203.0.113.5", "2001:db8:5::1")
      .build(),
  );
  assert.equal(rules(r, "s_svc_web"), [
    "ip daddr . meta l4proto . th dport @resolvers4 accept",
    "ip6 daddr . meta l4proto . th dport @resolvers6 accept",
    "ip daddr . meta l4proto . th dport @s_svc_web_lit4 accept",
    "ip6 daddr . meta l4proto . th dport @s_svc_web_lit6 accept",
    "tcp dport 443 ip daddr @s_svc_web_tcp443_4 accept",
    "tcp dport 443 ip6 daddr @s_svc_web_tcp443_6 accept",
    'counter name "s_svc_web"',
    'limit rate 5/second burst 10 packets log prefix "egressd reject svc-web: "',
    "meta l4proto tcp reject with tcp reset",
    "reject with icmpx admin-prohibited",
  ]);
  assert.equal(elems(r, "s_svc_web_lit4"), ["10.0.0.0/8 . tcp . 5432", "192.0.2.7 . udp . 53"]);
  assert.equal(elems(r, "s_svc_web_lit6"), ["2001:db8::/32 . tcp . 443"]);
  assert.equal(elems(r, "s_svc_web_tcp443_4"), ["203.0.113.5"]);
  assert.equal(elems(r, "s_svc_web_tcp443_6"), ["2001:db8:5::1"]);
  assert.equal(elems(r, "resolvers4"), ["127.0.0.53 . tcp . 53", "127.0.0.53 . udp . 53"]);
});

test("audit mode counts and logs but accepts; dns none drops the resolver rules", () => {
  const r = compile(policy().service("svc-a", 2001).set({ mode: "audit", dns: "none" }).build());
  assert.equal(rules(r, "s_svc_a"), [
    'counter name "s_svc_a"',
    'limit rate 5/second burst 10 packets log prefix "egressd audit svc-a: "',
    "accept",
  ]);
});

test("a service with a group is also dispatched by gid", () => {
  const r = compile(policy().service("svc-a", 2001).gid(3001).service("svc-b", 2002).build());
  assert.equal(elems(r, "gid_dispatch"), ["3001 : goto s_svc_a"]);
  assert.equal(elems(r, "uid_dispatch"), ["2001 : goto s_svc_a", "2002 : goto s_svc_b"]);
});

test("overlapping allowances become disjoint elements covering the same traffic", () => {
  const r = compile(
    policy()
      .service("svc-web", 2001)
      .allow(
        "10.0.0.0/8:5432",
        "10.1.0.0/16:5000-6000",
        "10.1.2.3:5432",
        "192.0.2.0/25:53/udp",
        "192.0.2.128/25:53/udp",
      )
      .build(),
  );
  assert.equal(elems(r, "s_svc_web_lit4"), [
    "10.0.0.0/8 . tcp . 5432",
    "10.1.0.0/16 . tcp . 5000-5431",
    "10.1.0.0/16 . tcp . 5433-6000",
    "192.0.2.0/24 . udp . 53",
  ]);
});

test("a name allowed by two services feeds both services' sets", () => {
  const r = compile(
    policy()
      .service("svc-a", 2001)
      .allow("api.example.test:443")
      .service("svc-b", 2002)
      .allow("api.example.test:8443")
      .resolve("api.example.test", "203.0.113.5")
      .build(),
  );
  assert.equal(elems(r, "s_svc_a_tcp443_4"), ["203.0.113.5"]);
  assert.equal(elems(r, "s_svc_b_tcp8443_4"), ["203.0.113.5"]);
});

test("the base chains hold ten, two and two rules whether there is one service or a thousand", () => {
  for (const n of [0, 1, 1000]) {
    const b = policy();
    for (let i = 0; i < n; i++)
      b.service(`svc-${i}`, 10_000 + i).allow(`198.51.100.${i % 250}:443`);
    const r = compile(b.build());
    assert.is(chain(r, "output")?.rules.length, 10, `${n} services`);
    assert.is(chain(r, "input")?.rules.length, 2, `${n} services`);
    assert.is(chain(r, "dns_redirect")?.rules.length, 2, `${n} services`);
    assert.is(set(r, "uid_dispatch")?.elem.length, n);
  }
});

test("DNS-aware services: their owners and proxy ports fill the guards that run before established traffic", () => {
  const r = compile(
    policy()
      .service("svc-a", 2001)
      .gid(3001)
      .proxy(20001)
      .service("svc-b", 2002)
      .proxy(20002)
      .service("svc-sys", 2003)
      .set({ dns: "system" })
      .build(),
  );
  assert.equal(set(r, "uid_dnsaware")?.elem, [2001, 2002]);
  assert.equal(set(r, "gid_dnsaware")?.elem, [3001]);
  assert.equal(set(r, "proxy_ports")?.elem, [20001, 20002]);
  assert.equal(set(r, "uid2port")?.elem, [
    [2001, 20001],
    [2002, 20002],
  ]);
  const rules = (chain(r, "output")?.rules ?? []).map((x) => JSON.stringify(x));
  const established = rules.findIndex((x) => x.includes('"established"'));
  const guards = rules
    .map((x, i) => [x, i] as const)
    .filter(([x]) => x.includes("@uid_dnsaware") || x.includes("@proxy_ports"));
  assert.is(guards.length, 2);
  for (const [x, i] of guards) {
    assert.ok(i < established, `guard before established: ${x}`);
    assert.match(x, '"original"');
    assert.match(x, "admin-prohibited");
  }
});

test("assemble reuses the previous table's shared sets while no service's share of them changed", () => {
  const input = policy()
    .service("svc-a", 2001)
    .proxy(20001)
    .allow("*.a.example.test:443")
    .service("svc-b", 2002)
    .proxy(20002)
    .build();
  const [a, b] = input.services as [ServiceInput, ServiceInput];
  const partsB = compileService(b, input.resolutions);
  const first = assemble("egressd", input.resolvers, [
    compileService(a, input.resolutions),
    partsB,
  ]);
  // svc-a recompiled with a learned address: its sets differ, its dispatch entries do not.
  const learned = new Map([["x.a.example.test", new Map([["198.51.100.1", Date.now() + 60_000]])]]);
  const second = assemble(
    "egressd",
    input.resolvers,
    [compileService(a, input.resolutions, learned), partsB],
    first,
  );
  for (const name of ["uid_dispatch", "uid2port", "proxy_ports", "uid_dnsaware", "resolvers4"])
    assert.ok(set(second, name) === set(first, name), `${name} is the same object`);
  assert.ok(set(second, "s_svc_a_tcp443_4") !== set(first, "s_svc_a_tcp443_4"));
  assert.equal(set(second, "s_svc_a_tcp443_4")?.elem, ["198.51.100.1"]);
  // svc-b moved to another proxy port: the shared sets are built anew, with it.
  const third = assemble(
    "egressd",
    input.resolvers,
    [
      compileService(a, input.resolutions),
      compileService({ ...b, proxyPort: 20003 }, input.resolutions),
    ],
    second,
  );
  assert.ok(set(third, "uid2port") !== set(second, "uid2port"));
  assert.equal(set(third, "proxy_ports")?.elem, [20001, 20003]);
  // The same parts without the previous table: equal content.
  assert.equal(
    second,
    assemble("egressd", input.resolvers, [compileService(a, input.resolutions, learned), partsB]),
  );
});

test("two services with the same uid are refused, naming both", () => {
  try {
    compile(policy().service("svc-a", 2001).service("svc-b", 2001).build());
    assert.unreachable("compiled");
  } catch (err) {
    assert.instance(err, EgressError);
    assert.match(
      (err as EgressError).problems[0]?.text ?? "",
      "uid 2001 is already used by service svc-a",
    );
  }
});

test("the full-replace batch passes the schema and touches only egressd's table", () => {
  const r = compile(
    policy()
      .service("svc-web", 2001)
      .allow("api.example.test:443")
      .resolve("api.example.test", "192.0.2.1")
      .build(),
  );
  const batch = replaceBatch(r, 0);
  validateBatch(batch);
  const first = batch.nftables.slice(0, 3).map((c) => Object.keys(c)[0]);
  assert.equal(first, ["add", "delete", "add"]);
  for (const cmd of batch.nftables) {
    const obj = Object.values(Object.values(cmd)[0] ?? {})[0] as {
      table?: string;
      name?: string;
      family?: string;
    };
    assert.is(obj.family, "inet");
    assert.ok(obj.table === "egressd" || obj.name === "egressd", JSON.stringify(cmd));
  }
  assert.not.ok(JSON.stringify(batch).includes('"flush"'), "never flushes");
});

test("output is deterministic whatever order services and answers come in", () => {
  const a = compile(
    policy()
      .service("svc-b", 2002)
      .allow("x.example.test:80")
      .service("svc-a", 2001)
      .resolve("x.example.test", "192.0.2.2", "192.0.2.1")
      .build(),
  );
  const b = compile(
    policy()
      .service("svc-a", 2001)
      .service("svc-b", 2002)
      .allow("x.example.test:80")
      .resolve("x.example.test", "192.0.2.1", "192.0.2.2")
      .build(),
  );
  assert.equal(replaceBatch(a, 0), replaceBatch(b, 0));
});

test.run();
