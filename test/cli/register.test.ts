import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { suite } from "uvu";
import * as assert from "uvu/assert";
import type { Nft } from "../../agent/nft/nft.exec.ts";
import type { Sockets } from "../../agent/sockets.sys.ts";
import { PolicyStore } from "../../agent/store/policy-store.fs.ts";
import { StateStore } from "../../agent/store/state.fs.ts";
import { systemUsers } from "../../agent/users.sys.ts";
import { main } from "../../cli/program.ts";
import type { Listener } from "../../rules/listeners.ts";

const test = suite("egressctl register: never root, never a silent cut of a running server");

let dir = "";
/** The fake socket table: what each uid listens on. */
let listening: Listener[] = [];

const sockets: Sockets = {
  listeners: async (uid) => listening.filter((l) => l.uid === uid),
};
const nft: Nft = {
  backend: "nft",
  detail: "a fake: CLI tests send nothing to the kernel",
  apply: () => Promise.reject(new Error("no nft in CLI tests")),
  check: () => Promise.reject(new Error("no nft in CLI tests")),
  listTable: () => Promise.reject(new Error("no nft in CLI tests")),
  listSet: () => Promise.reject(new Error("no nft in CLI tests")),
  listCounters: () => Promise.reject(new Error("no nft in CLI tests")),
};

/** egressctl in-process with the fake socket table: argv in, stdout/stderr/exit code out. */
async function run(...args: string[]) {
  let stdout = "";
  let stderr = "";
  const exitCode = await main(
    ["--config-dir", dir, ...args],
    { stdout: (s) => void (stdout += s), stderr: (s) => void (stderr += s) },
    () => ({
      store: new PolicyStore(dir),
      state: new StateStore(join(dir, "state")),
      nft,
      users: systemUsers(),
      sockets,
      daemon: () => Promise.resolve(null),
    }),
  );
  return { exitCode, stdout, stderr };
}

const tcp = (port: number, uid = 2001, address = "::"): Listener => ({
  protocol: "tcp",
  family: address.includes(":") ? 6 : 4,
  address,
  port,
  uid,
});
const udp = (port: number, uid = 2001, address = "203.0.113.1"): Listener => ({
  ...tcp(port, uid, address),
  protocol: "udp",
});

const files = () =>
  existsSync(join(dir, "services.d"))
    ? readdirSync(join(dir, "services.d")).filter((f) => f.endsWith(".json"))
    : [];

test.before.each(() => {
  dir = mkdtempSync(join(tmpdir(), "egressctl-register-"));
  listening = [];
});
test.after.each(() => rmSync(dir, { recursive: true, force: true }));

const ROOT_REASON =
  "root can remove any firewall, so confining it protects nothing, and refusing its traffic breaks the host (sshd, package updates, egressd itself)";

for (const [args, shown] of [
  [["--user", "root"], "user root (uid 0)"],
  [["--user", "0"], "user 0 (uid 0)"],
  [["--user", "2001", "--group", "root"], "group root (gid 0)"],
  [["--user", "2001", "--group", "0"], "group 0 (gid 0)"],
] as const) {
  test(`register ${args.join(" ")} is refused with the reason, exit 2, nothing written`, async () => {
    const r = await run("register", "svc-root", ...args);
    assert.is(r.exitCode, 2, r.stderr);
    assert.is(
      r.stderr,
      `egressctl: refusing to register svc-root as ${shown}: ${ROOT_REASON}\nhint: run the service as its own unprivileged user: egressctl register svc-root --user svc-root --create-user\n`,
    );
    assert.equal(files(), []);
  });
}

test("a uid with a listener on an undeclared port is refused without --force, with the list and the way out", async () => {
  listening = [tcp(9082), udp(6354), tcp(9082, 2001, "127.0.0.1"), tcp(22, 0)];
  const r = await run("register", "svc-web", "--user", "2001");
  assert.is(r.exitCode, 2, r.stderr);
  assert.is(
    r.stderr,
    "egressctl: uid 2001 listens on ports svc-web does not declare: 6354/udp (on 203.0.113.1), 9082/tcp (on [::]); once svc-web is enforced they stop accepting new connections\n" +
      "hint: register in audit mode first (egressctl register svc-web --user 2001 --mode audit), declare them (egressctl allow-in svc-web 6354/udp; egressctl allow-in svc-web 9082/tcp), then register again without --mode audit; or add --force to register anyway\n",
  );
  assert.equal(files(), []);
});

test("--force registers anyway and warns with the list", async () => {
  listening = [tcp(9082)];
  const r = await run("register", "svc-web", "--user", "2001", "--force");
  assert.is(r.exitCode, 0, r.stderr);
  assert.match(r.stdout, "registered svc-web: user 2001 (uid 2001), mode enforce");
  assert.match(
    r.stderr,
    "warning: uid 2001 listens on ports svc-web does not declare: 9082/tcp (on [::]); once svc-web is enforced they stop accepting new connections (registered anyway: --force)",
  );
  assert.equal(files(), ["svc-web.json"]);
});

test("audit mode, allow-in, then enforce: the way to register a running server without --force", async () => {
  listening = [tcp(9082)];
  let r = await run("register", "svc-web", "--user", "2001", "--mode", "audit");
  assert.is(r.exitCode, 0, r.stderr);
  assert.match(r.stderr, "declare them with allow-in before switching to enforce mode");
  r = await run("register", "svc-web", "--user", "2001");
  assert.is(r.exitCode, 2, "still undeclared");
  assert.match(r.stderr, "hint: declare them first (egressctl allow-in svc-web 9082/tcp)");
  assert.is((await run("allow-in", "svc-web", "9082")).exitCode, 0);
  r = await run("register", "svc-web", "--user", "2001");
  assert.is(r.exitCode, 0, r.stderr);
  assert.is(r.stderr, "");
  assert.match(r.stdout, "updated svc-web: user 2001 (uid 2001), mode enforce");
});

test("a uid with no listeners, or listeners of other uids only, registers as before", async () => {
  listening = [tcp(9082, 3001), udp(53, 0)];
  const r = await run("register", "svc-web", "--user", "2001");
  assert.is(r.exitCode, 0, r.stderr);
  assert.is(r.stderr, "");
});

test("--json reports the refusal as one error object with its code", async () => {
  listening = [tcp(9082)];
  const r = await run("--json", "register", "svc-web", "--user", "2001");
  assert.is(r.exitCode, 2);
  const out = JSON.parse(r.stdout) as { error: { code: string } };
  assert.is(out.error.code, "ERR_EGRESS_LISTENERS");
});

test("check warns when a policy written by hand would cut off a server its uid runs", async () => {
  mkdirSync(join(dir, "services.d"));
  writeFileSync(
    join(dir, "services.d", "svc-web.json"),
    JSON.stringify({ name: "svc-web", user: 2001, inbound: [{ ports: "8080" }] }),
  );
  listening = [tcp(8080), tcp(9082)];
  const r = await run("check");
  assert.is(r.exitCode, 0, r.stderr);
  assert.is(
    r.stderr,
    `warning: ${dir}/services.d/svc-web.json: $.inbound: uid 2001 listens on ports this policy does not declare: 9082/tcp (on [::]); once enforced they stop accepting new connections\n`,
  );
});

test.run();
