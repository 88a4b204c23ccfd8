/**
 * egressd benchmarks (`npm run bench [-- --quick]`), as root, in throwaway network namespaces.
 * Every figure is the median of several runs next to a baseline measured in the same run; the
 * full run writes docs/performance.md, the quick one dist/bench/performance-quick.md.
 */
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { cpus, totalmem } from "node:os";
import { join } from "node:path";
import { execa } from "execa";
import { EGRESSCTL, ROOT, Sandbox, type Daemon } from "../test/helpers/sandbox.ts";
import { dnsAware } from "./dns-proxy.ts";
import {
  connRate as connRateOf,
  ctl,
  DEST,
  EXTRA,
  fmt,
  CONN_PORT,
  log,
  median,
  p95,
  pct,
  timed,
  udpRate as udpRateOf,
  startIperf,
  untrackIperf,
  writePolicies,
  type Row,
} from "./lib.ts";
import { FIRST_UID, naiveRuleset, services } from "./workloads.ts";

const quick = process.argv.includes("--quick");
const P = quick
  ? {
      sizes: [1, 100],
      connSizes: [1, 100],
      pktRuns: 3,
      pktSecs: 1,
      applySizes: [100, 1000],
      applyRuns: 2,
      pathRuns: 2,
      smallRuns: 100,
      names: 100,
      cliRuns: 10,
      idleSecs: 3,
    }
  : {
      sizes: [1, 100, 1000, 10_000],
      connSizes: [1, 10_000],
      pktRuns: 5,
      pktSecs: 2,
      applySizes: [1000, 10_000],
      applyRuns: 3,
      pathRuns: 3,
      smallRuns: 500,
      names: 1000,
      cliRuns: 50,
      idleSecs: 10,
    };

const rows: Row[] = [];
const udpRate = (sb: Sandbox, uid: number) => udpRateOf(sb, uid, P.pktRuns, P.pktSecs);
const connRate = (sb: Sandbox, uid: number) => connRateOf(sb, uid, P.pktRuns, P.pktSecs);

async function packetPath(): Promise<void> {
  log(
    "\n== packet path: 16-byte UDP packets per second (iperf3) and new TCP connections per second",
  );
  const sb = await Sandbox.create({
    addresses: [DEST],
    listen: [{ proto: "tcp", host: DEST, port: CONN_PORT }],
    config: { resolvers: [] },
  });
  const iperf = await startIperf(sb);
  try {
    await untrackIperf(sb);
    const none = await udpRate(sb, FIRST_UID);
    const noneConn = await connRate(sb, FIRST_UID);
    log(`   no ruleset: ${fmt(none)} packets/s, ${fmt(noneConn)} connections/s`);
    for (const n of P.sizes) {
      const uid = FIRST_UID + n - 1;
      writePolicies(sb, services(n, EXTRA));
      await ctl(sb, "apply");
      const ours = await udpRate(sb, uid);
      const oursConn = P.connSizes.includes(n) ? await connRate(sb, uid) : null;
      await sb.nft("delete", "table", "inet", "egressd");
      await sb.nftScript(naiveRuleset(n, EXTRA));
      const naive = await udpRate(sb, uid);
      await sb.nft("delete", "table", "inet", "naive");
      log(
        `   ${n} services: egressd ${fmt(ours)} packets/s (${fmt((ours / none) * 100)}% of none), naive ${fmt(naive)} (${fmt((naive / none) * 100)}%)`,
      );
      rows.push({
        section: "Packet path",
        what: `UDP packets/s, ${n.toLocaleString("en-US")} service(s), egressd`,
        value: ours,
        unit: "packets/s",
        baseline: { what: "no ruleset", value: none },
        ratio: ours / none,
        ...(n === Math.max(...P.sizes)
          ? { target: ">= 90% of no ruleset", meets: ours / none >= 0.9 }
          : {}),
      });
      rows.push({
        section: "Packet path",
        what: `UDP packets/s, ${n.toLocaleString("en-US")} service(s), naive one rule per uid and destination`,
        value: naive,
        unit: "packets/s",
        baseline: { what: "no ruleset", value: none },
        ratio: naive / none,
      });
      if (oursConn !== null) {
        rows.push({
          section: "Packet path",
          what: `new TCP connections/s, ${n.toLocaleString("en-US")} service(s), egressd`,
          value: oursConn,
          unit: "conn/s",
          baseline: { what: "no ruleset", value: noneConn },
          ratio: oursConn / noneConn,
        });
      }
    }
  } finally {
    iperf.kill();
    await sb.destroy();
  }
}

