import { chownSync, mkdirSync, readFileSync, statSync, writeFileSync } from "node:fs";

import { createConnection } from "node:net";
import { join } from "node:path";
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { eventually, withSandbox, type Records, type Sandbox } from "../helpers/sandbox.ts";
import { API4, DB, OTHER, SVC_UID, WORLD } from "./world.ts";

const test = suite("egressd daemon: refresh, fail-static, restarts, control socket");

const [X, Y] = API4 as [string, string];
const FAST = {
  resolvers: ["127.0.0.1:53"],
  refresh: { minTtlSeconds: 1, maxTtlSeconds: 30, graceSeconds: 2 },
};
const rotating = (addresses: string[], ttl = 1): Records => ({
  ...WORLD.records,
  "rot.example.test": { A: addresses, ttl },
});

const reaches =
  (sb: Sandbox, host: string, port = 443) =>
  async () =>
    (await sb.try1(SVC_UID, "tcp", host, port)) === "connected";
const refused =
  (sb: Sandbox, host: string, port = 443) =>
  async () =>
    (await sb.try1(SVC_UID, "tcp", host, port)) === "ECONNREFUSED";

test("a CLI change is enforced when the command returns; a new address is picked up within its TTL; the old one goes after the grace period", async () => {
  await withSandbox({ ...WORLD, records: rotating([X]), config: FAST }, async (sb) => {
    await sb.ok("register", "svc-web", "--user", String(SVC_UID));
    const d = await sb.startDaemon();
    const out = await sb.ok("allow", "svc-web", "rot.example.test:443");
    assert.match(out, "applied by egressd");
    assert.is(await sb.try1(SVC_UID, "tcp", X, 443), "connected", "enforced when allow returned");
    assert.is(await sb.try1(SVC_UID, "tcp", Y, 443), "ECONNREFUSED");

    sb.setRecords(rotating([Y]));
    await eventually(reaches(sb, Y), 15_000, `${Y} allowed after the DNS change`);
    await d.waitFor(
      (l) =>
        l.name === "rot.example.test" && (l.added as string[] | undefined)?.includes(Y) === true,
    );
    await eventually(refused(sb, X), 15_000, `${X} refused after its grace period`);
    const gone = await d.waitFor(
      (l) =>
        l.name === "rot.example.test" && (l.removed as string[] | undefined)?.includes(X) === true,
    );
    assert.equal(gone.services, ["svc-web"], "the change log names the service");
    assert.is(await sb.try1(SVC_UID, "tcp", Y, 443), "connected");
  });
});

test("during a DNS outage the last-known addresses keep working", async () => {
  await withSandbox({ ...WORLD, records: rotating([X]), config: FAST }, async (sb) => {
    await sb.ok("register", "svc-web", "--user", String(SVC_UID));
    await sb.ok("allow", "svc-web", "rot.example.test:443");
    const d = await sb.startDaemon();
    await eventually(reaches(sb, X), 10_000, "allowed before the outage");
    sb.setRecords({ "rot.example.test": { rcode: "SERVFAIL" } });
    await d.waitFor((l) => l.dns === "SERVFAIL");
    sb.setRecords({ "rot.example.test": { rcode: "DROP" } });
    await d.waitFor((l) => l.dns === "TIMEOUT", 30_000);
    // Well past TTL (1 s) + grace (2 s), with every query failing: still allowed.
    assert.is(await sb.try1(SVC_UID, "tcp", X, 443), "connected");
    const status = JSON.parse((await sb.egressctl("--json", "status", "svc-web")).stdout) as {
      services: {
        names: {
          addresses: { address: string }[];
          A: { lastError: { code: string } | null };
        }[];
      }[];
    };
    const name = status.services[0]?.names[0];
    assert.equal(
      name?.addresses.map((a) => a.address),
      [X],
    );
    assert.ok(
      ["TIMEOUT", "SERVFAIL"].includes(name?.A.lastError?.code ?? ""),
      JSON.stringify(name),
    );
  });
});

