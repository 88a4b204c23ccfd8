import {
  existsSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  symlinkSync,
  writeFileSync,
} from "node:fs";
import { join } from "node:path";
import { suite } from "uvu";
import * as assert from "uvu/assert";
import type { Batch } from "../../rules/batch.ts";
import { ROOT, withSandbox, type Sandbox } from "../helpers/sandbox.ts";

const test = suite("nftables backends: libnftables in-process, the nft program as fallback");

const FIXTURE = join(ROOT, "test/fixtures/nft-backend.ts");
const T = "egt_backend";
const t = { family: "inet", table: T };
const elem = (addr: string) => ({ concat: [addr, "tcp", 443] });
const elements = (...addrs: string[]) => ({
  element: { ...t, name: "allowed", elem: addrs.map(elem) },
});

const CREATE: Batch = {
  nftables: [
    { add: { table: { family: "inet", name: T } } },
    {
      add: {
        set: {
          ...t,
          name: "allowed",
          type: ["ipv4_addr", "inet_proto", "inet_service"],
          flags: ["interval"],
          elem: [elem("192.0.2.1")],
        },
      },
    },
    { add: { counter: { ...t, name: "c_one" } } },
  ],
};
// Passes the schema, refused by the kernel at its last command (a missing element).
const REFUSED: Batch = {
  nftables: [{ add: elements("192.0.2.2") }, { delete: elements("192.0.2.99") }],
};
const ADD3: Batch = { nftables: [{ add: elements("192.0.2.3") }] };
const OFF_SCHEMA = { nftables: [{ add: { table: { family: "inet", name: T, flags: 1 } } }] };

const OPS = [
  { op: "apply", batch: CREATE },
  { op: "apply", batch: REFUSED },
  { op: "check", batch: ADD3 },
  { op: "check", batch: REFUSED },
  { op: "apply", batch: OFF_SCHEMA },
  { op: "listTable", table: T },
  { op: "listCounters", table: T },
  { op: "listTable", table: "egt_none" },
  { op: "listCounters", table: "egt_none" },
  { op: "listSet", table: T, set: "allowed" },
  { op: "listSet", table: T, set: "no_such_set" },
];

interface Out {
  backend: string;
  detail: string;
  results: {
    ok: boolean;
    value?: unknown;
    error?: { code: string; exitCode: number; message: string; details?: Record<string, unknown> };
  }[];
}

/** Runs the adapter in the namespace with exactly `env` on top of a clean one. */
async function adapter(sb: Sandbox, ops: unknown[], env: Record<string, string> = {}) {
  const r = await sb.exec("env", [
    "-u",
    "EGRESSD_NFT",
    "-u",
    "EGRESSD_LIBNFTABLES",
    `TMPDIR=${join(sb.dir, "tmp")}`,
    ...Object.entries(env).map(([k, v]) => `${k}=${v}`),
    process.execPath,
    "--import",
    "tsx",
    FIXTURE,
    JSON.stringify(ops),
  ]);
  assert.is(r.exitCode, 0, r.stderr);
  return JSON.parse(r.stdout) as Out;
}

const setElements = async (sb: Sandbox) => {
  const listing = await sb.nftJson("list", "set", "inet", T, "allowed");
  const set = listing.nftables.find((o) => o.set)?.set as { elem?: unknown[] };
  return JSON.stringify(set.elem ?? []);
};

/** The same outcome from either backend, op by op. */
async function assertOutcome(sb: Sandbox, out: Out) {
  const [
    create,
    refused,
    check,
    checkRefused,
    offSchema,
    table,
    counters,
    none,
    noCounters,
    oneSet,
    noSet,
  ] = out.results;
  assert.ok(create?.ok, JSON.stringify(create));
  assert.not.ok(refused?.ok, "a batch deleting a missing element fails");
  assert.is(refused?.error?.code, "ERR_EGRESS_NFT_FAILED");
  assert.is(refused?.error?.exitCode, 3);
  assert.match(String(refused?.error?.details?.stderr), "No such file or directory");
  assert.ok(check?.ok, JSON.stringify(check));
  assert.is(checkRefused?.error?.code, "ERR_EGRESS_NFT_FAILED");
  assert.is(offSchema?.error?.code, "ERR_EGRESS_NFT_SCHEMA", "validated before the kernel sees it");
  assert.is(offSchema?.error?.exitCode, 4);
  const objs = (table?.value as { nftables: Record<string, { name?: string }>[] }).nftables;
  assert.ok(
    objs.some((o) => o.set?.name === "allowed"),
    "listing has the set",
  );
  assert.equal(counters?.value, { c_one: { packets: 0, bytes: 0 } });
  assert.equal(none, { ok: true, value: null }, "a missing table lists as null");
  assert.equal(noCounters, { ok: true, value: {} });
  const listed = (oneSet?.value as { nftables: Record<string, { name?: string }>[] }).nftables;
  assert.equal(
    listed.filter((o) => o.set).map((o) => o.set?.name),
    ["allowed"],
    "list set: that one set",
  );
  assert.equal(noSet, { ok: true, value: null }, "a missing set lists as null");
  // All or nothing: neither the refused batch's add nor the checked add is in the kernel.
  const only = await setElements(sb);
  assert.match(only, "192.0.2.1");
  assert.not.match(only, "192.0.2.2");
  assert.not.match(only, "192.0.2.3");
}