// ---------------------------------------------------------------- apply

/** bench/nft-paths.ts inside the namespace: egressd's nft adapters against raw `nft -j -f`. */
async function nftPaths(
  sb: Sandbox,
  ...args: string[]
): Promise<Record<string, number[] | number>> {
  const r = await sb.exec(process.execPath, [
    "--import",
    "tsx",
    join(ROOT, "bench/nft-paths.ts"),
    ...args,
  ]);
  if (r.exitCode !== 0) throw new Error(`nft-paths ${args.join(" ")}: ${r.stderr}`);
  return JSON.parse(r.stdout) as Record<string, number[] | number>;
}

async function apply(): Promise<void> {
  log(
    "\n== apply: the whole table, literal addresses, against nft -j -f of the same JSON; one small transaction",
  );
  const sb = await Sandbox.create({ config: { resolvers: [] } });
  try {
    // egressd's own batch, captured on its way to nft (EGRESSD_NFT forces the program).
    const capture = join(sb.dir, "nft-capture");
    const batchFile = join(sb.dir, "batch.json");
    writeFileSync(
      capture,
      `#!/bin/sh\ncase "$*" in *" -f "*) cp /dev/stdin ${batchFile} ;; esac\nexec nft "$@"\n`,
      { mode: 0o755 },
    );
    for (const n of P.applySizes) {
      writePolicies(sb, services(n));
      const cap = await sb.exec(process.execPath, [EGRESSCTL, ...sb.pathFlags, "apply"], {
        env: { EGRESSD_NFT: capture },
      });
      if (cap.exitCode !== 0) throw new Error(`egressctl apply (capture): ${cap.stderr}`);
      const ours: number[] = [];
      for (let i = 0; i < P.applyRuns; i++) ours.push(await timed(() => ctl(sb, "apply")));
      const paths = await nftPaths(sb, "full", batchFile, String(P.pathRuns));
      const raw = median(paths.raw as number[]);
      const lib = median(paths.libnftables as number[]);
      const exec = median(paths.exec as number[]);
      const m = median(ours);
      const sizes = `${fmt((paths.bytes as number) / 1024)} KiB, ${paths.commands as number} commands`;
      log(
        `   ${n} services (${sizes}): egressd's apply through libnftables ${fmt(lib)} ms, through the nft program ${fmt(exec)} ms, raw nft -j -f ${fmt(raw)} ms (x${fmt(lib / raw)}); egressctl apply ${fmt(m)} ms (x${fmt(m / raw)}); event loop stalled ${fmt(paths.stallWorker as number)} ms`,
      );
      const N = n.toLocaleString("en-US");
      const baseline = { what: "nft -j -f, same JSON", value: raw };
      rows.push(
        {
          section: "Apply",
          what: `full apply, ${N} services: egressd's path (schema check + libnftables in-process)`,
          value: lib,
          unit: "ms",
          baseline,
          ratio: lib / raw,
          target: "<= 1.5x nft -j -f",
          meets: lib / raw <= 1.5,
        },
        {
          section: "Apply",
          what: `full apply, ${N} services: egressd's fallback (schema check + nft program)`,
          value: exec,
          unit: "ms",
          baseline,
          ratio: exec / raw,
        },
        {
          section: "Apply",
          what: `egressctl apply, ${N} services (the whole command: start, read ${N} files, compile, apply)`,
          value: m,
          unit: "ms",
          baseline,
          ratio: m / raw,
        },
        {
          section: "Apply",
          what: `resident memory added by ${P.pathRuns + 1} full applies through libnftables, ${N} services (the context is renewed and the heap trimmed after each)`,
          value: (paths.rssAfter as number) - (paths.rssBefore as number),
          unit: "MiB",
        },
        {
          section: "Apply",
          what: `longest event-loop stall during a full apply, ${N} services (schema check and JSON on the main thread; the kernel call on a worker thread)`,
          value: paths.stallWorker as number,
          unit: "ms",
        },
      );
    }
    // A table of 1,000 sets and nothing else: libnftables re-reads every set after a commit.
    await sb.nft("delete", "table", "inet", "egressd");
    const small = await nftPaths(sb, "small", "1000", String(P.smallRuns));
    const quantiles = (k: string) => {
      const xs = small[k] as number[];
      return { p50: pct(xs, 0.5), p99: pct(xs, 0.99) };
    };
    const lib = quantiles("libnftables");
    const exec = quantiles("exec");
    const raw = quantiles("raw");
    const present = quantiles("libnftablesPresent");
    log(
      `   add one element, 1,000 sets: libnftables p50 ${fmt(lib.p50)} / p99 ${fmt(lib.p99)} ms; nft program (egressd's fallback) ${fmt(exec.p50)} / ${fmt(exec.p99)} ms; raw nft -j -f ${fmt(raw.p50)} / ${fmt(raw.p99)} ms; already present ${fmt(present.p50)} / ${fmt(present.p99)} ms`,
    );
    for (const [q, label] of [
      ["p50", "p50"],
      ["p99", "p99"],
    ] as const) {
      rows.push({
        section: "Small transaction",
        what: `add one element, table of 1,000 sets, ${label}: libnftables in-process`,
        value: lib[q],
        unit: "ms",
        baseline: { what: "nft program (spawn, egressd's fallback)", value: exec[q] },
        ratio: lib[q] / exec[q],
      });
    }
    rows.push(
      {
        section: "Small transaction",
        what: "add one element, table of 1,000 sets, p50: raw nft -j -f (spawn, file written each time)",
        value: raw.p50,
        unit: "ms",
      },
      {
        section: "Small transaction",
        what: "add one element already present, table of 1,000 sets, p50: libnftables",
        value: present.p50,
        unit: "ms",
      },
    );
  } finally {
    await sb.destroy();
  }
}

