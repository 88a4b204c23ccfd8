/** What the benchmark files share: report rows, statistics, and the sandbox helpers they all use. */
import { spawn, type ChildProcess } from "node:child_process";
import { mkdirSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { serviceToJSON, type ServicePolicy } from "../rules/policy.ts";
import type { Sandbox } from "../test/helpers/sandbox.ts";

export interface Row {
  section: string;
  what: string;
  value: number;
  unit: string;
  /** Shown instead of the number (a yes/no figure, e.g. "kept" or "reset"). */
  text?: string;
  baseline?: { what: string; value: number };
  /** value / baseline, or baseline / value when lower is better (so above 1 is worse). */
  ratio?: number;
  /** value - baseline, shown instead of a ratio where the difference is the figure (latency added). */
  added?: number;
  target?: string;
  meets?: boolean;
}

export const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? (s[m] as number) : ((s[m - 1] as number) + (s[m] as number)) / 2;
};
export const pct = (xs: number[], p: number) =>
  [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.ceil(xs.length * p) - 1)] as number;
export const p95 = (xs: number[]) => pct(xs, 0.95);
export const fmt = (n: number) =>
  n >= 100 ? Math.round(n).toLocaleString("en-US") : n >= 10 ? n.toFixed(1) : n.toFixed(2);
export const log = (s: string) => process.stdout.write(`${s}\n`);

export async function timed(fn: () => Promise<unknown>): Promise<number> {
  const t0 = performance.now();
  await fn();
  return performance.now() - t0;
}

/** Writes policy files directly (the store's fsync per file is not what is being measured). */
export function writePolicies(sb: Sandbox, list: readonly ServicePolicy[]): void {
  const dir = join(sb.configDir, "services.d");
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  for (const p of list) writeFileSync(join(dir, `${p.name}.json`), serviceToJSON(p));
}

export async function ctl(sb: Sandbox, ...args: string[]): Promise<void> {
  const r = await sb.egressctl(...args);
  if (r.exitCode !== 0) throw new Error(`egressctl ${args.join(" ")}: ${r.stderr}`);
}

// ---------------------------------------------------------------- packet path

export const DEST = "192.0.2.10";
export const IPERF_PORT = 5201;
export const CONN_PORT = 8080;
/** The destinations the packet-path measurements use; the last service of a workload reaches them. */
export const EXTRA = [
  { host: DEST, port: IPERF_PORT },
  { host: DEST, port: CONN_PORT },
];

/**
 * Makes the iperf3 UDP stream untracked, in every configuration: otherwise its packets would be
 * "established" after iperf3's handshake and accepted by the first rule, whatever the ruleset.
 * Untracked, every packet walks the uid dispatch (or the naive rule list).
 */
export async function untrackIperf(sb: Sandbox): Promise<void> {
  await sb.nftScript(
    "table inet bench_notrack {\n chain out {\n  type filter hook output priority raw; policy accept;\n  udp dport " +
      IPERF_PORT +
      " notrack\n  udp sport " +
      IPERF_PORT +
      " notrack\n }\n}\n",
  );
}

/** 16-byte UDP packets per second sent by `uid` to DEST (iperf3), the median of `runs`. */
export async function udpRate(
  sb: Sandbox,
  uid: number,
  runs: number,
  secs: number,
): Promise<number> {
  const rates: number[] = [];
  for (let i = 0; i < runs; i++) {
    const r = await sb.exec("setpriv", [
      `--reuid=${uid}`,
      `--regid=${uid}`,
      "--clear-groups",
      "iperf3",
      "-c",
      DEST,
      "-p",
      String(IPERF_PORT),
      "-u",
      "-l",
      "16",
      "-b",
      "0",
      "-t",
      String(secs),
      "--json",
    ]);
    const j = JSON.parse(r.stdout) as {
      end?: { sum?: { packets: number; seconds: number } };
      error?: string;
    };
    if (!j.end?.sum) throw new Error(`iperf3 as uid ${uid}: ${j.error ?? r.stderr}`);
    rates.push(j.end.sum.packets / j.end.sum.seconds);
  }
  return median(rates);
}

/** New TCP connections per second opened by `uid` to DEST, the median of `runs`. */
export async function connRate(
  sb: Sandbox,
  uid: number,
  runs: number,
  secs: number,
): Promise<number> {
  const rates: number[] = [];
  for (let i = 0; i < runs; i++) {
    const [r] = await sb.probe(uid, [
      { proto: "tcp-rate", host: DEST, port: CONN_PORT, timeoutMs: secs * 1000 },
    ]);
    const m = /^rate:(\d+)$/.exec(r?.result ?? "");
    if (!m) throw new Error(`connection rate as uid ${uid}: ${r?.result}`);
    rates.push(Number(m[1]));
  }
  return median(rates);
}

/** iperf3's server on DEST in the internet namespace; kill it when done. */
export async function startIperf(sb: Sandbox): Promise<ChildProcess> {
  const iperf = spawn(
    "ip",
    ["netns", "exec", sb.netNs, "iperf3", "-s", "-B", DEST, "-p", String(IPERF_PORT)],
    { stdio: "ignore" },
  );
  await new Promise((r) => setTimeout(r, 500));
  return iperf;
}