test("NXDOMAIN removes a name's addresses once the grace period is over", async () => {
  await withSandbox({ ...WORLD, records: rotating([X]), config: FAST }, async (sb) => {
    await sb.ok("register", "svc-web", "--user", String(SVC_UID));
    await sb.ok("allow", "svc-web", "rot.example.test:443");
    await sb.startDaemon();
    await eventually(reaches(sb, X), 10_000, "allowed at first");
    sb.setRecords({});
    await eventually(refused(sb, X), 15_000, "refused after NXDOMAIN and grace");
  });
});

test("after SIGKILL the kernel keeps enforcing; a restart with DNS down enforces from saved state before any DNS query", async () => {
  await withSandbox({ ...WORLD, records: rotating([X], 60), config: FAST }, async (sb) => {
    await sb.ok("register", "svc-web", "--user", String(SVC_UID));
    await sb.ok("allow", "svc-web", "rot.example.test:443");
    const first = await sb.startDaemon();
    await eventually(reaches(sb, X), 10_000, "allowed while running");
    await first.stop("SIGKILL");
    assert.is(await sb.try1(SVC_UID, "tcp", X, 443), "connected", "still allowed after SIGKILL");
    assert.is(
      await sb.try1(SVC_UID, "tcp", OTHER, 443),
      "ECONNREFUSED",
      "still refused after SIGKILL",
    );

    // A reboot: the kernel forgets the table, and DNS does not answer at all.
    await sb.nft("delete", "table", "inet", "egressd");
    sb.setRecords({ "rot.example.test": { rcode: "DROP" } });
    const second = await sb.startDaemon();
    const applied = second.lines.findIndex(
      (l) => l.msg === "applied from saved state, before any DNS query",
    );
    assert.ok(applied >= 0, "applied from saved state");
    const firstDns = second.lines.findIndex((l) => l.code === "ERR_EGRESS_DNS");
    assert.ok(
      firstDns === -1 || firstDns > applied,
      "no DNS result before the saved state was applied",
    );
    assert.is(await sb.try1(SVC_UID, "tcp", X, 443), "connected");
    assert.is(await sb.try1(SVC_UID, "tcp", OTHER, 443), "ECONNREFUSED");

    assert.is(await second.stop("SIGTERM"), 0, "SIGTERM exits 0");
    assert.is(
      await sb.try1(SVC_UID, "tcp", OTHER, 443),
      "ECONNREFUSED",
      "the ruleset stays after SIGTERM",
    );
  });
});

/** Sends raw bytes to the control socket and returns the reply. */
function raw(socket: string, data: string): Promise<string> {
  return new Promise((resolve) => {
    const s = createConnection(socket);
    let buf = "";
    s.setEncoding("utf8");
    s.on("connect", () => s.write(data));
    s.on("data", (d: string) => (buf += d));
    s.on("close", () => resolve(buf));
    s.on("error", () => resolve(buf));
  });
}

test("malformed and oversized control requests get error replies and the daemon keeps serving", async () => {
  await withSandbox({ ...WORLD, config: FAST }, async (sb) => {
    await sb.ok("register", "svc-web", "--user", String(SVC_UID));
    const d = await sb.startDaemon();
    assert.match(await raw(sb.socket, "this is not json\n"), '"ERR_EGRESS_BAD_REQUEST"');
    assert.match(
      await raw(sb.socket, '{"op":"format-disk"}\n'),
      'unknown control operation \\"format-disk\\"',
    );
    assert.match(await raw(sb.socket, '{"op":"status","service":42}\n'), "must be a string");
    assert.match(await raw(sb.socket, "x".repeat(200_000)), "larger than 65536 bytes");
    assert.match(await raw(sb.socket, '{"op":"status","evil":true}\n'), 'unknown key \\"evil\\"');
    const r = await sb.egressctl("status");
    assert.is(r.exitCode, 0, r.stderr);
    assert.match(r.stdout, "svc-web  uid 2001");
    assert.is(d.child.exitCode, null, "still running");
  });
});

