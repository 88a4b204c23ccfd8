import { suite } from "uvu";
import * as assert from "uvu/assert";
import { replaceBatch } from "../../rules/batch.ts";
import { compile } from "../../rules/compile.ts";
import { auditDiff, diff } from "../../rules/diff.ts";
import { parseLive } from "../../rules/live.ts";
import {
  formatRefused,
  parseRefusedListing,
  refusedEntries,
  refusedLine,
  type RefusedEntry,
} from "../../rules/refused.ts";
import type { Ruleset } from "../../rules/ruleset.ts";
import { policy } from "../helpers/builders.ts";

const test = suite("the refused-destination record: listing, names, text, and no drift");

const desired = (size = 64): Ruleset =>
  compile({
    ...policy()
      .service("svc-a", 2001)
      .allow("api.example.test:443")
      .service("svc-b", 2002)
      .allow("198.51.100.1:22")
      .resolve("api.example.test", "192.0.2.1")
      .build(),
    refused: { size, timeoutSeconds: 600 },
  });

/** `nft -j list table` of `r` as the kernel lists it once refusals filled the record. */
function listing(r: Ruleset): unknown {
  const items: unknown[] = [
    { metainfo: { version: "1.0.6", json_schema_version: 1 } },
    { table: { family: "inet", name: r.table, handle: 1 } },
  ];
  for (const cmd of replaceBatch(r, 0).nftables.slice(3)) {
    const [kind, o] = Object.entries(cmd.add ?? {})[0] as [string, Record<string, unknown>];
    if (kind === "rule") {
      items.push({ rule: { ...o, handle: 9 } });
      continue;
    }
    if (kind === "set" && /^refused[46]$/.test(String(o.name))) {
      const v6 = o.name === "refused6";
      items.push({
        set: {
          family: "inet",
          name: o.name,
          table: r.table,
          type: o.type,
          handle: 3,
          size: o.size,
          flags: o.flags,
          timeout: o.timeout,
          elem: [
            {
              elem: {
                val: { concat: [2001, v6 ? "2001:db8::7" : "203.0.113.7", "tcp", 443] },
                expires: 420,
                counter: { packets: 12, bytes: 720 },
              },
            },
          ],
          stmt: [{ counter: null }],
        },
      });
      continue;
    }
    items.push({ [kind]: { ...o, handle: 2 } });
  }
  return { nftables: items };
}

test("a filled record is not drift: the audit and apply --dry-run find nothing", () => {
  const live = parseLive(listing(desired()), "egressd", 1000);
  assert.ok(live);
  assert.equal(diff(live, desired()), []);
  assert.equal(auditDiff(live, desired(), 1000), []);
  const rec = live?.sets.find((s) => s.name === "refused4");
  assert.equal(rec?.dynamic, { size: 64, timeoutSeconds: 600 });
  assert.equal(rec?.elem, []);
});

/** [what, the live table, the finding expected] */
const DRIFT: [string, () => Ruleset | null, string[]][] = [
  [
    "a record set of another size",
    () => parseLive(listing(desired(128)), "egressd", 0),
    ["set-changed set refused4", "set-changed set refused6"],
  ],
  [
    "a record set deleted by hand",
    () => {
      const live = parseLive(listing(desired()), "egressd", 0) as Ruleset;
      return { ...live, sets: live.sets.filter((s) => s.name !== "refused6") };
    },
    ["set-missing set refused6"],
  ],
  [
    "a service chain without its update rules",
    () =>
      parseLive(
        listing(compile({ ...desiredInput(), refused: { size: 0, timeoutSeconds: 600 } })),
        "egressd",
        0,
      ),
    [
      ...Array(4).fill("rule-missing chain s_svc_a"),
      ...Array(4).fill("rule-missing chain s_svc_b"),
      "set-missing set refused4",
      "set-missing set refused6",
    ],
  ],
];

function desiredInput() {
  return policy()
    .service("svc-a", 2001)
    .allow("api.example.test:443")
    .service("svc-b", 2002)
    .allow("198.51.100.1:22")
    .resolve("api.example.test", "192.0.2.1")
    .build();
}

for (const [what, live, expected] of DRIFT) {
  test(`the record's definition is audited: ${what}`, () => {
    const found = diff(live(), desired()).map((f) => `${f.kind} ${f.object}`);
    assert.equal(found, expected);
  });
}