// ---------------------------------------------------------------- refresh, footprint, CLI

function records(count: number, salt: number): Record<string, { A: string[]; ttl: number }> {
  const out: Record<string, { A: string[]; ttl: number }> = {};
  for (let i = 0; i < count; i++) {
    const k = 2 + (i % 3);
    out[`n${i}.bench.test`] = {
      A: Array.from(
        { length: k },
        (_, j) =>
          `203.0.${113 + (((i * 4 + j + salt) >> 8) % 2)}.${((i * 4 + j + salt) % 254) + 1}`,
      ),
      ttl: 3600,
    };
  }
  return out;
}

function procStat(pid: number): { cpuTicks: number; rssKiB: number } {
  const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  const cpuTicks = Number(fields[11]) + Number(fields[12]);
  const rss = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
  return { cpuTicks, rssKiB: Number(rss?.[1]) };
}

async function daemonSide(): Promise<void> {
  const n = P.names;
  log(
    `\n== daemon: resolve and apply ${n} names, refreshes, footprint, CLI round trip (${n} services)`,
  );
  const sb = await Sandbox.create({
    records: records(n, 0),
    config: { resolvers: ["127.0.0.1:53"] },
  });
  let d: Daemon | null = null;
  try {
    const calls = join(sb.dir, "nft-calls");
    writeFileSync(calls, "");
    const wrapper = join(sb.dir, "nft-counting");
    writeFileSync(wrapper, `#!/bin/sh\necho "$*" >> ${calls}\nexec nft "$@"\n`, { mode: 0o755 });
    const count = () => readFileSync(calls, "utf8").split("\n").filter(Boolean).length;
    const plain = services(n).map((p) => ({ ...p, outbound: [] }));
    writePolicies(sb, plain);
    d = await sb.startDaemon({ EGRESSD_NFT: wrapper });

    // n services, one name each: the reload resolves every new name, then applies.
    writePolicies(
      sb,
      plain.map((p, i) => ({
        ...p,
        outbound: [{ host: `n${i}.bench.test`, ports: "443", protocol: "tcp" as const }],
      })),
    );
    const resolveApply = await timed(() => ctl(sb, "apply"));
    log(`   resolve ${n} names (2-4 addresses each) and apply: ${fmt(resolveApply)} ms`);
    rows.push({
      section: "Refresh",
      what: `resolve ${n} names and apply (daemon)`,
      value: resolveApply,
      unit: "ms",
      target: "< 1 s",
      meets: resolveApply < 1000,
    });

    const c0 = count();
    const noChange = await timed(() => ctl(sb, "refresh"));
    const noChangeCalls = count() - c0;
    log(`   refresh, nothing changed: ${fmt(noChange)} ms, ${noChangeCalls} nft calls`);
    rows.push({
      section: "Refresh",
      what: `re-resolve ${n} names, nothing changed`,
      value: noChange,
      unit: "ms",
    });
    rows.push({
      section: "Refresh",
      what: "nft calls for a refresh that changed nothing",
      value: noChangeCalls,
      unit: "calls",
      target: "0",
      meets: noChangeCalls === 0,
    });

    const changed = records(n, 0);
    const step = Math.max(1, Math.round(n / 100));
    for (let i = 0; i < n; i += step)
      changed[`n${i}.bench.test`] = { A: [`198.51.100.${(i % 250) + 1}`], ttl: 3600 };
    sb.setRecords(changed);
    const c1 = count();
    const onePct = await timed(() => ctl(sb, "refresh"));
    const onePctCalls = count() - c1;
    log(`   refresh, 1% of names changed: ${fmt(onePct)} ms, ${onePctCalls} nft call(s)`);
    rows.push({
      section: "Refresh",
      what: `re-resolve ${n} names, 1% changed`,
      value: onePct,
      unit: "ms",
    });
    rows.push({
      section: "Refresh",
      what: "nft calls for a refresh where 1% changed",
      value: onePctCalls,
      unit: "calls",
      target: "1 (one transaction)",
      meets: onePctCalls === 1,
    });

    const pid = d.child.pid as number;
    const before = procStat(pid);
    await new Promise((r) => setTimeout(r, P.idleSecs * 1000));
    const after = procStat(pid);
    const ticks = Number((await execa("getconf", ["CLK_TCK"])).stdout) || 100;
    const cpuPct = ((after.cpuTicks - before.cpuTicks) / ticks / P.idleSecs) * 100;
    log(`   idle: ${fmt(after.rssKiB / 1024)} MiB resident, ${fmt(cpuPct)}% CPU`);
    rows.push({
      section: "Footprint",
      what: `daemon resident memory, idle, ${n} services and ${n} names`,
      value: after.rssKiB / 1024,
      unit: "MiB",
      target: "< 100 MB",
      meets: after.rssKiB / 1024 < 100,
    });
    rows.push({
      section: "Footprint",
      what: `daemon CPU while idle (${P.idleSecs} s)`,
      value: cpuPct,
      unit: "% of a core",
    });

    const startup: number[] = [];
    for (let i = 0; i < Math.min(P.cliRuns, 20); i++)
      startup.push(await timed(() => sb.egressctl("--version")));
    const rt: number[] = [];
    for (let i = 0; i < P.cliRuns; i++)
      rt.push(
        await timed(() => ctl(sb, "allow", "bench-0", `192.0.2.${(i % 250) + 1}:${1000 + i}`)),
      );
    const m = median(rt);
    log(
      `   egressctl allow with the daemon running: median ${fmt(m)} ms, p95 ${fmt(p95(rt))} ms (egressctl --version: ${fmt(median(startup))} ms)`,
    );
    rows.push({
      section: "CLI",
      what: `egressctl allow round trip, median (${P.cliRuns} runs, ${n} services)`,
      value: m,
      unit: "ms",
      baseline: { what: "egressctl --version", value: median(startup) },
      ratio: m / median(startup),
      target: "< 300 ms",
      meets: m < 300,
    });
    rows.push({
      section: "CLI",
      what: `egressctl allow round trip, p95`,
      value: p95(rt),
      unit: "ms",
    });
  } finally {
    await d?.stop();
    await sb.destroy();
  }
}

