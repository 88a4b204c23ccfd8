/** Learning mode's pure parts: the window, the mode meanwhile, and the proposal. */
import { suite } from "uvu";
import * as assert from "uvu/assert";
import {
  adopt,
  effectivePolicy,
  isLearning,
  nextLearningEnd,
  parseDuration,
  propose,
  proposalText,
  type Observed,
} from "../../rules/learn.ts";
import { serviceToJSON, validateService, type ServicePolicy } from "../../rules/policy.ts";
import type { Listener } from "../../rules/listeners.ts";

const test = suite("learning mode");

const T0 = Date.parse("2026-12-05T10:00:00Z");
const policy = (patch: Partial<ServicePolicy> = {}): ServicePolicy => ({
  name: "svc-web",
  user: 2001,
  mode: "enforce",
  dns: "proxy",
  outbound: [{ host: "api.example.test", ports: "443", protocol: "tcp" }],
  inbound: [],
  ...patch,
});
const seen = (
  address: string,
  port: number,
  packets = 1,
  protocol: "tcp" | "udp" = "tcp",
): Observed => ({
  address,
  family: address.includes(":") ? 6 : 4,
  protocol,
  port,
  packets,
  names: [],
});

test("a learning window puts the service in audit mode until it ends, then its written mode again", () => {
  const p = policy({ learning: { since: "2026-12-05T10:00:00Z", until: "2026-12-05T11:00:00Z" } });
  assert.ok(isLearning(p, T0 + 1));
  assert.is(effectivePolicy(p, T0 + 1).mode, "audit");
  assert.is(effectivePolicy(p, T0 + 3_600_000).mode, "enforce", "the window's end is exclusive");
  assert.is(effectivePolicy(policy(), T0).mode, "enforce", "no window, no change");
  const open = policy({ learning: { since: "2026-12-05T10:00:00Z" } });
  assert.is(effectivePolicy(open, T0 + 86_400_000 * 365).mode, "audit", "no until: until stopped");
  assert.is(nextLearningEnd([open, p, policy()], T0), T0 + 3_600_000);
  assert.is(nextLearningEnd([p], T0 + 3_600_000), null, "an ended window wakes nobody");
});

test("durations: units s, m, h, d, combined; anything else is an error naming the value", () => {
  assert.is(parseDuration("90s"), 90_000);
  assert.is(parseDuration("1h30m"), 5_400_000);
  assert.is(parseDuration("7d"), 604_800_000);
  for (const bad of ["", "10", "1x", "m", "0s", "1h 30m", "-5m", "1.5h"]) {
    const r = parseDuration(bad);
    assert.type(r, "object", bad);
    assert.match((r as { error: string }).error, `"${bad}"`);
  }
});

test("the window round-trips through the policy file, and a bad time is refused with its path", () => {
  const p = policy({
    learning: { since: "2026-12-05T10:00:00.000Z", until: "2026-12-05T11:00:00.000Z" },
  });
  const back = validateService(JSON.parse(serviceToJSON(p)), "svc-web.json");
  assert.equal(back.learning, p.learning);
  try {
    validateService(
      { ...JSON.parse(serviceToJSON(p)), learning: { since: "yesterday" } },
      "svc-web.json",
    );
    assert.unreachable("accepted");
  } catch (err) {
    assert.match(
      String((err as { problems: unknown[] }).problems.map((x) => JSON.stringify(x))),
      "$.learning.since",
    );
  }
});

