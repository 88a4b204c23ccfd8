/**
 * The daemon's life: one per state dir, what it answers while starting, when it tells systemd
 * it is ready, signals during start-up, hand edits of the policy files, and changes of one
 * service that leave the others' objects (and counters) alone.
 */
import { spawn } from "node:child_process";
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { EGRESSD, eventually, withSandbox, type Sandbox } from "../helpers/sandbox.ts";
import { API4, AUDIT_UID, DB, OTHER, SVC_UID, WORLD } from "./world.ts";

const test = suite("daemon lifecycle: one writer, readiness, hand edits, per-service changes");

const [X] = API4 as [string];
const CONFIG = { resolvers: ["127.0.0.1:53"] };
const W = { ...WORLD, config: CONFIG };

/** An nft program that sleeps before applying a batch: a start-up that takes a while. */
function slowNft(sb: Sandbox, seconds: number): string {
  const file = join(sb.dir, "nft-slow");
  writeFileSync(
    file,
    `#!/bin/sh\ncase "$*" in *-j\\ -f*) [ -e ${sb.dir}/fast ] || sleep ${seconds};; esac\nexec nft "$@"\n`,
    { mode: 0o755 },
  );
  return file;
}

const tableText = (sb: Sandbox) => sb.nft("list", "table", "inet", "egressd");

test("a second egressd on the same state dir exits 3 naming the first, and changes nothing", async () => {
  await withSandbox(W, async (sb) => {
    await sb.ok("register", "svc-web", "--user", String(SVC_UID), "--dns", "system");
    await sb.ok("allow", "svc-web", `${DB}:5432`);
    const first = await sb.startDaemon();
    const before = await tableText(sb);
    const second = await sb.exec(process.execPath, [
      EGRESSD,
      ...sb.pathFlags,
      // Its own socket: only the state dir is shared, which is what the lock guards.
      "--socket",
      join(sb.dir, "second.sock"),
    ]);
    assert.is(second.exitCode, 3, second.stdout + second.stderr);
    assert.match(second.stdout + second.stderr, `pid ${first.child.pid}`);
    assert.match(second.stdout + second.stderr, "ERR_EGRESS_RUNNING");
    assert.is(await tableText(sb), before, "the table is untouched");
    assert.is(first.child.exitCode, null, "the first keeps running");
    assert.is(await sb.try1(SVC_UID, "tcp", DB, 5432), "connected");
  });
});

test("while it starts, status answers (starting), a change waits for the start, and a SIGHUP is a reload after it", async () => {
  await withSandbox(W, async (sb) => {
    await sb.ok("register", "svc-web", "--user", String(SVC_UID), "--dns", "system");
    const d = await sb.startDaemon({ EGRESSD_NFT: slowNft(sb, 3) }, undefined, "socket");
    const st = await sb.ok("status");
    assert.match(st, "starting: applying the saved ruleset");
    // A change sent now is applied after the start; a SIGHUP now is a reload queued after it.
    const change = sb.egressctl("allow", "svc-web", `${DB}:5432`);
    await new Promise((r) => setTimeout(r, 300));
    d.child.kill("SIGHUP");
    writeFileSync(join(sb.dir, "fast"), "");
    const r = await change;
    assert.is(r.exitCode, 0, r.stderr);
    assert.match(r.stdout, "applied by egressd");
    assert.is(await sb.try1(SVC_UID, "tcp", DB, 5432), "connected");
    await d.waitFor((l) => l.msg === "ready");
    await d.waitFor((l) => l.msg === "SIGHUP: reloading config and policy");
    await eventually(
      async () => !(await sb.ok("status")).includes("starting:"),
      10_000,
      "start-up over",
    );
    assert.is(d.child.exitCode, null, "a SIGHUP during start-up does not end the daemon");
    assert.is(await sb.try1(SVC_UID, "tcp", OTHER, 443), "ECONNREFUSED");
  });
});

