/**
 * The DNS-aware mode's benchmarks (issue 12), next to their baselines in the same run:
 *   - added latency per query against asking the resolver directly, with N services registered
 *     (address already allowed; new address one query at a time; 100 concurrent new addresses),
 *     for egressd's proxy and for dnsmasq --nftset on the same workloads;
 *   - resolve-then-connect success for a name rotating among 20 addresses, proxy vs system mode;
 *   - packet and connection rates with every service DNS-aware against every service "system".
 * Queries come from bench/dns-client.ts under a test uid; the upstream is the sandbox's DNS
 * server (Node.js, dns2) on the host's 127.0.0.1:53, which is also the "asked directly" path.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { chmodSync, mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { execa } from "execa";
import { compile, compileService, type Learned, type ServiceInput } from "../rules/compile.ts";
import { validateService } from "../rules/policy.ts";
import { reconcile } from "../rules/reconcile.ts";
import type { Ruleset } from "../rules/ruleset.ts";
import { DAEMON_NODE_FLAGS } from "../agent/paths.ts";
import {
  bundleScript,
  Daemon,
  EGRESSD,
  ROOT,
  Sandbox,
  type Records,
} from "../test/helpers/sandbox.ts";
import {
  connRate,
  ctl,
  DEST,
  CONN_PORT,
  EXTRA,
  fmt,
  log,
  median,
  pct,
  startIperf,
  udpRate,
  untrackIperf,
  writePolicies,
  type Row,
} from "./lib.ts";
import { dnsAwareServices, FIRST_UID, services } from "./workloads.ts";

const SECTION = "DNS-aware mode";
/** A uid no policy names: its queries go straight to the resolver. */
const UNMANAGED = FIRST_UID - 1;
const SAME = "same.example.test";
const SAME_ADDRESS = "198.51.100.200";
const ROT = "rot.example.test";
const ROT_ADDRESSES = Array.from({ length: 20 }, (_, i) => `203.0.113.${100 + i}`);
const newName = (i: number) => `n${i}.new.example.test`;
/** A distinct address per new name (private space passes the filter by default). */
const newAddress = (i: number) => `10.100.${(i >> 8) & 255}.${i & 255}`;
const BURST = 100;
/**
 * DNS-aware services egressd starts with through libnftables in-process: four sockets each,
 * and libnftables aborts on a file descriptor of 1024 or more (see egressd()).
 */
const LIBNFTABLES_SERVICES = 200;
interface To {
  host: string;
  port: number;
}
/** The resolver itself: the "asked directly" path, and the upstream of egressd and dnsmasq. */
const RESOLVER: To = { host: "127.0.0.1", port: 53 };
/**
 * Where the DNS-aware service sends its queries: any address is redirected to its proxy. Not
 * the resolver's own address, so that its UDP flows never have the same addresses and ports as
 * the direct queries of the baseline: the kernel would then use the existing conntrack entry,
 * redirected or not, whatever the uid (docs/performance.md, "DNS-aware mode").
 */
const STUB: To = { host: "127.0.0.53", port: 53 };
const DNSMASQ: To = { host: "127.0.0.1", port: 5300 };

interface Params {
  services: number;
  allowedQueries: number;
  serialQueries: number;
  burstRounds: number;
  connectAttempts: number;
  pktRuns: number;
  connRuns: number;
  pktSecs: number;
}

let clientFile: string | null = null;

/** bench/dns-client.ts bundled once into a world-readable directory (a test uid runs it). */
async function client(): Promise<string> {
  if (!clientFile) {
    const dir = mkdtempSync(join(tmpdir(), "egressd-bench-"));
    chmodSync(dir, 0o755);
    clientFile = join(dir, "dns-client.mjs");
    await bundleScript(join(ROOT, "bench/dns-client.ts"), clientFile);
  }
  return clientFile;
}

interface Latencies {
  ms: number[];
  failed: string[];
}