// ---------------------------------------------------------------- report

async function machine(): Promise<string[]> {
  const v = async (cmd: string, args: string[]) =>
    (await execa(cmd, args, { reject: false })).stdout.split("\n")[0] ?? "";
  return [
    `- date: ${new Date().toISOString().slice(0, 16).replace("T", " ")} UTC; mode: ${quick ? "quick" : "full"}`,
    `- machine: ${cpus()[0]?.model ?? "?"}, ${cpus().length} cores, ${Math.round(totalmem() / 2 ** 30)} GiB`,
    `- kernel: ${await v("uname", ["-r"])}; ${await v("nft", ["--version"])}; Node.js ${process.version}; ${await v("iperf3", ["--version"])}; ${(await v("dnsmasq", ["--version"])).replace(/^Dnsmasq version (\S+).*/, "dnsmasq $1")}; libnftables ${await v("sh", ["-c", "dpkg-query -W -f '${Version}' libnftables1 2>/dev/null || rpm -q --qf '%{VERSION}' nftables-libs 2>/dev/null"])}`,
  ];
}

function table(): string[] {
  const out: string[] = [];
  for (const section of [...new Set(rows.map((r) => r.section))]) {
    out.push(
      "",
      `### ${section}`,
      "",
      "| figure | value | baseline (same run) | ratio or added | target | met |",
      "|---|---|---|---|---|---|",
    );
    for (const r of rows.filter((x) => x.section === section)) {
      out.push(
        `| ${r.what} | ${fmt(r.value)} ${r.unit} | ${r.baseline ? `${r.baseline.what}: ${fmt(r.baseline.value)}` : ""} | ${r.added !== undefined ? `${r.added < 0 ? "" : "+"}${fmt(r.added)} ${r.unit}` : r.ratio !== undefined ? fmt(r.ratio) : ""} | ${r.target ?? ""} | ${r.meets === undefined ? "" : r.meets ? "yes" : "**no**"} |`,
      );
    }
  }
  return out;
}

