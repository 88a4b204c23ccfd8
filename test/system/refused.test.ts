/**
 * The refused-destination record, in a namespace with real processes under test uids: refused
 * connections show up in `egressctl refused` with their packet counts and the names their
 * addresses came from, audit mode records what it would refuse, a change to another service keeps
 * what was recorded, the audit finds no drift in a filled record, and a flood of destinations
 * keeps the set within its size without changing any verdict.
 */
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { type Sandbox, withSandbox } from "../helpers/sandbox.ts";
import type { RefusedEntry } from "../../rules/refused.ts";
import { API4, API6, AUDIT_UID, CIDR_HOST, DB, OTHER, SVC_UID, WORLD } from "./world.ts";

const test = suite("refused: what each service was refused, recorded by the kernel");

const DB_UID = 2003;

async function refusedJson(
  sb: Sandbox,
  ...args: string[]
): Promise<{ entries: RefusedEntry[]; record: { size: number; timeoutSeconds: number } }> {
  return JSON.parse(await sb.ok("--json", "refused", ...args)) as {
    entries: RefusedEntry[];
    record: { size: number; timeoutSeconds: number };
  };
}

const key = (e: RefusedEntry) => `${e.service} ${e.address} ${e.protocol}/${e.port}`;

/** The record's elements as the kernel lists them (count per family). */
async function elements(sb: Sandbox, family: 4 | 6): Promise<unknown[]> {
  const j = await sb.nftJson("list", "set", "inet", "egressd", `refused${family}`);
  return (j.nftables.find((o) => o.set)?.set?.elem as unknown[] | undefined) ?? [];
}