test("READY=1 reaches $NOTIFY_SOCKET only once the table is in the kernel", async () => {
  await withSandbox(W, async (sb) => {
    await sb.ok("register", "svc-web", "--user", String(SVC_UID), "--dns", "system");
    await sb.ok("allow", "svc-web", `${DB}:5432`);
    const sock = join(sb.dir, "notify.sock");
    // systemd's side: a datagram socket; on each message, whether the table exists right then.
    const listener = spawn(
      "ip",
      [
        "netns",
        "exec",
        sb.ns,
        "python3",
        "-c",
        `import socket, subprocess, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
print("listening", flush=True)
while True:
    m = s.recv(4096).decode()
    t = subprocess.run(["nft", "list", "table", "inet", "egressd"], capture_output=True).returncode == 0
    print(repr(m), "table" if t else "no-table", flush=True)
    if "READY=1" in m: break`,
        sock,
      ],
      { stdio: ["ignore", "pipe", "inherit"] },
    );
    let out = "";
    listener.stdout.setEncoding("utf8");
    listener.stdout.on("data", (c: string) => (out += c));
    try {
      await eventually(async () => out.includes("listening"), 10_000, "listener up");
      await sb.startDaemon({ NOTIFY_SOCKET: sock, EGRESSD_NFT: slowNft(sb, 1) });
      await eventually(async () => out.includes("READY=1"), 10_000, `READY=1; got ${out}`);
      const ready = out.split("\n").find((l) => l.includes("READY=1")) ?? "";
      assert.match(ready, " table", out);
      assert.not.match(ready, "no-table", out);
      assert.match(ready, "STATUS=");
    } finally {
      listener.kill();
    }
  });
});

test("egressd --once and egressctl apply go through a running daemon instead of writing beside it", async () => {
  await withSandbox(W, async (sb) => {
    await sb.ok("register", "svc-web", "--user", String(SVC_UID), "--dns", "system");
    const d = await sb.startDaemon();
    // Behind the daemon's back (no egressctl): a new allowance in the file.
    const file = join(sb.configDir, "services.d", "svc-web.json");
    const p = JSON.parse(readFileSync(file, "utf8")) as { outbound: unknown[] };
    p.outbound.push({ host: DB, ports: "5432" });
    writeFileSync(file, JSON.stringify(p));
    const once = await sb.exec(process.execPath, [EGRESSD, ...sb.pathFlags, "--once"]);
    assert.is(once.exitCode, 0, once.stdout + once.stderr);
    assert.match(once.stdout, "applied by the running egressd");
    assert.is(await sb.try1(SVC_UID, "tcp", DB, 5432), "connected");
    assert.match(await sb.ok("apply"), "egressd");
    assert.is(d.child.exitCode, null);

    // Its control socket gone (removed by hand): the one-shot paths find the daemon's lock and
    // refuse, exit 3 naming its pid, before touching the kernel.
    const table = await sb.nft("-a", "list", "table", "inet", "egressd");
    rmSync(sb.socket);
    const refused = await sb.egressctl("--json", "apply");
    assert.is(refused.exitCode, 3, refused.stdout + refused.stderr);
    const err = JSON.parse(refused.stdout) as { error: { code: string; message: string } };
    assert.is(err.error.code, "ERR_EGRESS_RUNNING");
    assert.match(err.error.message, `egressd (pid ${d.child.pid}) is running`);
    const once2 = await sb.exec(process.execPath, [EGRESSD, ...sb.pathFlags, "--once"]);
    assert.is(once2.exitCode, 3, once2.stdout + once2.stderr);
    assert.match(once2.stderr + once2.stdout, "ERR_EGRESS_RUNNING");
    assert.is(await sb.nft("-a", "list", "table", "inet", "egressd"), table, "nothing changed");
    assert.is(d.child.exitCode, null, "the daemon runs on");
  });
});

/** The error fields of `egressctl --json status`. */
interface StatusErrors {
  daemon: { lastError: unknown; policyError: unknown; policyErrors: unknown[] };
}