test("the proposal: names looked up and connected to, a literal address only where no name explains it", () => {
  const listeners: Listener[] = [
    { protocol: "tcp", family: 4, address: "0.0.0.0", port: 8080, uid: 2001 },
    { protocol: "tcp", family: 6, address: "::", port: 8080, uid: 2001 },
  ];
  const p = propose({
    policy: policy(),
    observed: [
      seen("198.51.100.7", 443, 12),
      seen("198.51.100.8", 443, 3), // the same name answered two addresses: one rule
      seen("203.0.113.9", 5432, 4),
      seen("2001:db8::5", 53, 2, "udp"),
      seen("169.254.169.254", 80, 1), // metadata: flagged, never proposed silently
    ],
    lookedUp: [
      { name: "telemetry.vendor.test", addresses: ["198.51.100.7", "198.51.100.8"] },
      { name: "ntp.vendor.test", addresses: ["2001:db8::5"] },
      { name: "never-used.test", addresses: ["192.0.2.99"] },
    ],
    listeners,
    refuseReason: (a) => (a === "169.254.169.254" ? "cloud metadata" : null),
  });
  assert.equal(
    p.outbound.map((o) => [
      o.rule.host,
      o.rule.ports,
      o.rule.protocol,
      o.by,
      o.packets,
      o.flagged ?? "",
    ]),
    [
      ["ntp.vendor.test", "53", "udp", "name", 2, ""],
      ["telemetry.vendor.test", "443", "tcp", "name", 15, ""],
      ["169.254.169.254", "80", "tcp", "address", 1, "169.254.169.254: cloud metadata"],
      ["203.0.113.9", "5432", "tcp", "address", 4, ""],
    ],
  );
  assert.equal(
    p.inbound.map((i) => i.rule),
    [{ ports: "8080", protocol: "tcp" }],
  );
  assert.equal(p.unused, ["never-used.test"]);
  const next = adopt(policy({ learning: { since: "2026-12-05T10:00:00Z" } }), p);
  assert.is(next.learning, undefined, "adopting ends the window");
  assert.equal(
    next.outbound.map((o) => `${o.host}:${o.ports}/${o.protocol}`),
    [
      "api.example.test:443/tcp",
      "ntp.vendor.test:53/udp",
      "telemetry.vendor.test:443/tcp",
      "203.0.113.9:5432/tcp",
    ],
  );
  assert.equal(next.inbound, [{ ports: "8080", protocol: "tcp" }]);
  const text = proposalText(p, "learning");
  assert.match(text, "allow telemetry.vendor.test:443  (15 packets; 198.51.100.7, 198.51.100.8)");
  assert.match(text, "flagged, not proposed");
  assert.match(text, "169.254.169.254:80  (169.254.169.254: cloud metadata)");
  assert.match(text, "allow-in 8080  (listening: 8080/tcp (on 0.0.0.0), 8080/tcp (on [::]))");
});

test("what the policy allows already, and ports it declares, are not proposed again", () => {
  const p = propose({
    policy: policy({ inbound: [{ ports: "8000-8100", protocol: "tcp" }] }),
    observed: [seen("198.51.100.7", 443)],
    lookedUp: [{ name: "api.example.test", addresses: ["198.51.100.7"] }],
    listeners: [{ protocol: "tcp", family: 4, address: "0.0.0.0", port: 8080, uid: 2001 }],
    refuseReason: () => null,
  });
  assert.equal(p.outbound, []);
  assert.equal(p.inbound, []);
  assert.equal(p.unused, []);
  assert.match(proposalText(p, "learning"), "nothing to add");
});

test("names other services' policies gave an address explain it only for a service that does not use egressd's DNS", () => {
  const known = { ...seen("192.0.2.11", 443), names: ["api.other.test", "x.cdn.example.test"] };
  const input = (p: ServicePolicy) => ({
    policy: p,
    observed: [known],
    lookedUp: [],
    listeners: [],
    refuseReason: () => null,
  });
  const aware = propose(input(policy()));
  assert.equal(
    aware.outbound.map((o) => `${o.by} ${o.rule.host}`),
    ["address 192.0.2.11"],
    "a DNS-aware service never looked those names up: the literal address",
  );
  const wild = propose(
    input(policy({ outbound: [{ host: "*.cdn.example.test", ports: "8443", protocol: "tcp" }] })),
  );
  assert.equal(
    wild.outbound.map((o) => `${o.by} ${o.rule.host}`),
    ["name x.cdn.example.test"],
    "a name its own wildcard covers explains it",
  );
  const system = propose(input(policy({ dns: "system" })));
  assert.equal(
    system.outbound.map((o) => `${o.by} ${o.rule.host}`),
    ["name api.other.test", "name x.cdn.example.test"],
    "a service asking the resolver itself: the daemon's names are the best guess",
  );
});

test.run();