test("refused connections show up by service with packet counts, last seen and the name the address came from; a change elsewhere keeps them; no drift", async () => {
  await withSandbox(WORLD, async (sb) => {
    sb.writeConfig({ ...WORLD.config, refused: { size: 64, timeoutSeconds: 600 } });
    await sb.ok("register", "svc-web", "--user", String(SVC_UID));
    await sb.ok("allow", "svc-web", "api.example.test:443");
    await sb.ok("register", "svc-audit", "--user", String(AUDIT_UID), "--mode", "audit");
    await sb.ok("register", "svc-db", "--user", String(DB_UID));
    await sb.ok("allow", "svc-db", `${DB}:5432`);
    const daemon = await sb.startDaemon();
    await sb.ok("refresh");

    const api = API4[0] as string;
    const attempts = [
      ...Array.from({ length: 3 }, () => ({ proto: "tcp" as const, host: api, port: 8080 })),
      ...Array.from({ length: 2 }, () => ({ proto: "tcp" as const, host: OTHER, port: 443 })),
      { proto: "tcp" as const, host: API6, port: 8080 },
      { proto: "udp" as const, host: DB, port: 5354 },
      { proto: "tcp" as const, host: api, port: 443 }, // allowed: never recorded
    ];
    const results = (await sb.probe(SVC_UID, attempts)).map((r) => r.result);
    assert.equal(results, [...Array(5).fill("ECONNREFUSED"), "ECONNREFUSED", "EPERM", "connected"]);
    // Audit mode: let through, and recorded all the same.
    assert.is(await sb.try1(AUDIT_UID, "tcp", OTHER, 443), "connected");

    const { entries, record } = await refusedJson(sb);
    assert.equal(record, { size: 64, timeoutSeconds: 600 });
    const got = new Map(entries.map((e) => [key(e), e]));
    const want: [string, number, string[]][] = [
      [`svc-web ${api} tcp/8080`, 3, ["api.example.test"]],
      [`svc-web ${OTHER} tcp/443`, 2, []],
      [`svc-web ${API6} tcp/8080`, 1, ["api.example.test"]],
      [`svc-web ${DB} udp/5354`, 1, []],
      [`svc-audit ${OTHER} tcp/443`, 1, []],
    ];
    assert.equal(
      [...got.keys()].sort(),
      want.map(([k]) => k).sort(),
      `exactly the refused destinations:\n${JSON.stringify(entries, null, 1)}`,
    );
    for (const [k, packets, names] of want) {
      const e = got.get(k) as RefusedEntry;
      assert.is(e.packets, packets, k);
      assert.equal(e.names, names, k);
      assert.ok(e.bytes >= packets * 28, `${k}: ${e.bytes} bytes (IP headers and up)`);
      assert.ok(e.lastSeenSeconds >= 0 && e.lastSeenSeconds < 60, `${k}: ${e.lastSeenSeconds}`);
    }
    assert.is(got.get(`svc-web ${API6} tcp/8080`)?.family, 6);
    assert.is(entries[0]?.packets, 3, "most packets first");

    const text = await sb.ok("refused", "svc-web");
    assert.match(text, `${api}:8080/tcp ← api.example.test, 3 packets, `);
    assert.match(text, `[${API6}]:8080/tcp ← api.example.test, 1 packet, `);
    assert.not.match(text, "svc-audit");
    const unknown = await sb.egressctl("refused", "svc-nope");
    assert.is(unknown.exitCode, 2, unknown.stderr);
    assert.match(unknown.stderr, 'service "svc-nope" is not registered');

    // A change to another service: an incremental transaction that leaves the record alone.
    const before = JSON.stringify(await elements(sb, 4));
    await sb.ok("allow", "svc-db", `${CIDR_HOST}:8443`);
    assert.is(await sb.try1(DB_UID, "tcp", CIDR_HOST, 8443), "connected", "the change applied");
    const after = JSON.stringify(await elements(sb, 4));
    assert.is(
      after.replace(/"expires": ?\d+/g, ""),
      before.replace(/"expires": ?\d+/g, ""),
      "the same elements with the same counters",
    );
    assert.is((await refusedJson(sb, "svc-web")).entries.length, 4);

    // The audit compares the record's definition, never its elements.
    const audit = await sb.egressctl("audit");
    assert.is(audit.exitCode, 0, `no drift with a filled record:\n${audit.stdout}${audit.stderr}`);

    // A repair reconciles from a fresh listing (which holds the record's elements): they stay.
    await sb.nft("delete", "element", "inet", "egressd", "s_svc_db_lit4", `{ ${DB} . tcp . 5432 }`);
    const repaired = await sb.egressctl("audit", "--repair");
    assert.is(repaired.exitCode, 1, `drift found and repaired:\n${repaired.stdout}`);
    assert.match(repaired.stdout, "s_svc_db_lit4");
    assert.not.match(repaired.stdout, "refused");
    assert.is(await sb.try1(DB_UID, "tcp", DB, 5432), "connected", "repaired");
    assert.is(
      JSON.stringify(await elements(sb, 4)).replace(/"expires": ?\d+/g, ""),
      before.replace(/"expires": ?\d+/g, ""),
      "the repair left the record alone",
    );
    assert.is((await sb.egressctl("audit")).exitCode, 0);

    // A restart reconciles from the kernel's listing: the record survives it.
    await daemon.stop();
    await sb.startDaemon();
    assert.is(
      JSON.stringify(await elements(sb, 4)).replace(/"expires": ?\d+/g, ""),
      before.replace(/"expires": ?\d+/g, ""),
      "the restart left the record alone",
    );
    assert.is((await refusedJson(sb, "svc-web")).entries.length, 4);
  });
});