test("a hand edit is enforced within seconds; a broken one is kept out, named in status and audit, until fixed", async () => {
  await withSandbox(W, async (sb) => {
    await sb.ok("register", "svc-web", "--user", String(SVC_UID), "--dns", "system");
    const d = await sb.startDaemon();
    const file = join(sb.configDir, "services.d", "svc-web.json");
    const good = JSON.parse(readFileSync(file, "utf8")) as { outbound: unknown[] };
    good.outbound.push({ host: DB, ports: "5432" });
    writeFileSync(file, JSON.stringify(good, null, 2));
    await eventually(
      async () => (await sb.try1(SVC_UID, "tcp", DB, 5432)) === "connected",
      10_000,
      "the edit is enforced",
    );
    // Broken: a port out of range, and an allowance that must not take effect.
    const broken = structuredClone(good);
    broken.outbound.push({ host: X, ports: "443" }, { host: OTHER, ports: "70000" });
    writeFileSync(file, JSON.stringify(broken, null, 2));
    await d.waitFor((l) => String(l.msg).startsWith("policy not loaded"));
    const st = await sb.ok("status");
    assert.match(st, "policy on disk NOT applied");
    assert.match(st, "svc-web.json");
    assert.match(st, "70000");
    const brokenJson = JSON.parse(await sb.ok("--json", "status")) as StatusErrors;
    assert.ok(brokenJson.daemon.policyErrors.length, "the JSON names the broken file too");
    assert.ok(brokenJson.daemon.policyError);
    assert.is(await sb.try1(SVC_UID, "tcp", X, 443), "ECONNREFUSED", "nothing of the broken file");
    assert.is(await sb.try1(SVC_UID, "tcp", DB, 5432), "connected", "the last good policy");
    const audit = await sb.egressctl("--json", "audit");
    const found = JSON.parse(audit.stdout) as { findings: { kind: string; object: string }[] };
    assert.ok(
      found.findings.some((f) => f.kind === "policy-unapplied" && f.object.includes("svc-web")),
      audit.stdout,
    );
    // Fixed: applied, and the complaint is gone.
    broken.outbound.pop();
    writeFileSync(file, JSON.stringify(broken, null, 2));
    await eventually(
      async () => (await sb.try1(SVC_UID, "tcp", X, 443)) === "connected",
      10_000,
      "the fixed file is enforced",
    );
    await eventually(
      async () => !(await sb.ok("status")).includes("NOT applied"),
      10_000,
      "status clears",
    );
    // Cleared for good: no error line of any kind, in the text or in the JSON.
    const text = await sb.ok("status");
    assert.not.match(text, /last error/i, text);
    assert.not.match(text, /NOT applied|70000|still enforcing the last good policy/, text);
    const json = JSON.parse(await sb.ok("--json", "status")) as StatusErrors;
    assert.is(json.daemon.lastError, null, JSON.stringify(json.daemon.lastError));
    assert.is(json.daemon.policyError, null, JSON.stringify(json.daemon.policyError));
    assert.equal(json.daemon.policyErrors, []);
    const clean = JSON.parse((await sb.egressctl("--json", "audit")).stdout) as {
      findings: unknown[];
    };
    assert.equal(clean.findings, []);
  });
});

test("changing one service leaves the other services' objects alone: their counters keep counting from where they were", async () => {
  await withSandbox(W, async (sb) => {
    await sb.ok("register", "svc-a", "--user", String(SVC_UID), "--dns", "system");
    await sb.ok("register", "svc-b", "--user", String(AUDIT_UID), "--dns", "system");
    await sb.startDaemon();
    for (let i = 0; i < 3; i++)
      assert.is(await sb.try1(AUDIT_UID, "tcp", OTHER, 443), "ECONNREFUSED");
    const refusedOf = async (svc: string) => {
      const st = JSON.parse(await sb.ok("--json", "status", svc)) as {
        services: { refused: { packets: number } }[];
      };
      return st.services[0]?.refused.packets ?? -1;
    };
    const b = await refusedOf("svc-b");
    assert.ok(b >= 3, `svc-b refused ${b} packets`);
    const handleOf = async (chain: string) =>
      /handle (\d+)/.exec(await sb.nft("-a", "list", "chain", "inet", "egressd", chain))?.[1];
    const chainB = await sb.nft("-a", "list", "chain", "inet", "egressd", "s_svc_b");
    assert.match(await sb.ok("allow", "svc-a", `${DB}:5432`), "applied by egressd");
    assert.match(await sb.ok("revoke", "svc-a", `${DB}:5432`), "applied by egressd");
    assert.match(await sb.ok("allow", "svc-a", `${DB}:5432`), "applied by egressd");
    assert.is(await refusedOf("svc-b"), b, "svc-b's counter is not reset");
    assert.is(
      await sb.nft("-a", "list", "chain", "inet", "egressd", "s_svc_b"),
      chainB,
      "svc-b's chain is the same chain (same handles)",
    );
    assert.ok(await handleOf("s_svc_a"));
    assert.is(await sb.try1(SVC_UID, "tcp", DB, 5432), "connected");
  });
});

test.run();