const LISTING = {
  nftables: [
    { metainfo: { version: "1.0.6" } },
    {
      set: {
        family: "inet",
        name: "refused4",
        table: "egressd",
        type: ["uid", "ipv4_addr", "inet_proto", "inet_service"],
        size: 64,
        flags: ["timeout"],
        timeout: 3600,
        elem: [
          {
            elem: {
              val: { concat: [2001, "198.51.100.7", "tcp", 443] },
              expires: 3420,
              counter: { packets: 212, bytes: 12720 },
            },
          },
          {
            elem: {
              val: { concat: [2002, "203.0.113.9", "udp", 53] },
              expires: 3599,
              counter: { packets: 3, bytes: 180 },
            },
          },
          // An element with its own timeout (older kernels list it) and one of a gone service.
          {
            elem: {
              val: { concat: [2001, "192.0.2.44", "udp", 123] },
              timeout: 600,
              expires: 590,
              counter: { packets: 5, bytes: 380 },
            },
          },
          {
            elem: {
              val: { concat: [3999, "192.0.2.45", "tcp", 80] },
              expires: 100,
              counter: { packets: 9, bytes: 540 },
            },
          },
        ],
        stmt: [{ counter: null }],
      },
    },
  ],
};

test("a set listing becomes raw entries: uid, destination, counters, last seen = timeout - expires", () => {
  assert.equal(parseRefusedListing(LISTING).slice(0, 3), [
    {
      uid: 2001,
      address: "198.51.100.7",
      family: 4,
      protocol: "tcp",
      port: 443,
      packets: 212,
      bytes: 12720,
      lastSeenSeconds: 180,
    },
    {
      uid: 2002,
      address: "203.0.113.9",
      family: 4,
      protocol: "udp",
      port: 53,
      packets: 3,
      bytes: 180,
      lastSeenSeconds: 1,
    },
    {
      uid: 2001,
      address: "192.0.2.44",
      family: 4,
      protocol: "udp",
      port: 123,
      packets: 5,
      bytes: 380,
      lastSeenSeconds: 10,
    },
  ]);
  assert.equal(parseRefusedListing(null), []);
  assert.equal(parseRefusedListing({ nftables: [{ set: { name: "other", elem: [1] } }] }), []);
});

test("entries name their service, carry the names known for the address, one service on request, by packets", () => {
  const services = new Map([
    [2001, "svc-a"],
    [2002, "svc-b"],
  ]);
  const names = (svc: string, a: string) =>
    svc === "svc-a" && a === "198.51.100.7"
      ? ["telemetry.vendor.example", "telemetry.vendor.example"]
      : [];
  const all = refusedEntries(parseRefusedListing(LISTING), services, names);
  assert.equal(
    all.map((e) => [e.service, e.address, e.packets, e.names]),
    [
      ["svc-a", "198.51.100.7", 212, ["telemetry.vendor.example"]],
      ["svc-a", "192.0.2.44", 5, []],
      ["svc-b", "203.0.113.9", 3, []],
    ],
  );
  assert.equal(
    refusedEntries(parseRefusedListing(LISTING), services, names, "svc-b").map((e) => e.address),
    ["203.0.113.9"],
  );
});

test("the text form: destination, names, packets, last seen; IPv6 in brackets", () => {
  const e: RefusedEntry = {
    service: "svc-a",
    address: "198.51.100.7",
    family: 4,
    protocol: "tcp",
    port: 443,
    packets: 212,
    bytes: 12720,
    lastSeenSeconds: 180,
    names: ["telemetry.vendor.example"],
  };
  assert.is(
    refusedLine(e),
    "198.51.100.7:443/tcp ← telemetry.vendor.example, 212 packets, 3 min ago",
  );
  assert.is(
    refusedLine({
      ...e,
      address: "2001:db8::7",
      family: 6,
      names: [],
      packets: 1,
      lastSeenSeconds: 0,
    }),
    "[2001:db8::7]:443/tcp, 1 packet, just now",
  );
  assert.is(
    formatRefused([{ ...e, service: "svc-b", packets: 1 }, e]),
    "svc-a:\n  198.51.100.7:443/tcp ← telemetry.vendor.example, 212 packets, 3 min ago\nsvc-b:\n  198.51.100.7:443/tcp ← telemetry.vendor.example, 1 packet, 3 min ago",
  );
  assert.is(formatRefused([], "svc-a"), "no refused destinations recorded for svc-a");
});

test.run();