/** Sends `names` as `uid` to host:port, `concurrency` at a time; every query must succeed. */
async function ask(
  sb: Sandbox,
  uid: number,
  names: string[],
  concurrency: number,
  to: To,
): Promise<number[]> {
  const spec = { ...to, names, concurrency, timeoutMs: 5000 };
  const r = await sb.exec("setpriv", [
    `--reuid=${uid}`,
    `--regid=${uid}`,
    "--clear-groups",
    process.execPath,
    await client(),
    JSON.stringify(spec),
  ]);
  if (r.exitCode !== 0) throw new Error(`dns-client as uid ${uid}: ${r.stderr}`);
  const out = JSON.parse(r.stdout) as Latencies;
  if (out.failed.length)
    throw new Error(
      `${out.failed.length} of ${names.length} queries as uid ${uid} to ${to.host}:${to.port} failed: ${out.failed.slice(0, 5).join(", ")}`,
    );
  return out.ms;
}

/** The three workloads, for one way of asking (directly, through egressd, through dnsmasq). */
interface Workloads {
  allowed: number[];
  serial: number[];
  burst: number[];
  /** Kernel transactions (ruleset generations) during the one-at-a-time and concurrent phases. */
  serialTx: number;
  burstTx: number;
}

async function workloads(sb: Sandbox, uid: number, p: Params, to: To): Promise<Workloads> {
  await ask(sb, uid, [SAME, SAME, SAME], 1, to);
  const allowed = await ask(sb, uid, Array(p.allowedQueries).fill(SAME) as string[], 1, to);
  const serialNames = Array.from({ length: p.serialQueries }, (_, i) => newName(i));
  let gen = await generations(sb);
  const serial = await ask(sb, uid, serialNames, 1, to);
  const serialTx = await gen.stop();
  const burstNames = Array.from({ length: p.burstRounds * BURST }, (_, i) =>
    newName(p.serialQueries + i),
  );
  gen = await generations(sb);
  const burst = await ask(sb, uid, burstNames, BURST, to);
  const burstTx = await gen.stop();
  return { allowed, serial, burst, serialTx, burstTx };
}

