import { suite } from "uvu";
import * as assert from "uvu/assert";
import { eventually, withSandbox, type Sandbox } from "../helpers/sandbox.ts";
import { API4, DB, OTHER, SVC_UID, WORLD } from "./world.ts";

const test = suite("drift audit: tampering found, named, repaired");

async function applied(sb: Sandbox): Promise<void> {
  for (const args of [
    ["register", "svc-web", "--user", String(SVC_UID)],
    ["allow", "svc-web", `${DB}:5432`, "api.example.test:443"],
    ["allow-in", "svc-web", "9080", "--from", "192.0.2.0/24"],
    ["apply"],
  ]) {
    const r = await sb.egressctl(...args);
    assert.is(r.exitCode, 0, `${args.join(" ")}: ${r.stderr}`);
  }
}

/** audit, audit --repair, audit again: returns the first audit's output. */
async function findAndRepair(sb: Sandbox): Promise<string> {
  const found = await sb.egressctl("audit");
  assert.is(found.exitCode, 1, `drift must exit 1:\n${found.stdout}\n${found.stderr}`);
  const repaired = await sb.egressctl("audit", "--repair");
  assert.is(repaired.exitCode, 1, "drift was found (and repaired)");
  assert.match(repaired.stdout, "a second audit finds it in sync");
  const clean = await sb.egressctl("audit");
  assert.is(clean.exitCode, 0, clean.stdout);
  assert.match(clean.stdout, "in sync");
  return found.stdout;
}

test("right after apply the audit is clean, in text and JSON", async () => {
  await withSandbox(WORLD, async (sb) => {
    await applied(sb);
    const r = await sb.egressctl("audit");
    assert.is(r.exitCode, 0, r.stdout + r.stderr);
    const j = JSON.parse((await sb.egressctl("--json", "audit")).stdout) as {
      inSync: boolean;
      findings: unknown[];
    };
    assert.ok(j.inSync);
    assert.equal(j.findings, []);
  });
});

test("an element injected into an allowed set is a hole until repaired; the audit names the address", async () => {
  await withSandbox(WORLD, async (sb) => {
    await applied(sb);
    await sb.nft("add", "element", "inet", "egressd", "s_svc_web_lit4", `{ ${OTHER} . tcp . 443 }`);
    assert.is(await sb.try1(SVC_UID, "tcp", OTHER, 443), "connected", "the hole is real");
    const out = await findAndRepair(sb);
    assert.match(
      out,
      `! extra     element in set s_svc_web_lit4: ${OTHER} . tcp . 443  (allows traffic the policy does not)`,
    );
    const j = JSON.parse((await sb.egressctl("--json", "audit")).stdout) as { findings: unknown[] };
    assert.equal(j.findings, []);
    assert.is(await sb.try1(SVC_UID, "tcp", OTHER, 443), "ECONNREFUSED", "closed after repair");
  });
});

test("the whole table deleted: found as a missing table, repaired, enforcing again", async () => {
  await withSandbox(WORLD, async (sb) => {
    await applied(sb);
    await sb.nft("delete", "table", "inet", "egressd");
    assert.is(await sb.try1(SVC_UID, "tcp", OTHER, 443), "connected");
    const out = await findAndRepair(sb);
    assert.match(out, "! missing   table inet egressd");
    assert.is(await sb.try1(SVC_UID, "tcp", OTHER, 443), "ECONNREFUSED");
    assert.is(await sb.try1(SVC_UID, "tcp", DB, 5432), "connected");
  });
});

test("a foreign rule inserted into egressd's base chain is found and removed", async () => {
  await withSandbox(WORLD, async (sb) => {
    await applied(sb);
    await sb.nft(
      "insert",
      "rule",
      "inet",
      "egressd",
      "output",
      "meta",
      "skuid",
      String(SVC_UID),
      "accept",
    );
    assert.is(await sb.try1(SVC_UID, "tcp", OTHER, 443), "connected");
    const out = await findAndRepair(sb);
    assert.match(out, `! extra     rule in chain output: meta skuid ${SVC_UID} accept`);
    assert.is(await sb.try1(SVC_UID, "tcp", OTHER, 443), "ECONNREFUSED");
  });
});

test("a flushed set is found element by element and refilled", async () => {
  await withSandbox(WORLD, async (sb) => {
    await applied(sb);
    await sb.nft("flush", "set", "inet", "egressd", "s_svc_web_tcp443_4");
    assert.is(await sb.try1(SVC_UID, "tcp", API4[0] as string, 443), "ECONNREFUSED");
    const out = await findAndRepair(sb);
    assert.match(out, `missing   element in set s_svc_web_tcp443_4: ${API4[0]}`);
    assert.is(await sb.try1(SVC_UID, "tcp", API4[0] as string, 443), "connected");
  });
});

test("a service chain's rules flushed, and a base chain's policy changed, are found and repaired", async () => {
  await withSandbox(WORLD, async (sb) => {
    await applied(sb);
    await sb.nft("flush", "chain", "inet", "egressd", "s_svc_web");
    assert.is(await sb.try1(SVC_UID, "tcp", OTHER, 443), "connected", "nothing refuses any more");
    await sb.nftScript("chain inet egressd input { policy drop; }\n");

    const out = await findAndRepair(sb);
    assert.match(
      out,
      "! missing   rule in chain s_svc_web: meta l4proto tcp reject with tcp reset",
    );
    assert.match(
      out,
      "! changed   chain input: expected type filter hook input priority 0; policy accept, found type filter hook input priority 0; policy drop",
    );
    assert.is(await sb.try1(SVC_UID, "tcp", OTHER, 443), "ECONNREFUSED");
  });
});

test("the daemon audits on its schedule and repairs; status shows the last audit", async () => {
  await withSandbox(
    {
      ...WORLD,
      config: { resolvers: ["127.0.0.1:53"], audit: { schedule: "*/2 * * * * *", repair: true } },
    },
    async (sb) => {
      await applied(sb);
      const d = await sb.startDaemon();
      await sb.nft(
        "add",
        "element",
        "inet",
        "egressd",
        "s_svc_web_lit4",
        `{ ${OTHER} . tcp . 443 }`,
      );
      await d.waitFor((l) => l.code === "ERR_EGRESS_DRIFT", 15_000);
      await d.waitFor((l) => l.repaired !== undefined, 15_000);
      await eventually(
        async () => (await sb.try1(SVC_UID, "tcp", OTHER, 443)) === "ECONNREFUSED",
        10_000,
        "hole closed by the daemon",
      );
      const r = await sb.egressctl("audit");
      assert.is(r.exitCode, 0, r.stdout);
      const status = await sb.egressctl("status");
      assert.match(status.stdout, /last audit \S+: (in sync|1 difference\(s\), repaired)/);
    },
  );
});

test.run();