const started = Date.now();
// --only NAME[,NAME]: run those sections alone (while working on them); the report then goes to
// dist/bench/, never over docs/performance.md.
const onlyArg = process.argv.indexOf("--only");
const only = onlyArg === -1 ? null : (process.argv[onlyArg + 1] ?? "").split(",");
// --profile DIR: a CPU profile of the daemon during the DNS-aware latency workloads.
const profileArg = process.argv.indexOf("--profile");
const profile = profileArg === -1 ? undefined : process.argv[profileArg + 1];
// --dns-services N: the DNS-aware section with N services instead of 1,000 (100 when quick).
const dnsServicesArg = process.argv.indexOf("--dns-services");
const dnsServices = dnsServicesArg === -1 ? undefined : Number(process.argv[dnsServicesArg + 1]);
const sections: [string, () => Promise<void>][] = [
  ["packet", packetPath],
  ["apply", apply],
  ["daemon", daemonSide],
  [
    "dns",
    () =>
      dnsAware({
        quick,
        rows,
        ...(profile ? { profile } : {}),
        ...(dnsServices ? { services: dnsServices } : {}),
      }),
  ],
];
for (const [name, run] of sections) if (!only || only.includes(name)) await run();
const report = [
  "# Performance",
  "",
  `Generated by \`npm run bench${quick ? " -- --quick" : ""}\` (bench/run.ts). Every figure is the median of several runs (packet path: ${P.pktRuns} runs of ${P.pktSecs} s; apply: ${P.applyRuns}; CLI: ${P.cliRuns}), measured in throwaway network namespaces next to its baseline in the same run; the DNS-aware mode's latencies are percentiles over every query, "added" being the same percentile minus the resolver's asked directly. Ratios are figure / baseline.`,
  "",
  ...(await machine()),
  ...table(),
  "",
];
const target = only
  ? join(ROOT, `dist/bench/performance-${only.join("-")}.md`)
  : quick
    ? join(ROOT, "dist/bench/performance-quick.md")
    : join(ROOT, "docs/performance.md");
mkdirSync(join(target, ".."), { recursive: true });
const notes = quick || only ? "" : readNotes();
writeFileSync(target, report.join("\n") + notes);
log(
  `\n${table().join("\n")}\n\nwrote ${target.replace(ROOT + "/", "")} in ${Math.round((Date.now() - started) / 1000)} s`,
);

/** Hand-written analysis kept below the generated part of docs/performance.md. */
function readNotes(): string {
  try {
    const old = readFileSync(join(ROOT, "docs/performance.md"), "utf8");
    const i = old.indexOf("\n## Analysis");
    return i === -1 ? "" : old.slice(i);
  } catch {
    return "";
  }
}
