/**
 * JSON Schema for the subset of libnftables JSON (libnftables-json(5), json_schema_version 1)
 * that egressd emits. Every batch is checked against it before it reaches `nft`, so a
 * misspelt key or a wrongly shaped expression is caught here with a path, not by the kernel.
 */
import { EgressError } from "./errors.ts";
import { validator } from "./validators.ts";

import type { Batch } from "./batch.ts";

const NAME = { type: "string", pattern: "^[A-Za-z_][A-Za-z0-9_]{0,62}$" };
const FAMILY = { const: "inet" };
const IPV4 =
  "^(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])(\\.(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])){3}$";
const IPV6 = "^[0-9a-f:.]*:[0-9a-f:.]*$";
const obj = (
  properties: Record<string, unknown>,
  required: string[] = Object.keys(properties),
) => ({
  type: "object",
  additionalProperties: false,
  properties,
  required,
});

export const NFT_BATCH_SCHEMA = {
  $id: "https://egressd.dev/schema/nft-batch.json",
  type: "object",
  additionalProperties: false,
  required: ["nftables"],
  properties: {
    nftables: { type: "array", items: { $ref: "#/$defs/command" } },
  },
  $defs: {
    address: { type: "string", anyOf: [{ pattern: IPV4 }, { pattern: IPV6 }] },
    port: { type: "integer", minimum: 0, maximum: 65535 },
    id: { type: "integer", minimum: 0, maximum: 4294967295 },
    addrElem: {
      anyOf: [
        { $ref: "#/$defs/address" },
        obj({
          prefix: obj({
            addr: { $ref: "#/$defs/address" },
            len: { type: "integer", minimum: 0, maximum: 128 },
          }),
        }),
        obj({
          range: {
            type: "array",
            prefixItems: [{ $ref: "#/$defs/address" }, { $ref: "#/$defs/address" }],
            items: false,
            minItems: 2,
          },
        }),
      ],
    },
    portElem: {
      anyOf: [
        { $ref: "#/$defs/port" },
        obj({
          range: {
            type: "array",
            prefixItems: [{ $ref: "#/$defs/port" }, { $ref: "#/$defs/port" }],
            items: false,
            minItems: 2,
          },
        }),
      ],
    },
    concatElem: obj({
      concat: {
        type: "array",
        prefixItems: [
          { $ref: "#/$defs/addrElem" },
          { enum: ["tcp", "udp"] },
          { $ref: "#/$defs/portElem" },
        ],
        items: false,
        minItems: 3,
      },
    }),
    // protocol . port . source (inbound sources) and protocol . port (declared ports)
    sourceElem: obj({
      concat: {
        type: "array",
        prefixItems: [
          { enum: ["tcp", "udp"] },
          { $ref: "#/$defs/portElem" },
          { $ref: "#/$defs/addrElem" },
        ],
        items: false,
        minItems: 3,
      },
    }),
    portKeyElem: obj({
      concat: {
        type: "array",
        prefixItems: [{ enum: ["tcp", "udp"] }, { $ref: "#/$defs/portElem" }],
        items: false,
        minItems: 2,
      },
    }),
    // uid . port (who may reach which DNS proxy port)
    idPortElem: obj({
      concat: {
        type: "array",
        prefixItems: [{ $ref: "#/$defs/id" }, { $ref: "#/$defs/port" }],
        items: false,
        minItems: 2,
      },
    }),
    // An address with a lifetime (learned by a DNS proxy), in seconds.
    timedElem: obj({
      elem: obj({
        val: { $ref: "#/$defs/address" },
        timeout: { type: "integer", minimum: 1, maximum: 4294967 },
      }),
    }),
    setElem: {
      anyOf: [
        { $ref: "#/$defs/id" }, // a uid, gid or port (uid_dnsaware, proxy_ports)
        { $ref: "#/$defs/address" },
        { $ref: "#/$defs/timedElem" },
        { $ref: "#/$defs/concatElem" },
        { $ref: "#/$defs/sourceElem" },
        { $ref: "#/$defs/portKeyElem" },
        { $ref: "#/$defs/idPortElem" },
      ],
    },
    verdict: {
      anyOf: [
        obj({ accept: { type: "null" } }),
        obj({ drop: { type: "null" } }),
        obj({ goto: obj({ target: NAME }) }),
        obj({ jump: obj({ target: NAME }) }),
      ],
    },
    mapElem: {
      type: "array",
      prefixItems: [
        { anyOf: [{ $ref: "#/$defs/id" }, { $ref: "#/$defs/portKeyElem" }] },
        { anyOf: [{ $ref: "#/$defs/verdict" }, { $ref: "#/$defs/port" }] },
      ],
      items: false,
      minItems: 2,
    },
    elem: { anyOf: [{ $ref: "#/$defs/setElem" }, { $ref: "#/$defs/mapElem" }] },
    table: obj({ family: FAMILY, name: NAME }),
    chain: {
      ...obj(
        {
          family: FAMILY,
          table: NAME,
          name: NAME,
          type: { enum: ["filter", "nat"] },
          hook: { enum: ["output", "input"] },
          prio: { type: "integer", minimum: -1000, maximum: 1000 },
          policy: { enum: ["accept", "drop"] },
        },
        ["family", "table", "name"],
      ),
      dependentRequired: {
        hook: ["type", "prio", "policy"],
        type: ["hook"],
        prio: ["hook"],
        policy: ["hook"],
      },
    },
    setType: {
      anyOf: [
        { enum: ["uid", "gid", "ipv4_addr", "ipv6_addr", "inet_service", "inet_proto"] },
        {
          type: "array",
          minItems: 2,
          items: { enum: ["uid", "gid", "ipv4_addr", "ipv6_addr", "inet_proto", "inet_service"] },
        },
      ],
    },
    set: obj(
      {
        family: FAMILY,
        table: NAME,
        name: NAME,
        type: { $ref: "#/$defs/setType" },
        flags: { type: "array", items: { enum: ["interval", "timeout"] }, uniqueItems: true },
        elem: { type: "array", items: { $ref: "#/$defs/setElem" } },
        // A set the packet path writes (the refused record): size limit, default timeout (s),
        // a counter on each element.
        size: { type: "integer", minimum: 1, maximum: 16777216 },
        timeout: { type: "integer", minimum: 1, maximum: 4294967 },
        stmt: {
          type: "array",
          prefixItems: [obj({ counter: { type: "null" } })],
          items: false,
          minItems: 1,
        },
      },
      ["family", "table", "name", "type"],
    ),
    map: obj(
      {
        family: FAMILY,
        table: NAME,
        name: NAME,
        type: {
          anyOf: [
            { enum: ["uid", "gid"] },
            {
              type: "array",
              prefixItems: [{ const: "inet_proto" }, { const: "inet_service" }],
              items: false,
              minItems: 2,
            },
          ],
        },
        flags: { type: "array", items: { enum: ["interval"] }, uniqueItems: true },
        map: { enum: ["verdict", "inet_service"] },
        elem: { type: "array", items: { $ref: "#/$defs/mapElem" } },
      },
      ["family", "table", "name", "type", "map"],
    ),
    counter: obj({ family: FAMILY, table: NAME, name: NAME }),
    element: obj({
      family: FAMILY,
      table: NAME,
      name: NAME,
      elem: { type: "array", minItems: 1, items: { $ref: "#/$defs/elem" } },
    }),
    rule: obj({
      family: FAMILY,
      table: NAME,
      chain: NAME,
      expr: { type: "array", minItems: 1, items: { $ref: "#/$defs/stmt" } },
    }),
    // Expressions (left-hand sides).
    payload: obj({
      payload: obj({
        protocol: { enum: ["ip", "ip6", "th", "tcp", "udp"] },
        field: { enum: ["saddr", "daddr", "sport", "dport"] },
      }),
    }),
    meta: obj({ meta: obj({ key: { enum: ["l4proto", "skuid", "skgid", "nfproto"] } }) }),
    ct: obj({ ct: obj({ key: { enum: ["state", "direction", "status"] } }) }),
    concatExpr: obj({
      concat: {
        type: "array",
        minItems: 2,
        items: { anyOf: [{ $ref: "#/$defs/payload" }, { $ref: "#/$defs/meta" }] },
      },
    }),
    left: {
      anyOf: [
        { $ref: "#/$defs/payload" },
        { $ref: "#/$defs/meta" },
        { $ref: "#/$defs/ct" },
        { $ref: "#/$defs/concatExpr" },
      ],
    },
    right: {
      anyOf: [
        { type: "string", pattern: "^@[A-Za-z_][A-Za-z0-9_]{0,62}$" },
        { enum: ["tcp", "udp", "icmp", "ipv6-icmp", "original", "reply", "dnat"] },
        { $ref: "#/$defs/portElem" },
        obj({ set: { type: "array", minItems: 1, items: { enum: ["tcp", "udp"] } } }),
        {
          type: "array",
          minItems: 1,
          items: { enum: ["established", "related", "new", "invalid", "untracked"] },
        },
        { $ref: "#/$defs/addrElem" },
      ],
    },
    stmt: {
      anyOf: [
        obj({
          match: obj({
            op: { enum: ["==", "!=", "in"] },
            left: { $ref: "#/$defs/left" },
            right: { $ref: "#/$defs/right" },
          }),
        }),
        obj({ accept: { type: "null" } }),
        obj({ drop: { type: "null" } }),
        obj({ counter: NAME }),
        obj({
          limit: obj(
            {
              rate: { type: "integer", minimum: 1 },
              per: { enum: ["second", "minute", "hour"] },
              burst: { type: "integer", minimum: 1 },
            },
            ["rate", "per"],
          ),
        }),
        obj({
          log: obj(
            {
              prefix: { type: "string", maxLength: 127 },
              level: { enum: ["emerg", "alert", "crit", "err", "notice", "info", "debug"] },
            },
            ["prefix"],
          ),
        }),
        obj({ reject: obj({ type: { const: "tcp reset" } }) }),
        // `update @refused4 { <uid> . ip daddr . meta l4proto . th dport }` (the refused record)
        obj({
          set: obj({
            op: { const: "update" },
            elem: obj({
              concat: {
                type: "array",
                prefixItems: [
                  { $ref: "#/$defs/id" },
                  { $ref: "#/$defs/payload" },
                  { $ref: "#/$defs/meta" },
                  { $ref: "#/$defs/payload" },
                ],
                items: false,
                minItems: 4,
              },
            }),
            set: { type: "string", pattern: "^@[A-Za-z_][A-Za-z0-9_]{0,62}$" },
          }),
        }),
        obj({
          reject: obj({
            type: { const: "icmpx" },
            expr: {
              enum: ["admin-prohibited", "port-unreachable", "host-unreachable", "no-route"],
            },
          }),
        }),
        obj({
          redirect: obj({
            port: obj({
              map: obj({
                key: { $ref: "#/$defs/meta" },
                data: { type: "string", pattern: "^@[A-Za-z_][A-Za-z0-9_]{0,62}$" },
              }),
            }),
          }),
        }),
        obj({
          vmap: obj({
            key: { anyOf: [{ $ref: "#/$defs/meta" }, { $ref: "#/$defs/concatExpr" }] },

            data: { type: "string", pattern: "^@[A-Za-z_][A-Za-z0-9_]{0,62}$" },
          }),
        }),
      ],
    },
    addObject: {
      anyOf: [
        obj({ table: { $ref: "#/$defs/table" } }),
        obj({ chain: { $ref: "#/$defs/chain" } }),
        obj({ set: { $ref: "#/$defs/set" } }),
        obj({ map: { $ref: "#/$defs/map" } }),
        obj({ counter: { $ref: "#/$defs/counter" } }),
        obj({ rule: { $ref: "#/$defs/rule" } }),
        obj({ element: { $ref: "#/$defs/element" } }),
      ],
    },
    named: obj({ family: FAMILY, table: NAME, name: NAME }),
    deleteObject: {
      anyOf: [
        obj({ table: { $ref: "#/$defs/table" } }),
        obj({ element: { $ref: "#/$defs/element" } }),
        obj({ chain: { $ref: "#/$defs/named" } }),
        obj({ set: { $ref: "#/$defs/named" } }),
        obj({ map: { $ref: "#/$defs/named" } }),
        obj({ counter: { $ref: "#/$defs/named" } }),
      ],
    },
    command: {
      anyOf: [
        obj({ add: { $ref: "#/$defs/addObject" } }),
        obj({ delete: { $ref: "#/$defs/deleteObject" } }),
        obj({ flush: obj({ chain: { $ref: "#/$defs/named" } }) }),
      ],
    },
  },
};