/** Counts the kernel's ruleset generations (one per committed transaction) while it runs. */
async function generations(sb: Sandbox): Promise<{ stop: () => Promise<number> }> {
  // Line-buffered: a pipe would hold the last events in nft's buffer when it is stopped.
  const monitor: ChildProcess = spawn(
    "ip",
    ["netns", "exec", sb.ns, "stdbuf", "-oL", "nft", "monitor"],
    {
      stdio: ["ignore", "pipe", "ignore"],
    },
  );
  let text = "";
  monitor.stdout?.on("data", (d: Buffer) => (text += d.toString()));
  await new Promise((r) => setTimeout(r, 300));
  return {
    stop: async () => {
      await new Promise((r) => setTimeout(r, 200));
      monitor.kill();
      return (text.match(/^# new generation/gm) ?? []).length;
    },
  };
}

/**
 * egressd as Sandbox.startDaemon runs it, with `env`, and a CPU profile written to `profile`
 * when it stops.
 */
async function daemon(sb: Sandbox, env: Record<string, string>, profile?: string): Promise<Daemon> {
  if (!profile) return sb.startDaemon(env);
  const child = spawn(
    "ip",
    [
      "netns",
      "exec",
      sb.ns,
      process.execPath,
      ...DAEMON_NODE_FLAGS,
      "--cpu-prof",
      `--cpu-prof-dir=${profile}`,
      EGRESSD,
      ...sb.pathFlags,
    ],
    { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, ...env } },
  );
  const d = new Daemon(child);
  try {
    await d.waitFor((l) => l.msg === "ready", 120_000);
  } catch (err) {
    await d.stop("SIGKILL");
    throw err;
  }
  return d;
}

/**
 * Starts egressd through libnftables in-process, its default. libnftables 1.0.x waits for the
 * kernel's acknowledgements with select(), which glibc's fortified FD_SET aborts on for a file
 * descriptor of 1024 or more; each DNS-aware service's proxy holds four sockets, so with about
 * 250 of them the daemon dies at its first transaction ("bit out of range 0 - FD_SETSIZE on
 * fd_set"). Then the benchmark runs it with the nft program (its documented fallback) and says so.
 */
async function egressd(
  sb: Sandbox,
  profile?: string,
): Promise<{ d: Daemon; backend: string; aborted: boolean; startMs: number }> {
  let t0 = performance.now();
  try {
    const d = await daemon(sb, {}, profile);
    const startMs = performance.now() - t0;
    return { d, backend: "libnftables in-process", aborted: false, startMs };
  } catch (err) {
    if (!/FD_SETSIZE/.test(String(err))) throw err;
    log(
      "   egressd with libnftables in-process aborted at start (FD_SETSIZE): using the nft program",
    );
    t0 = performance.now();
    const d = await daemon(sb, { EGRESSD_NFT: "nft" }, profile);
    const startMs = performance.now() - t0;
    return { d, backend: "nft program", aborted: true, startMs };
  }
}

function records(p: Params): Records {
  const out: Records = {
    [SAME]: { A: [SAME_ADDRESS], ttl: 3600 },
    [ROT]: { A: ROT_ADDRESSES, rotate: true, ttl: 5 },
  };
  for (let i = 0; i < p.serialQueries + p.burstRounds * BURST; i++)
    out[newName(i)] = { A: [newAddress(i)], ttl: 3600 };
  return out;
}

/** The nft table dnsmasq fills: `sets` sets of IPv4 addresses with a default timeout. */
function dnsmasqTable(sets: number): string {
  const lines = ["table inet bench {"];
  for (let s = 0; s < sets; s++)
    lines.push(`  set s${s} { type ipv4_addr; flags timeout; timeout 1h; }`);
  lines.push("}", "");
  return lines.join("\n");
}

function startDnsmasq(sb: Sandbox, set: string): { child: ChildProcess; err: () => string } {
  const child = spawn(
    "ip",
    [
      "netns",
      "exec",
      sb.ns,
      "dnsmasq",
      "--keep-in-foreground",
      "--conf-file=/dev/null",
      "--no-resolv",
      "--no-hosts",
      "--user=root",
      "--pid-file",
      "--log-facility=-",
      "--bind-interfaces",
      `--listen-address=${DNSMASQ.host}`,
      `--port=${DNSMASQ.port}`,
      `--server=${RESOLVER.host}#${RESOLVER.port}`,
      // No cache: like egressd's proxy, every query goes upstream and its answer into the set.
      "--cache-size=0",
      "--dns-forward-max=1000",
      `--nftset=/new.example.test/${SAME}/4#inet#bench#${set}`,
    ],
    { stdio: ["ignore", "ignore", "pipe"] },
  );
  let stderr = "";
  child.stderr?.on("data", (d: Buffer) => (stderr += d.toString()));
  return { child, err: () => stderr };
}

function latencyRows(
  n: string,
  who: string,
  direct: Workloads,
  via: Workloads,
  targets: boolean,
): Row[] {
  const row = (
    what: string,
    xs: number[],
    base: number[],
    q: number,
    target?: { text: string; max: number },
  ): Row => {
    const value = pct(xs, q);
    const baseline = pct(base, q);
    const added = value - baseline;
    return {
      section: SECTION,
      what: `${what}: ${who}`,
      value,
      unit: "ms",
      baseline: { what: "resolver asked directly", value: baseline },
      added,
      ...(targets && target ? { target: target.text, meets: added <= target.max } : {}),
    };
  };
  return [
    row(`query, address already allowed, p50 (${n})`, via.allowed, direct.allowed, 0.5, {
      text: "<= +0.5 ms",
      max: 0.5,
    }),
    row(`query bringing a new address, one at a time, p50 (${n})`, via.serial, direct.serial, 0.5),
    row(
      `query bringing a new address, one at a time, p99 (${n})`,
      via.serial,
      direct.serial,
      0.99,
      {
        text: "<= +3 ms",
        max: 3,
      },
    ),
    row(
      `${BURST} concurrent queries, each a new address, p50 (${n})`,
      via.burst,
      direct.burst,
      0.5,
    ),
    row(
      `${BURST} concurrent queries, each a new address, p99 (${n})`,
      via.burst,
      direct.burst,
      0.99,
      {
        text: "<= +20 ms",
        max: 20,
      },
    ),
  ];
}

const summary = (w: Workloads) =>
  `allowed p50 ${fmt(pct(w.allowed, 0.5))}; new p50 ${fmt(pct(w.serial, 0.5))} p99 ${fmt(pct(w.serial, 0.99))}; burst p50 ${fmt(pct(w.burst, 0.5))} p99 ${fmt(pct(w.burst, 0.99))} ms; kernel transactions: ${w.serialTx} one at a time, ${w.burstTx} for the bursts`;

/** Latencies (egressd, dnsmasq, directly) and resolve-then-connect, in one sandbox. */
async function latency(p: Params, rows: Row[], profile?: string): Promise<{ aborted: boolean }> {
  const N = p.services.toLocaleString("en-US");
  log(
    `\n== DNS-aware mode: latency per query with ${N} services, egressd's proxy and dnsmasq --nftset against the resolver asked directly`,
  );
  const sb = await Sandbox.create({
    addresses: ROT_ADDRESSES,
    listen: ROT_ADDRESSES.map((host) => ({ proto: "tcp" as const, host, port: 443 })),
    records: records(p),
    config: { resolvers: ["127.0.0.1:53"] },
  });
  let d: Daemon | null = null;
  let dnsmasq: ChildProcess | null = null;
  try {
    const uid = FIRST_UID + p.services - 1;
    const systemUid = FIRST_UID + p.services;
    writePolicies(sb, [
      ...dnsAwareServices(p.services, ["*.new.example.test:443", `${SAME}:443`, `${ROT}:443`]),
      validateService(
        {
          name: "bench-system",
          user: systemUid,
          dns: "system",
          outbound: [{ host: ROT, ports: "443", protocol: "tcp" }],
        },
        "bench",
      ),
    ]);
    const started = await egressd(sb, profile);
    d = started.d;
    const { startMs } = started;
    const egressdLabel = `egressd (${started.backend})`;
    log(
      `   egressd started with ${N} DNS-aware services in ${fmt(startMs)} ms (${started.backend})`,
    );
    rows.push({
      section: SECTION,
      what: `daemon start to control socket ready, ${N} DNS-aware services (a proxy each), no saved state: ${egressdLabel}`,
      value: startMs,
      unit: "ms",
    });

    // Resolve-then-connect first, while the daemon is fresh: the system-mode service then has
    // what the refresh loop resolved at start-up, as after any restart.
    const attempt = async (who: number, to: To) => {
      const [r] = await sb.probe(who, [
        {
          proto: "resolve-connect",
          ...to,
          name: ROT,
          connectPort: 443,
          count: p.connectAttempts,
          timeoutMs: 4000,
        },
      ]);
      const m = /^ok:(\d+)\//.exec(r?.result ?? "");
      if (!m) throw new Error(`resolve-connect as uid ${who}: ${r?.result}`);
      return (Number(m[1]) / p.connectAttempts) * 100;
    };
    const proxied = await attempt(uid, STUB);
    const system = await attempt(systemUid, RESOLVER);
    log(
      `   resolve-then-connect, ${ROT} rotating among ${ROT_ADDRESSES.length} addresses, ${p.connectAttempts} attempts: proxy ${fmt(proxied)}%, system ${fmt(system)}%`,
    );
    rows.push({
      section: SECTION,
      what: `resolve-then-connect success, a name rotating among ${ROT_ADDRESSES.length} addresses (TTL 5 s), ${p.connectAttempts.toLocaleString("en-US")} attempts: "dns": "proxy"`,
      value: proxied,
      unit: "%",
      baseline: { what: `"dns": "system" (refresh loop, daemon just started)`, value: system },
      target: "100%",
      meets: proxied === 100,
    });

    const direct = await workloads(sb, UNMANAGED, p, RESOLVER);
    log(`   asked directly: ${summary(direct)}`);
    const viaEgressd = await workloads(sb, uid, p, STUB);
    log(`   through egressd: ${summary(viaEgressd)}`);
    const ours = [
      ...latencyRows(`${N} services`, egressdLabel, direct, viaEgressd, true),
      ...transactionRows(p, egressdLabel, viaEgressd),
    ];

    // dnsmasq on its own: egressd stopped and its table gone, so libnftables in dnsmasq reads
    // only the benchmark table of N sets.
    await d.stop();
    d = null;
    await sb.nft("delete", "table", "inet", "egressd");
    await sb.nftScript(dnsmasqTable(p.services));
    const set = `s${p.services - 1}`;
    const dm = startDnsmasq(sb, set);
    dnsmasq = dm.child;
    for (let i = 0; ; i++) {
      try {
        await ask(sb, UNMANAGED, [SAME], 1, DNSMASQ);
        break;
      } catch (err) {
        if (i > 50) throw new Error(`dnsmasq did not answer: ${String(err)}\n${dm.err()}`);
        await new Promise((r) => setTimeout(r, 100));
      }
    }
    const direct2 = await workloads(sb, UNMANAGED, p, RESOLVER);
    log(`   asked directly: ${summary(direct2)}`);
    const viaDnsmasq = await workloads(sb, UNMANAGED, p, DNSMASQ);
    const inSet = ((await sb.nft("list", "set", "inet", "bench", set)).match(/10\.100\./g) ?? [])
      .length;
    const expected = p.serialQueries + p.burstRounds * BURST;
    log(
      `   through dnsmasq: ${summary(viaDnsmasq)}; ${inSet} of ${expected} new addresses in its set`,
    );
    if (inSet !== expected || /error|fail/i.test(dm.err()))
      throw new Error(
        `dnsmasq put ${inSet} of ${expected} addresses in its set; it said:\n${dm.err()}`,
      );
    const label = "dnsmasq --nftset";
    const theirs = [
      ...latencyRows(`${N} sets`, label, direct2, viaDnsmasq, false),
      ...transactionRows(p, label, viaDnsmasq),
    ];
    // Side by side: each figure for egressd, then the same for dnsmasq.
    ours.forEach((row, i) => rows.push(row, theirs[i] as Row));
    return { aborted: started.aborted };
  } finally {
    dnsmasq?.kill();
    await d?.stop();
    await sb.destroy();
  }
}

/**
 * The same workloads with as many DNS-aware services as libnftables in-process survives (see
 * egressd()), for the figures of egressd's default path when the main run had to use the nft
 * program.
 */
async function libnftablesPass(p: Params, n: number, rows: Row[]): Promise<void> {
  const N = n.toLocaleString("en-US");
  log(`\n== DNS-aware mode: the same with ${N} services, egressd through libnftables in-process`);
  const sb = await Sandbox.create({ records: records(p), config: { resolvers: ["127.0.0.1:53"] } });
  let d: Daemon | null = null;
  try {
    writePolicies(sb, dnsAwareServices(n, ["*.new.example.test:443", `${SAME}:443`]));
    d = await sb.startDaemon();
    const direct = await workloads(sb, UNMANAGED, p, RESOLVER);
    log(`   asked directly: ${summary(direct)}`);
    const via = await workloads(sb, FIRST_UID + n - 1, p, STUB);
    log(`   through egressd: ${summary(via)}`);
    const label = "egressd (libnftables in-process)";
    rows.push(
      ...latencyRows(`${N} services`, label, direct, via, false),
      ...transactionRows(p, label, via),
    );
  } finally {
    await d?.stop();
    await sb.destroy();
  }
}

/** Kernel transactions per new address: one at a time, and when 100 arrive at once. */
function transactionRows(p: Params, who: string, w: Workloads): Row[] {
  const burst = p.burstRounds * BURST;
  return [
    {
      section: SECTION,
      what: `kernel transactions for ${p.serialQueries.toLocaleString("en-US")} new addresses asked one at a time: ${who}`,
      value: w.serialTx,
      unit: "transactions",
    },
    {
      section: SECTION,
      what: `kernel transactions for ${burst.toLocaleString("en-US")} new addresses asked ${BURST} at a time: ${who}`,
      value: w.burstTx,
      unit: "transactions",
    },
  ];
}

/**
 * The JavaScript work of one proxy transaction, without the kernel: what the daemon computes
 * for one learned address (the service's name sets, then reconcile over the whole table)
 * against a reconcile of the service's own name sets alone. Pure, in this process.
 */
function reconcileCost(p: Params, rows: Row[]): void {
  const N = p.services.toLocaleString("en-US");
  const list = dnsAwareServices(p.services, ["*.new.example.test:443", `${SAME}:443`]);
  const inputs: ServiceInput[] = list.map((policy, i) => ({
    policy,
    uid: FIRST_UID + i,
    proxyPort: 20_000 + i,
  }));
  const last = inputs[inputs.length - 1] as ServiceInput;
  const now = Date.now();
  const learnedOf = (count: number): Learned =>
    new Map(
      Array.from({ length: count }, (_, i) => [
        newName(i),
        new Map([[newAddress(i), now + 3_600_000]]),
      ]),
    );
  // The state half-way through the benchmark: the service has learned 500 names.
  const had = p.serialQueries / 2;
  const resolutions = new Map<string, string[]>([[SAME, [SAME_ADDRESS]]]);
  const applied = compile({
    table: "egressd",
    resolvers: [],
    services: inputs,
    resolutions,
    learned: new Map([[last.policy.name, learnedOf(had)]]),
  });
  const o = { now, slackMs: 150_000, marginMs: 2000 };
  const oneMore = learnedOf(had + 1);
  const runs = Math.max(5, Math.min(50, Math.round(20_000 / p.services)));
  const whole: number[] = [];
  const own: number[] = [];
  for (let r = 0; r < runs; r++) {
    let t = performance.now();
    const sets = compileService(last, resolutions, oneMore).sets;
    const replaced = new Map(sets.map((x) => [x.name, x]));
    const desired: Ruleset = {
      ...applied,
      sets: applied.sets.map((x) => replaced.get(x.name) ?? x),
    };
    const a = reconcile(applied, desired, o);
    whole.push(performance.now() - t);
    t = performance.now();
    const sets2 = compileService(last, resolutions, oneMore).sets;
    const names = new Set(sets2.map((x) => x.name));
    const b = reconcile(
      { ...applied, counters: [], chains: [], sets: applied.sets.filter((x) => names.has(x.name)) },
      { ...applied, counters: [], chains: [], sets: sets2 },
      o,
    );
    own.push(performance.now() - t);
    if (a.changes !== 1 || b.changes !== 1)
      throw new Error(`reconcile found ${a.changes} / ${b.changes} changes, not 1`);
  }
  const elements = applied.sets.reduce((n, x) => n + x.elem.length, 0);
  log(
    `   reconcile for one learned address: whole table (${applied.sets.length} sets, ${elements} elements, ${applied.chains.length} chains) ${fmt(median(whole))} ms; the service's own sets ${fmt(median(own))} ms`,
  );
  rows.push(
    {
      section: SECTION,
      what: `JavaScript work of one proxy transaction (name sets + reconcile over the whole table), ${N} services: egressd today`,
      value: median(whole),
      unit: "ms",
    },
    {
      section: SECTION,
      what: `the same, reconciling only the service's own name sets (what a targeted reconcile would cost), ${N} services`,
      value: median(own),
      unit: "ms",
      baseline: { what: "whole table", value: median(whole) },
      ratio: median(own) / median(whole),
    },
  );
}

/** Packet and connection rates, every service DNS-aware against every service "system". */
async function dataPath(p: Params, rows: Row[]): Promise<void> {
  const N = p.services.toLocaleString("en-US");
  log(`\n== DNS-aware mode: data path with ${N} services, all "proxy" against all "system"`);
  const sb = await Sandbox.create({
    addresses: [DEST],
    listen: [{ proto: "tcp", host: DEST, port: CONN_PORT }],
    config: { resolvers: ["127.0.0.1:53"] },
  });
  const iperf = await startIperf(sb);
  let d: Daemon | null = null;
  try {
    await untrackIperf(sb);
    const uid = FIRST_UID + p.services - 1;
    const list = services(p.services, EXTRA);
    writePolicies(
      sb,
      list.map((s) => ({ ...s, dns: "proxy" as const })),
    );
    const started = await egressd(sb);
    d = started.d;
    const redirects = (await sb.nft("list", "map", "inet", "egressd", "uid2port")).match(
      /:\s*\d+/g,
    )?.length;
    const onPkt = await udpRate(sb, uid, p.pktRuns, p.pktSecs);
    const onConn = await connRate(sb, uid, p.connRuns, p.pktSecs);
    writePolicies(
      sb,
      list.map((s) => ({ ...s, dns: "system" as const })),
    );
    await ctl(sb, "apply");
    const offPkt = await udpRate(sb, uid, p.pktRuns, p.pktSecs);
    const offConn = await connRate(sb, uid, p.connRuns, p.pktSecs);
    log(
      `   proxy (${redirects} redirects): ${fmt(onPkt)} packets/s, ${fmt(onConn)} connections/s; system: ${fmt(offPkt)} packets/s, ${fmt(offConn)} connections/s`,
    );
    rows.push(
      {
        section: SECTION,
        what: `UDP packets/s (untracked), ${N} services, all "dns": "proxy" (daemon running: proxies, redirect map; ${started.backend})`,
        value: onPkt,
        unit: "packets/s",
        baseline: { what: `all "dns": "system"`, value: offPkt },
        ratio: onPkt / offPkt,
        target: ">= 0.9 (no change beyond noise)",
        meets: onPkt / offPkt >= 0.9,
      },
      {
        section: SECTION,
        what: `new TCP connections/s, ${N} services, all "dns": "proxy" (each new flow also walks the redirect chain)`,
        value: onConn,
        unit: "conn/s",
        baseline: { what: `all "dns": "system"`, value: offConn },
        ratio: onConn / offConn,
      },
    );
  } finally {
    iperf.kill();
    await d?.stop();
    await sb.destroy();
  }
}

/** The DNS-aware mode's section of the report. */
export async function dnsAware(o: {
  quick: boolean;
  rows: Row[];
  /** A directory for a CPU profile of the daemon during the latency workloads. */
  profile?: string;
  /** Instead of 1,000 (100 when quick). */
  services?: number;
}): Promise<void> {
  const p: Params = o.quick
    ? {
        services: 100,
        allowedQueries: 200,
        serialQueries: 150,
        burstRounds: 2,
        connectAttempts: 200,
        pktRuns: 2,
        connRuns: 1,
        pktSecs: 1,
      }
    : {
        services: 1000,
        allowedQueries: 1000,
        serialQueries: 500,
        burstRounds: 10,
        connectAttempts: 1000,
        pktRuns: 5,
        connRuns: 5,
        pktSecs: 2,
      };
  if (o.services) p.services = o.services;
  const version = (await execa("dnsmasq", ["--version"])).stdout;
  if (!/\bnftset\b/.test(version))
    throw new Error(
      `this dnsmasq has no nftset support (--nftset): ${version.split("\n")[1] ?? version}`,
    );
  reconcileCost(p, o.rows);
  const { aborted } = await latency(p, o.rows, o.profile);
  if (aborted) await libnftablesPass(p, LIBNFTABLES_SERVICES, o.rows);
  await dataPath(p, o.rows);
}