test("a flood of distinct destinations keeps the set within its size and changes no verdict, for the flooding service or another", async () => {
  await withSandbox(WORLD, async (sb) => {
    sb.writeConfig({ ...WORLD.config, refused: { size: 8, timeoutSeconds: 600 } });
    await sb.ok("register", "svc-web", "--user", String(SVC_UID));
    await sb.ok("allow", "svc-web", "api.example.test:443");
    await sb.ok("register", "svc-db", "--user", String(DB_UID));
    await sb.ok("allow", "svc-db", `${DB}:5432`);
    await sb.startDaemon();
    await sb.ok("refresh");

    const flood = Array.from({ length: 60 }, (_, i) => ({
      proto: (i % 2 ? "udp" : "tcp") as "tcp" | "udp",
      host: OTHER,
      port: 1000 + i,
    }));
    const flooded = await sb.probe(SVC_UID, flood);
    assert.ok(
      flooded.every((r) => r.result === (r.proto === "tcp" ? "ECONNREFUSED" : "EPERM")),
      JSON.stringify(flooded.filter((r) => !/ECONNREFUSED|EPERM/.test(r.result))),
    );
    const full = await elements(sb, 4);
    assert.is(full.length, 8, "full, and no larger than its size");

    // Verdicts with the set full: allowed still connects, refused still refused, both services.
    const api = API4[0] as string;
    assert.is(await sb.try1(SVC_UID, "tcp", api, 443), "connected");
    assert.is(await sb.try1(SVC_UID, "tcp", DB, 5432), "ECONNREFUSED");
    assert.is(await sb.try1(SVC_UID, "udp", DB, 5354), "EPERM");
    assert.is(await sb.try1(DB_UID, "tcp", DB, 5432), "connected");
    assert.is(await sb.try1(DB_UID, "tcp", OTHER, 443), "ECONNREFUSED");
    // The kernel still counts the refusals it could not record (status reads that counter).
    const counters = await sb.nftJson("list", "counters", "table", "inet", "egressd");
    const packets = (name: string) =>
      Number(counters.nftables.find((o) => o.counter?.name === name)?.counter?.packets ?? -1);
    assert.ok(packets("s_svc_web") >= 62, `svc-web refused ${packets("s_svc_web")}`);
    assert.ok(packets("s_svc_db") >= 1);
    // What the flood hides: another service's refusal finds no room until elements expire.
    const { entries } = await refusedJson(sb);
    assert.is(entries.length, 8);
    assert.ok(entries.every((e) => e.service === "svc-web"));
    assert.is((await elements(sb, 4)).length, 8);
  });
});

test("the record turns off and on with a reload (sets and update rules go and come back, verdicts unchanged); a socket matched by the service's group is recorded under the service", async () => {
  await withSandbox(WORLD, async (sb) => {
    sb.writeConfig({ ...WORLD.config, refused: { size: 64, timeoutSeconds: 600 } });
    await sb.ok("register", "svc-web", "--user", String(SVC_UID));
    await sb.ok("allow", "svc-web", "api.example.test:443");
    await sb.startDaemon();
    await sb.ok("refresh");
    const api = API4[0] as string;
    assert.is(await sb.try1(SVC_UID, "tcp", OTHER, 443), "ECONNREFUSED");
    assert.is((await refusedJson(sb)).entries.length, 1);

    sb.writeConfig({ ...WORLD.config, refused: { size: 0, timeoutSeconds: 600 } });
    await sb.ok("apply");
    const table = await sb.nft("list", "table", "inet", "egressd");
    assert.not.match(table, "refused", "no sets, no update rules");
    assert.is(await sb.try1(SVC_UID, "tcp", OTHER, 443), "ECONNREFUSED");
    assert.is(await sb.try1(SVC_UID, "tcp", api, 443), "connected");
    assert.match(await sb.ok("refused"), "the refused-destination record is off");

    sb.writeConfig({ ...WORLD.config, refused: { size: 32, timeoutSeconds: 60 } });
    await sb.ok("apply");
    assert.is(await sb.try1(SVC_UID, "tcp", OTHER, 443), "ECONNREFUSED");
    const { entries, record } = await refusedJson(sb);
    assert.equal(record, { size: 32, timeoutSeconds: 60 });
    assert.equal(
      entries.map((e) => [e.address, e.port, e.packets]),
      [[OTHER, 443, 1]],
    );
    assert.match(await sb.nft("list", "set", "inet", "egressd", "refused4"), "size 32");
    assert.is((await sb.egressctl("audit")).exitCode, 0);

    // A socket governed through the service's group (another uid) is recorded under the service.
    await sb.ok("register", "svc-grp", "--user", "2004", "--group", "2005");
    const [viaGroup] = await sb.probe(3005, [{ proto: "tcp", host: DB, port: 5432 }], 2005);
    assert.is(viaGroup?.result, "ECONNREFUSED");
    assert.equal(
      (await refusedJson(sb, "svc-grp")).entries.map((e) => [e.service, e.address, e.port]),
      [["svc-grp", DB, 5432]],
    );
  });
});

test.run();