test("a broken policy file leaves the previous policy enforced, and says so", async () => {
  await withSandbox({ ...WORLD, config: FAST }, async (sb) => {
    await sb.ok("register", "svc-web", "--user", String(SVC_UID));
    await sb.ok("allow", "svc-web", `${DB}:5432`);
    const d = await sb.startDaemon();
    assert.is(await sb.try1(SVC_UID, "tcp", DB, 5432), "connected");
    const file = sb.servicesFile("svc-web");
    writeFileSync(file, readFileSync(file, "utf8").replace('"mode"', '"mdoe"'));
    const r = await sb.egressctl("apply");
    assert.is(r.exitCode, 2);
    assert.match(r.stderr, `${file}: $.mdoe: unknown key "mdoe"`);
    d.child.kill("SIGHUP");
    await d.waitFor((l) => typeof l.msg === "string" && l.msg.startsWith("policy not loaded"));
    assert.is(
      await sb.try1(SVC_UID, "tcp", DB, 5432),
      "connected",
      "previous policy still enforced",
    );
    assert.is(await sb.try1(SVC_UID, "tcp", OTHER, 443), "ECONNREFUSED");
    const status = await sb.egressctl("status");
    assert.match(status.stdout, "policy on disk NOT applied");
    assert.match(status.stdout, "$.mdoe");
  });
});

test("a refresh that changes nothing makes no nft call; one that changes something makes exactly one", async () => {
  await withSandbox({ ...WORLD, records: rotating([X], 3600), config: FAST }, async (sb) => {
    const calls = join(sb.dir, "nft-calls");
    const wrapper = join(sb.dir, "nft-counting");
    writeFileSync(wrapper, `#!/bin/sh\necho "$*" >> ${calls}\nexec nft "$@"\n`, { mode: 0o755 });
    const count = () => readFileSync(calls, "utf8").trim().split("\n").length;
    await sb.ok("register", "svc-web", "--user", String(SVC_UID));
    await sb.ok("allow", "svc-web", "rot.example.test:443");
    const d = await sb.startDaemon({ EGRESSD_NFT: wrapper });
    await eventually(reaches(sb, X), 10_000, "allowed");
    const before = count();
    assert.match(await sb.ok("refresh"), "no change");
    assert.match(await sb.ok("refresh", "svc-web"), "no change");
    assert.is(count(), before, "no nft call for a refresh that changed nothing");

    sb.setRecords(rotating([X, Y], 3600));
    assert.match(await sb.ok("refresh"), "set element(s) changed");
    assert.is(count(), before + 1, "one transaction for the change");
    const last = readFileSync(calls, "utf8").trim().split("\n").pop() ?? "";
    assert.match(last, "-j -f");
    await d.waitFor((l) => l.msg === "sets updated");
    assert.is(await sb.try1(SVC_UID, "tcp", Y, 443), "connected");
  });
});

test("egressd runs as an unprivileged user with only CAP_NET_ADMIN, as its systemd unit runs it", async () => {
  await withSandbox({ ...WORLD, records: rotating([X], 60), config: FAST }, async (sb) => {
    const DAEMON_UID = 64_999;
    await sb.ok("register", "svc-web", "--user", String(SVC_UID));
    mkdirSync(sb.stateDir, { recursive: true });
    chownSync(sb.stateDir, DAEMON_UID, DAEMON_UID);
    chownSync(sb.dir, DAEMON_UID, DAEMON_UID); // where its socket goes (systemd's RuntimeDirectory=)
    // A one-shot apply by root first: the state it saves must stay readable by the daemon's user.
    await sb.ok("allow", "svc-web", `${DB}:5432`);
    await sb.ok("apply");
    assert.is(
      statSync(join(sb.stateDir, "state.json")).uid,
      DAEMON_UID,
      "root's one-shot apply keeps the state dir owner's file",
    );
    const d = await sb.startDaemon({}, DAEMON_UID);
    await d.waitFor((l) => l.msg === "applied from saved state, before any DNS query");

    assert.match(await sb.ok("allow", "svc-web", "rot.example.test:443"), "applied by egressd");
    assert.is(await sb.try1(SVC_UID, "tcp", X, 443), "connected");
    assert.is(await sb.try1(SVC_UID, "tcp", OTHER, 443), "ECONNREFUSED");
    sb.setRecords(rotating([X, Y], 60));
    assert.match(await sb.ok("refresh"), "set element(s) changed");
    assert.is(await sb.try1(SVC_UID, "tcp", Y, 443), "connected");
    const state = statSync(join(sb.stateDir, "state.json"));
    assert.is(state.uid, DAEMON_UID, "state written by the service user");
    assert.is(d.child.exitCode, null);
  });
});

test.run();
