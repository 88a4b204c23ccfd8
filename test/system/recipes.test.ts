/**
 * docs/recipes.md, way 3, with the pieces systemd would run, run by hand (systemd is not PID 1
 * here): an app that gets its listening socket by socket activation and has no network of its
 * own (PrivateNetwork=), whose only way out is a unix socket to systemd-socket-proxyd running
 * as a dedicated user that egressd enforces.
 */
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { LINK, withSandbox, type Sandbox } from "../helpers/sandbox.ts";

const test = suite(
  "recipe: socket activation, PrivateNetwork=, outbound through a proxy egressd enforces",
);

const APP_UID = 2180;
const OUT_UID = 2181;
const ALLOWED = "198.51.100.10";
const REFUSED = "198.51.100.20";
const PROXYD = "/usr/lib/systemd/systemd-socket-proxyd";

/** The app: serves on the socket it was given (fd 3), calls its upstream over a unix socket. */
const APP = `
const net = require("node:net");
const upstream = process.argv[2];
net.createServer((client) => {
  // PrivateNetwork=: a direct connection has nowhere to go.
  const direct = net.connect(443, ${JSON.stringify(ALLOWED)});
  let directResult = "connected";
  direct.on("error", (e) => (directResult = e.code));
  direct.on("connect", () => direct.destroy());
  const u = net.connect({ path: upstream });
  let got = "";
  u.on("data", (d) => (got += d));
  u.on("error", (e) => (got += "error " + e.code));
  u.on("close", () => client.end("upstream: " + (got.trim() || "(closed)") + "; direct: " + directResult + "\\n"));
}).listen({ fd: 3 });
`;

async function ok(sb: Sandbox, ...args: string[]): Promise<string> {
  const r = await sb.egressctl(...args);
  assert.is(r.exitCode, 0, `egressctl ${args.join(" ")} failed: ${r.stderr}`);
  return r.stdout;
}

test("the app is reached on its activated socket; its upstream call leaves through the proxy's user, which egressd holds to its allowlist", async () => {
  const world = {
    addresses: [ALLOWED, REFUSED],
    listen: [ALLOWED, REFUSED].map((host) => ({ proto: "tcp" as const, host, port: 443 })),
    records: {
      "api.example.test": { A: [ALLOWED], ttl: 60 },
      "other.example.test": { A: [REFUSED], ttl: 60 },
    },
  };
  await withSandbox(world, async (sb) => {
    await ok(sb, "register", "svc-app-out", "--user", String(OUT_UID));
    await ok(sb, "allow", "svc-app-out", "api.example.test:443");
    // The daemon runs, as in the recipe: the proxy user's lookups go through egressd (DNS-aware).
    await sb.startDaemon();
    const d = sb.dir;
    writeFileSync(join(d, "app.cjs"), APP);
    writeFileSync(join(d, "resolv.conf"), "nameserver 127.0.0.1\n");
    const node = process.execPath;
    const asUser = (uid: number) => `setpriv --reuid=${uid} --regid=${uid} --clear-groups`;
    const client = (port: number) =>
      `ip netns exec ${sb.netNs} ${node} -e 'const s = require("net").connect(${port}, "${LINK.host4}"); let b = ""; s.on("data", (x) => (b += x)); s.on("error", (e) => console.log("${port}", e.code)); s.on("close", () => console.log("${port}", b.trim()))'`;
    const script = [
      "set -eu",
      `mount --bind ${join(d, "resolv.conf")} /etc/resolv.conf`,
      // app-upstream.socket + app-upstream.service (User=svc-app-out): the proxy to the API,
      // and a second one pointed at a host the policy does not allow.
      `systemd-socket-activate -l ${join(d, "up.sock")} ${asUser(OUT_UID)} ${PROXYD} api.example.test:443 2>/dev/null &`,
      `systemd-socket-activate -l ${join(d, "up-other.sock")} ${asUser(OUT_UID)} ${PROXYD} other.example.test:443 2>/dev/null &`,
      // app.socket + app.service (PrivateNetwork=yes, User=app): its own network namespace,
      // the listening socket passed in as fd 3.
      `systemd-socket-activate -l 8080 unshare --net ${asUser(APP_UID)} ${node} ${join(d, "app.cjs")} ${join(d, "up.sock")} 2>/dev/null &`,
      `systemd-socket-activate -l 8081 unshare --net ${asUser(APP_UID)} ${node} ${join(d, "app.cjs")} ${join(d, "up-other.sock")} 2>/dev/null &`,
      `i=0; until [ -S ${join(d, "up.sock")} ] && [ -S ${join(d, "up-other.sock")} ]; do i=$((i+1)); [ $i -lt 100 ] || exit 9; sleep 0.1; done`,
      // SocketMode= defaults to 0666.
      `chmod 666 ${join(d, "up.sock")} ${join(d, "up-other.sock")}`,
      `i=0; until ss -Hltn | grep -q ':8081 '; do i=$((i+1)); [ $i -lt 100 ] || exit 9; sleep 0.1; done`,
      client(8080),
      client(8081),
    ].join("\n");
    writeFileSync(join(d, "recipe.sh"), script);
    const before = await sb.nftJson("list", "counters", "table", "inet", "egressd");
    const r = await sb.exec("unshare", [
      "--mount",
      "--pid",
      "--fork",
      "--mount-proc",
      "--propagation",
      "private",
      "sh",
      join(d, "recipe.sh"),
    ]);
    assert.is(r.exitCode, 0, `${r.stdout}\n${r.stderr}`);
    assert.match(r.stdout, `8080 upstream: hello from ${ALLOWED}:443; direct: ENETUNREACH`);
    assert.match(r.stdout, "8081 upstream: (closed); direct: ENETUNREACH");
    // DNS-aware: the name it may not reach is refused at the lookup (and never forwarded);
    // a connection to that host by address is refused by the firewall and counted.
    const st = JSON.parse(await ok(sb, "--json", "status", "svc-app-out")) as {
      services: { dns: { queriesRefused: number; lastRefused: { name: string }[] } }[];
    };
    assert.ok((st.services[0]?.dns.queriesRefused ?? 0) >= 1, JSON.stringify(st.services[0]?.dns));
    assert.is(st.services[0]?.dns.lastRefused[0]?.name, "other.example.test");
    assert.is(await sb.try1(OUT_UID, "tcp", REFUSED, 443), "ECONNREFUSED");
    const after = await sb.nftJson("list", "counters", "table", "inet", "egressd");
    const packets = (c: typeof before) =>
      Number(c.nftables.find((o) => o.counter?.name === "s_svc_app_out")?.counter?.packets);
    assert.ok(packets(after) > packets(before), "the refused connection is counted");
  });
});

test.run();