test("libnftables applies, checks and lists in-process, with no nft program on PATH, and says so", async () => {
  await withSandbox({}, async (sb) => {
    const out = await adapter(sb, OPS, { PATH: "/nonexistent" });
    assert.is(out.backend, "libnftables");
    assert.match(
      out.detail,
      /libnftables \(libnftables\.so\.1, in-process through koffi [0-9.]+\)/,
    );
    await assertOutcome(sb, out);
    assert.match(
      String(out.results[1]?.error?.details?.command),
      "libnftables: apply batch of 2 commands",
    );
  });
});

test("concurrent applies through one libnftables adapter all land", async () => {
  await withSandbox({}, async (sb) => {
    // Eight batches of 250 elements each, sent at once.
    const batches = Array.from({ length: 8 }, (_, b) => ({
      nftables: [{ add: elements(...Array.from({ length: 250 }, (_, i) => `10.${b}.${i}.1`)) }],
    }));
    const out = await adapter(sb, [
      { op: "apply", batch: CREATE },
      { op: "applyAll", batches },
    ]);
    assert.is(out.backend, "libnftables");
    assert.equal(out.results[1], { ok: true, value: null });
    const live = await setElements(sb);
    for (let b = 0; b < 8; b++) for (const i of [0, 249]) assert.match(live, `"10.${b}.${i}.1"`);
  });
});

test("when libnftables cannot be loaded the nft program does the same work, and that is the reported backend", async () => {
  await withSandbox({}, async (sb) => {
    const bad = { EGRESSD_LIBNFTABLES: "/nonexistent/libnftables.so.1" };
    const out = await adapter(sb, OPS, bad);
    assert.is(out.backend, "nft");
    assert.match(out.detail, "libnftables not loaded", out.detail);
    assert.match(out.detail, "/nonexistent/libnftables.so.1");
    await assertOutcome(sb, out);
    assert.match(String(out.results[1]?.error?.details?.command), "nft -j -f /dev/stdin");
    // It really runs the program: without one on PATH, nothing can be applied.
    const none = await adapter(sb, [{ op: "apply", batch: ADD3 }], {
      ...bad,
      PATH: "/nonexistent",
    });
    assert.is(none.results[0]?.error?.code, "ERR_EGRESS_NFT_MISSING");
    assert.equal(readdirSync(join(sb.dir, "tmp", "egressd-0")), [], "no batch file left behind");
  });
});

test("EGRESSD_NFT forces the nft program, every call through it", async () => {
  await withSandbox({}, async (sb) => {
    const calls = join(sb.dir, "nft-calls");
    const wrapper = join(sb.dir, "nft-counting");
    writeFileSync(wrapper, `#!/bin/sh\necho "$*" >> ${calls}\nexec nft "$@"\n`, { mode: 0o755 });
    const out = await adapter(sb, OPS, { EGRESSD_NFT: wrapper });
    assert.is(out.backend, "nft");
    assert.match(out.detail, "forced by EGRESSD_NFT");
    await assertOutcome(sb, out);
    const lines = readFileSync(calls, "utf8").trim().split("\n");
    assert.is(lines.length, OPS.length - 1, "one call per op but the one refused by the schema");
  });
});

test("the nft program's batch files: a planted symlink is refused, and a killed apply leaves no file", async () => {
  await withSandbox({}, async (sb) => {
    const planted = join(sb.dir, "planted");
    mkdirSync(join(planted, "tmp"), { recursive: true });
    symlinkSync(sb.dir, join(planted, "tmp", "egressd-0"));
    const out = await adapter(sb, [{ op: "apply", batch: CREATE }], {
      EGRESSD_NFT: "nft",
      TMPDIR: join(planted, "tmp"),
    });
    assert.is(out.results[0]?.error?.code, "ERR_EGRESS_TEMP_DIR");
    assert.is(out.results[0]?.error?.exitCode, 3);
    assert.match(String(out.results[0]?.error?.message), "symbolic link");
    assert.is(await setElements(sb).catch(() => "no table"), "no table", "nothing applied");

    // An apply killed while nft runs: the wrapper says who its parent is, then waits.
    const pids = join(sb.dir, "pids");
    const slow = join(sb.dir, "nft-slow");
    writeFileSync(slow, `#!/bin/sh\necho "$PPID $$" > ${pids}\nexec sleep 60\n`, {
      mode: 0o755,
    });
    const running = adapter(sb, [{ op: "apply", batch: CREATE }], { EGRESSD_NFT: slow }).catch(
      (err: unknown) => err,
    );
    const deadline = Date.now() + 20_000;
    while (!existsSync(pids) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    const [parent, wrapperPid] = readFileSync(pids, "utf8").trim().split(" ").map(Number);
    process.kill(parent as number, "SIGKILL");
    process.kill(wrapperPid as number, "SIGKILL");
    await running;
    assert.equal(
      readdirSync(join(sb.dir, "tmp", "egressd-0")),
      [],
      "nothing left by the killed apply",
    );
  });
});

test.run();