// Every union's branches are told apart by their one key (additionalProperties: false), so
// anyOf accepts exactly what oneOf would, and stops at the first match. The fast validator
// stops at the first error; only a failing batch is checked again to report every complaint.
const batchValidator = () => validator("batch", NFT_BATCH_SCHEMA);
const reportingValidator = () => validator("batchReport", NFT_BATCH_SCHEMA);

/** Throws ERR_EGRESS_NFT_SCHEMA (an internal error) when a batch strays from the schema. */
export function validateBatch(batch: unknown): asserts batch is Batch {
  if (batchValidator()(batch)) return;
  const check = reportingValidator();
  check(batch);
  // Inside a union every branch complains; the deepest complaint is the one that names the mistake.
  const first = [...(check.errors ?? [])].sort(
    (a, b) => b.instancePath.length - a.instancePath.length,
  )[0];
  const at = first?.instancePath ?? "";
  throw new EgressError(
    "ERR_EGRESS_NFT_SCHEMA",
    `generated nftables JSON does not match egressd's schema at ${at || "/"}: ${first?.message ?? "invalid"}`,
    {
      exitCode: 4,
      hint: "this is a bug in egressd; nothing was sent to nft. Please report it with the policy that caused it",
      details: { errors: check.errors?.slice(0, 5) },
    },
  );
}
