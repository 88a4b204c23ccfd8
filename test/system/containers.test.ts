/**
 * Rootless containers of a dedicated user: the container's traffic leaves through user-mode
 * networking (pasta, slirp4netns) whose sockets belong to that user, so egressd enforces the
 * user's policy on it. Each run happens in a private mount and PID namespace inside the
 * sandbox's host namespace: /dev/net/tun is made usable there (it is root-only here), files the
 * container tools need are bind-mounted, and every process ends with the namespace.
 * docs/containers.md describes the recipe and what it does not cover.
 */
import {
  chmodSync,
  copyFileSync,
  mkdirSync,
  mkdtempSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from "node:fs";
import { join } from "node:path";
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { execa } from "execa";
import { fixtures, withSandbox, type ProbeResult, type Sandbox } from "../helpers/sandbox.ts";

const test = suite("rootless containers of a dedicated user (pasta, podman with slirp4netns)");

const POD_UID = 2170;
/** A uid egressd does not manage: the control that shows the refused host is reachable. */
const OTHER_UID = 2171;
const ALLOWED = "198.51.100.10";
const REFUSED = "198.51.100.20";
/** Below a wildcard: only egressd's proxy can allow it (the refresh loop knows exact names only). */
const CDN = "198.51.100.30";
/** Listed nowhere: the resolver knows it, a DNS-aware service must not. */
const EVIL = "198.51.100.40";
/** Where the container sends DNS; pasta forwards it to the host's resolver (127.0.0.1 here). */
const PASTA_DNS = "10.0.2.3";

const WORLD = {
  addresses: [ALLOWED, REFUSED, CDN, EVIL],
  listen: [ALLOWED, REFUSED, CDN, EVIL].map((host) => ({ proto: "tcp" as const, host, port: 443 })),
  records: {
    "api.example.test": { A: [ALLOWED], ttl: 60 },
    "a.cdn.example.test": { A: [CDN], ttl: 60 },
    "evil.example.test": { A: [EVIL], ttl: 60 },
  },
  config: { resolvers: ["127.0.0.1:53"] },
};

async function ok(sb: Sandbox, ...args: string[]): Promise<string> {
  const r = await sb.egressctl(...args);
  assert.is(r.exitCode, 0, `egressctl ${args.join(" ")} failed: ${r.stderr}`);
  return r.stdout;
}

/** svc-pod (uid POD_UID) may reach api.example.test:443 only; DNS in "system" mode, written out. */
async function enforce(sb: Sandbox): Promise<void> {
  await ok(sb, "register", "svc-pod", "--user", String(POD_UID));
  await ok(sb, "allow", "svc-pod", "api.example.test:443");
  const file = sb.servicesFile("svc-pod");
  const doc = JSON.parse(sb.readService("svc-pod")) as Record<string, unknown>;
  writeFileSync(file, JSON.stringify({ ...doc, dns: "system" }, null, 2));
  await ok(sb, "apply");
}

/** Packets refused for svc-pod so far (its counter in egressd's table). */
async function refusedPackets(sb: Sandbox): Promise<number> {
  const counters = await sb.nftJson("list", "counters", "table", "inet", "egressd");
  const c = counters.nftables.find((o) => o.counter?.name === "s_svc_pod")?.counter;
  return Number(c?.packets ?? NaN);
}

/**
 * Runs `script` (sh) as root in a private mount and PID namespace inside the sandbox's host
 * namespace, after making /dev/net/tun usable by everyone there.
 */
async function isolated(sb: Sandbox, name: string, script: string) {
  const file = join(sb.dir, `${name}.sh`);
  writeFileSync(
    file,
    [
      "set -eu",
      "mount -t tmpfs -o mode=755 tmpfs /dev/net",
      "mknod -m 666 /dev/net/tun c 10 200",
      script,
    ].join("\n"),
  );
  return sb.exec("unshare", [
    "--mount",
    "--pid",
    "--fork",
    "--mount-proc",
    "--propagation",
    "private",
    "sh",
    file,
  ]);
}

/**
 * Runs the probe inside a pasta "container" (a new user and network namespace) as `uid`, with
 * the container's resolv.conf pointing at pasta's DNS forwarder.
 */
async function inPasta(sb: Sandbox, uid: number, attempts: object[]): Promise<ProbeResult[]> {
  const { probe } = await fixtures();
  const hostResolv = join(sb.dir, "host-resolv.conf");
  const podResolv = join(sb.dir, "pod-resolv.conf");
  writeFileSync(hostResolv, "nameserver 127.0.0.1\n");
  writeFileSync(podResolv, `nameserver ${PASTA_DNS}\n`);
  const inner = `mount --bind ${podResolv} /etc/resolv.conf && exec ${process.execPath} ${probe} '${JSON.stringify(attempts)}'`;
  const r = await isolated(
    sb,
    `pasta-${uid}`,
    [
      // pasta forwards the container's DNS to the first nameserver here.
      `mount --bind ${hostResolv} /etc/resolv.conf`,
      // Foreground (-f): otherwise pasta daemonizes and holds the pipes. The template
      // interface is the sandbox's veth0, which has the default route.
      `exec setpriv --reuid=${uid} --regid=${uid} --clear-groups pasta --config-net -f -q --dns-forward ${PASTA_DNS} -- unshare --mount sh -c "${inner.replace(/"/g, '\\"')}"`,
    ].join("\n"),
  );
  const line = r.stdout.split("\n").find((l) => l.startsWith("["));
  if (r.exitCode !== 0 || !line) {
    throw new Error(`pasta run failed (exit ${r.exitCode}):\n${r.stdout}\n${r.stderr}`);
  }
  return JSON.parse(line) as ProbeResult[];
}

test("pasta as the service's uid: the allowed name resolves and connects, another host is refused and counted", async () => {
  await withSandbox(WORLD, async (sb) => {
    await enforce(sb);
    const before = await refusedPackets(sb);
    const attempts = [
      { proto: "lookup", host: "", port: 0, name: "api.example.test" },
      { proto: "tcp", host: "api.example.test", port: 443 },
      { proto: "tcp", host: REFUSED, port: 443, timeoutMs: 3000 },
    ];
    const r = await inPasta(sb, POD_UID, attempts);
    assert.equal(
      r.map((x) => x.result),
      // pasta (Debian 12's) does not turn the kernel's reset into one for the container: it
      // retries the SYN, so the container sees a timeout rather than a refusal.
      [`answer:${ALLOWED}`, "connected", "timeout"],
      JSON.stringify(r),
    );
    const after = await refusedPackets(sb);
    assert.ok(after > before, `refused packets counted for svc-pod: ${before} -> ${after}`);
    // The control: the same container as a uid egressd does not manage reaches that host.
    const control = await inPasta(sb, OTHER_UID, attempts.slice(2));
    assert.is(control[0]?.result, "connected", JSON.stringify(control));
  });
});

test("pasta as the service's uid in DNS-aware mode: the forwarder's queries go to egressd's proxy, which answers allowed names (wildcards too) and NXDOMAIN for others", async () => {
  await withSandbox(WORLD, async (sb) => {
    // The default mode ("dns": "proxy"), with the daemon running: its proxy answers.
    await ok(sb, "register", "svc-pod", "--user", String(POD_UID));
    await ok(sb, "allow", "svc-pod", "api.example.test:443", "*.cdn.example.test:443");
    await sb.startDaemon();
    const st = JSON.parse(await ok(sb, "--json", "status", "svc-pod")) as {
      services: { dns: { mode: string; queriesAllowed: number; queriesRefused: number } }[];
    };
    assert.is(st.services[0]?.dns.mode, "proxy");
    const r = await inPasta(sb, POD_UID, [
      // Through the container's resolv.conf (getaddrinfo) to pasta's forwarder.
      { proto: "lookup", host: "", port: 0, name: "a.cdn.example.test" },
      { proto: "tcp", host: "a.cdn.example.test", port: 443 },
      { proto: "tcp", host: "api.example.test", port: 443 },
      // The rcode the container gets for a name the service may not look up.
      { proto: "resolve", host: PASTA_DNS, port: 53, name: "evil.example.test" },
      { proto: "lookup", host: "", port: 0, name: "evil.example.test" },
    ]);
    assert.equal(
      r.map((x) => x.result),
      [`answer:${CDN}`, "connected", "connected", "NXDOMAIN:", "ENOTFOUND"],
      JSON.stringify(r),
    );
    // The proxy answered them: a.cdn's address is in the service's set only because the
    // proxy put it there before answering; evil was counted as refused and never left.
    const after = JSON.parse(await ok(sb, "--json", "status", "svc-pod")) as typeof st;
    const dns = after.services[0]?.dns;
    assert.ok(
      dns && dns.queriesAllowed > (st.services[0]?.dns.queriesAllowed ?? 0),
      JSON.stringify(dns),
    );
    assert.ok(dns && dns.queriesRefused >= 2, JSON.stringify(dns));
    const log = sb.dnsLog();
    assert.ok(
      log.some((l) => l.startsWith("a.cdn.example.test")),
      log.join("\n"),
    );
    assert.not.ok(
      log.some((l) => l.startsWith("evil.example.test")),
      log.join("\n"),
    );
  });
});

/** A one-binary image root: a static busybox with the applets the container runs. */
function busyboxRoot(dir: string): string {
  const root = join(dir, "rootfs");
  mkdirSync(join(root, "bin"), { recursive: true });
  mkdirSync(join(root, "etc"));
  copyFileSync(BUSYBOX, join(root, "bin", "busybox"));
  chmodSync(join(root, "bin", "busybox"), 0o755);
  for (const applet of ["sh", "nc", "nslookup", "echo"])
    symlinkSync("busybox", join(root, "bin", applet));
  return root;
}

/** Debian's busybox-static; podman imports it, so no registry is involved. */
const BUSYBOX = "/bin/busybox";

/**
 * Runs `inner` (busybox sh) in a rootless podman container of `uid`, networked by slirp4netns,
 * with its DNS server set to slirp4netns's forwarder. Returns what the container printed.
 */
async function inPodman(sb: Sandbox, uid: number, inner: string): Promise<string> {
  const d = join(sb.dir, "podman");
  mkdirSync(join(d, "home"), { recursive: true });
  // podman refuses a runroot of over 50 characters, and the sandbox's dir (inside the suite's
  // temp dir) is longer: the run dir is a short one of its own, removed when podman is done.
  const run = mkdtempSync("/tmp/egt-pod-");
  try {
    return await podmanIn(sb, uid, inner, d, run);
  } finally {
    rmSync(run, { recursive: true, force: true });
  }
}

/** inPodman with its dirs: `d` (in the sandbox) and `run` (podman's runroot and XDG_RUNTIME_DIR). */
async function podmanIn(
  sb: Sandbox,
  uid: number,
  inner: string,
  d: string,
  run: string,
): Promise<string> {
  chmodSync(run, 0o700);
  const root = busyboxRoot(d);
  const tar = join(d, "rootfs.tar");
  await execa("tar", ["-C", root, "-cf", tar, "."]);
  // podman wants a named user with subordinate ids; they exist only in this mount namespace.
  const user = "egt-pod";
  const etc = (name: string, extra: string) =>
    execa("sh", ["-c", `cat /etc/${name} - > ${join(d, name)}`], { input: extra });
  await etc("passwd", `${user}:x:${uid}:${uid}::${join(d, "home")}:/bin/sh\n`);
  await etc("group", `${user}:x:${uid}:\n`);
  writeFileSync(join(d, "subuid"), `${user}:200000:65536\n`);
  writeFileSync(join(d, "subgid"), `${user}:200000:65536\n`);
  writeFileSync(join(d, "host-resolv.conf"), "nameserver 127.0.0.1\n");
  writeFileSync(join(d, "inner.sh"), inner);
  await execa("chown", ["-R", `${uid}:${uid}`, join(d, "home"), run]);
  const podman = [
    "podman",
    `--root=${join(d, "home", "storage")}`,
    `--runroot=${join(run, "storage")}`,
    "--storage-driver=vfs",
    "--cgroup-manager=cgroupfs",
    "--events-backend=file",
  ].join(" ");
  const image = "localhost/egressd-test-busybox";
  const r = await isolated(
    sb,
    `podman-${uid}`,
    [
      // crun refuses a hybrid cgroup layout (tmpfs at /sys/fs/cgroup); give it the unified one.
      "mount -t cgroup2 cgroup2 /sys/fs/cgroup",
      "mount --make-rshared /",
      ...["passwd", "group", "subuid", "subgid"].map((f) => `mount --bind ${join(d, f)} /etc/${f}`),
      // slirp4netns forwards the container's DNS (10.0.2.3) to the first nameserver here.
      `mount --bind ${join(d, "host-resolv.conf")} /etc/resolv.conf`,
      `exec setpriv --reuid=${uid} --regid=${uid} --clear-groups env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=${join(d, "home")} XDG_RUNTIME_DIR=${run} USER=${user} sh -c '` +
        `${podman} import ${tar} ${image} >/dev/null && ` +
        `exec ${podman} run --rm --cgroups=disabled --network=slirp4netns --dns=10.0.2.3 -v ${join(d, "inner.sh")}:/inner.sh:ro ${image} sh /inner.sh'`,
    ].join("\n"),
  );
  if (r.exitCode !== 0) {
    throw new Error(`podman run failed (exit ${r.exitCode}):\n${r.stdout}\n${r.stderr}`);
  }
  return r.stdout;
}

test("podman run --network=slirp4netns as the service's user: allowed host reached, DNS answered, another host refused and counted", async () => {
  await withSandbox(WORLD, async (sb) => {
    await enforce(sb);
    const before = await refusedPackets(sb);
    const out = await inPodman(
      sb,
      POD_UID,
      [
        "nslookup api.example.test",
        `for h in ${ALLOWED} ${REFUSED}; do`,
        '  if got=$(nc -w 3 "$h" 443 </dev/null 2>&1); then echo "tcp $h ok: $got"; else echo "tcp $h failed: $got"; fi',
        "done",
      ].join("\n"),
    );
    assert.match(
      out,
      `Address: ${ALLOWED}`,
      "the name resolves through slirp4netns's DNS forwarder",
    );
    assert.match(out, `tcp ${ALLOWED} ok: hello from ${ALLOWED}:443`);
    assert.match(
      out,
      `tcp ${REFUSED} failed: nc: can't connect to remote host (${REFUSED}): Connection refused`,
    );
    const after = await refusedPackets(sb);
    assert.ok(after > before, `refused packets counted for svc-pod: ${before} -> ${after}`);
  });
});

test("podman run --network=slirp4netns in DNS-aware mode: slirp4netns's DNS forwarder is redirected to egressd's proxy", async () => {
  await withSandbox(WORLD, async (sb) => {
    await ok(sb, "register", "svc-pod", "--user", String(POD_UID));
    await ok(sb, "allow", "svc-pod", "*.cdn.example.test:443");
    await sb.startDaemon();
    const out = await inPodman(
      sb,
      POD_UID,
      [
        "nslookup a.cdn.example.test",
        "nslookup evil.example.test",
        `if got=$(nc -w 3 ${CDN} 443 </dev/null 2>&1); then echo "tcp ${CDN} ok: $got"; else echo "tcp ${CDN} failed: $got"; fi`,
      ].join("\n"),
    );
    // Only the proxy can have allowed a name below a wildcard, and only before answering.
    assert.match(out, `Address: ${CDN}`, out);
    assert.match(out, `tcp ${CDN} ok: hello from ${CDN}:443`, out);
    assert.match(out, /evil\.example\.test: NXDOMAIN/, out);
    const log = sb.dnsLog();
    assert.not.ok(
      log.some((l) => l.startsWith("evil.example.test")),
      log.join("\n"),
    );
  });
});

test.run();
