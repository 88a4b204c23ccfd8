/**
 * What the generated drop-in's InaccessiblePaths= does to name resolution, measured with the
 * real glibc and nss-resolve module: with systemd-resolved's varlink socket reachable, a lookup
 * goes to resolved (which would send the query as its own user, out of egressd's sight); with
 * the socket made inaccessible the way systemd does it, glibc falls back to plain DNS on port
 * 53, the traffic egressd redirects for a "dns": "proxy" service. systemd is not PID 1 here,
 * so the mount that InaccessiblePaths= makes is made by the test (see docs/systemd.md).
 */
import { execFileSync } from "node:child_process";
import { existsSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { ROOT, withSandbox, type Sandbox } from "../helpers/sandbox.ts";

const test = suite("systemd drop-in: hiding resolved's socket makes glibc use port 53");

const SVC_UID = 2160;
const FROM_DNS = "198.51.100.53";
/** What the fake resolved answers: seeing it means the lookup bypassed port 53. */
const FROM_RESOLVED = "192.0.2.99";
const RESOLVED_SOCKET = "/run/systemd/resolve/io.systemd.Resolve";

/**
 * glibc's nss-resolve module: installed (Fedora ships it with systemd), or unpacked into
 * .cache/nss-resolve by scripts/test-all.sh (installing the Debian package would edit the
 * host's /etc/nsswitch.conf).
 */
function nssResolveDir(): string {
  const cache = join(ROOT, ".cache", "nss-resolve");
  if (existsSync(cache)) {
    const found = (readdirSync(cache, { recursive: true }) as string[]).find((f) =>
      f.endsWith("libnss_resolve.so.2"),
    );
    if (found) return dirname(join(cache, found));
  }
  const ldconfig = execFileSync("ldconfig", ["-p"], { encoding: "utf8" });
  const line = ldconfig.split("\n").find((l) => l.includes("libnss_resolve.so.2"));
  const path = line?.split(" => ")[1]?.trim();
  if (path) return dirname(path);
  throw new Error(
    "glibc's nss-resolve module (libnss_resolve.so.2) is missing: run scripts/test-all.sh, or unpack it: mkdir -p .cache/nss-resolve && cd .cache/nss-resolve && apt-get download libnss-resolve && dpkg-deb -x libnss-resolve_*.deb .",
  );
}

/** A stand-in for systemd-resolved's varlink API: answers every hostname with FROM_RESOLVED. */
const FAKE_RESOLVED = `
import { createServer } from "node:net";
import { appendFileSync, chmodSync } from "node:fs";
const [path, log] = process.argv.slice(2);
createServer((c) => {
  let buf = "";
  c.on("error", () => {});
  c.on("data", (d) => {
    buf += d;
    for (let i; (i = buf.indexOf("\\0")) !== -1; buf = buf.slice(i + 1)) {
      const call = JSON.parse(buf.slice(0, i));
      appendFileSync(log, JSON.stringify(call) + "\\n");
      const address = ${JSON.stringify(FROM_RESOLVED.split(".").map(Number))};
      c.write(JSON.stringify({ parameters: { addresses: [{ ifindex: 1, family: 2, address }], name: call.parameters?.name, flags: 0 } }) + "\\0");
    }
  });
}).listen(path, () => chmodSync(path, 0o666));
`;

/** The InaccessiblePaths= of the drop-in egressctl generates for `service` (leading "-" kept). */
async function inaccessiblePaths(sb: Sandbox, service: string): Promise<string[]> {
  const r = await sb.egressctl("--json", "systemd", service, "--unit", "app.service");
  assert.is(r.exitCode, 0, r.stderr);
  const d = JSON.parse(r.stdout) as { directives: { key: string; value: string }[] };
  return d.directives.filter((x) => x.key === "InaccessiblePaths").map((x) => x.value);
}

test("a proxy-mode service's drop-in hides resolved's socket, and glibc then asks port 53", async () => {
  await withSandbox({ records: { "api.example.test": { A: [FROM_DNS], ttl: 60 } } }, async (sb) => {
    await sb.egressctl("register", "svc-app", "--user", String(SVC_UID));
    const file = sb.servicesFile("svc-app");
    const doc = JSON.parse(readFileSync(file, "utf8")) as Record<string, unknown>;
    writeFileSync(file, JSON.stringify({ ...doc, dns: "proxy" }));
    const paths = await inaccessiblePaths(sb, "svc-app");
    assert.ok(paths.includes(`-${RESOLVED_SOCKET}`), `drop-in hides resolved: ${paths.join(" ")}`);

    const d = sb.dir;
    writeFileSync(join(d, "fake-resolved.mjs"), FAKE_RESOLVED);
    writeFileSync(join(d, "nsswitch.conf"), "hosts: resolve [!UNAVAIL=return] dns\n");
    writeFileSync(join(d, "resolv.conf"), "nameserver 127.0.0.1\n");
    const log = join(d, "resolved.log");
    writeFileSync(log, "");
    const lookup = `setpriv --reuid=${SVC_UID} --regid=${SVC_UID} --clear-groups env LD_LIBRARY_PATH=${nssResolveDir()} getent ahostsv4 api.example.test | head -n 1 || true`;
    const script = [
      "set -eu",
      // A host whose glibc resolves through systemd-resolved (as Fedora's does).
      `mount --bind ${join(d, "nsswitch.conf")} /etc/nsswitch.conf`,
      `mount --bind ${join(d, "resolv.conf")} /etc/resolv.conf`,
      "mount -t tmpfs -o mode=755 tmpfs /run",
      `mkdir -p ${dirname(RESOLVED_SOCKET)}`,
      `${process.execPath} ${join(d, "fake-resolved.mjs")} ${RESOLVED_SOCKET} ${log} &`,
      `i=0; until [ -S ${RESOLVED_SOCKET} ] && [ "$(stat -c %a ${RESOLVED_SOCKET})" = 666 ]; do i=$((i+1)); [ $i -lt 100 ] || exit 9; sleep 0.1; done`,
      `echo "reachable: $(${lookup})"`,
      // InaccessiblePaths= as systemd applies it: an inaccessible inode of the same type (a
      // socket, mode 0000, nobody listening) bind-mounted over each path; "-" paths that do
      // not exist are skipped.
      `${process.execPath} -e 'require("net").createServer().listen(process.argv[1], () => process.kill(process.pid, "SIGKILL"))' ${join(d, "inaccessible.sock")} || true`,
      `chmod 000 ${join(d, "inaccessible.sock")}`,
      ...paths.map((p) => {
        const path = p.replace(/^-/, "");
        return `if [ -e ${path} ]; then mount --bind ${join(d, "inaccessible.sock")} ${path}; fi`;
      }),
      `echo "hidden: $(${lookup})"`,
      "kill $!",
    ].join("\n");
    writeFileSync(join(d, "nss.sh"), script);
    const r = await sb.exec("unshare", [
      "--mount",
      "--propagation",
      "private",
      "sh",
      join(d, "nss.sh"),
    ]);
    assert.is(r.exitCode, 0, `${r.stdout}\n${r.stderr}`);
    const answer = (when: string) =>
      new RegExp(`^${when}: (\\S*)`, "m").exec(r.stdout)?.[1] ?? `(no line "${when}")`;
    // Reachable: nss-resolve answers through resolved; the DNS server on port 53 is never asked.
    assert.is(answer("reachable"), FROM_RESOLVED, r.stdout);
    const calls = readFileSync(log, "utf8").trim().split("\n");
    assert.is(calls.length, 1, `one varlink call: ${calls.join(" | ")}`);
    assert.match(calls[0] ?? "", '"method":"io.systemd.Resolve.ResolveHostname"');
    assert.match(calls[0] ?? "", '"name":"api.example.test"');
    // Hidden: nss-resolve reports "unavailable", glibc moves on to dns, port 53 answers.
    assert.is(answer("hidden"), FROM_DNS, r.stdout);
    assert.is(readFileSync(log, "utf8").trim().split("\n").length, 1, "resolved not asked again");
  });
});

test.run();
