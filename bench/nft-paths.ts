/**
 * Runs inside a benchmark namespace (`ip netns exec NS node --import tsx bench/nft-paths.ts`):
 * times egressd's ways into the kernel against raw `nft -j -f`, and prints one JSON object.
 *   full <batch.json> <runs> <egressd.js>   replace the whole table: the daemon's way (libnftables
 *                              in a helper process, egressd's bundle run with --nft-helper), the
 *                              libnftables adapter in this process (one-shot egressctl), the nft
 *                              adapter, raw nft
 *   small <sets> <runs>        one `add element` in a table of <sets> sets, each way
 * Also reports how long the event loop stood still during a full apply, by call mode.
 */
import { execFileSync } from "node:child_process";
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { tmpdir } from "node:os";
import { monitorEventLoopDelay } from "node:perf_hooks";
import type { Batch } from "../rules/batch.ts";
import { libnftables } from "../agent/nft/libnftables.ffi.ts";
import { execNft } from "../agent/nft/nft.exec.ts";
import { helperNft } from "../agent/nft/helper.proc.ts";

const [mode, arg, runsText] = process.argv.slice(2);
const runs = Number(runsText ?? 5);

async function times(n: number, fn: (i: number) => Promise<unknown> | unknown): Promise<number[]> {
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    const t0 = performance.now();
    await fn(i);
    out.push(performance.now() - t0);
  }
  return out;
}

/** The longest stretch (ms) the event loop could not run a timer while `fn` ran. */
async function stall(fn: () => Promise<unknown>): Promise<number> {
  const h = monitorEventLoopDelay({ resolution: 1 });
  h.enable();
  await fn();
  await new Promise((r) => setTimeout(r, 5));
  h.disable();
  return h.max / 1e6;
}

const raw = (file: string) => execFileSync("nft", ["-j", "-f", file], { stdio: "ignore" });
const lib = libnftables();
const exec = execNft("nft");
const result: Record<string, unknown> = {};

if (mode === "full") {
  const file = arg as string;
  const batch = JSON.parse(readFileSync(file, "utf8")) as Batch;
  result.bytes = Buffer.byteLength(JSON.stringify(batch));
  result.commands = batch.nftables.length;
  const rss = () => process.memoryUsage().rss / 2 ** 20;
  result.rssBefore = rss();
  await lib.apply(batch); // warm: the table exists from here on, as in a real replace
  result.libnftables = await times(runs, () => lib.apply(batch));
  result.rssAfter = rss();
  // The daemon's own path: the batch goes over IPC (JSON) to its helper process, which checks
  // the schema and calls libnftables. Warmed by one apply (starts the helper).
  const helper = helperNft(process.argv[5] as string);
  await helper.apply(batch);
  result.helper = await times(runs, () => helper.apply(batch));
  helper.close();
  result.exec = await times(runs, () => exec.apply(batch));
  result.raw = await times(runs, () => raw(file));
  result.stallWorker = await stall(() => lib.apply(batch));
} else if (mode === "small") {
  const sets = Number(arg);
  const t = { family: "inet", table: "bench_small" };
  const cmds: Batch["nftables"] = [
    { add: { table: { family: "inet", name: "bench_small" } } },
    { delete: { table: { family: "inet", name: "bench_small" } } },
    { add: { table: { family: "inet", name: "bench_small" } } },
  ];
  for (let s = 0; s < sets; s++) {
    cmds.push({
      add: {
        set: {
          ...t,
          name: `s${s}`,
          type: ["ipv4_addr", "inet_proto", "inet_service"],
          flags: ["interval"],
          elem: [{ concat: [`198.51.100.${(s % 250) + 1}`, "tcp", 443] }],
        },
      },
    });
  }
  await lib.apply({ nftables: cmds });
  const add = (i: number): Batch => ({
    nftables: [
      {
        add: {
          element: {
            ...t,
            name: `s${i % sets}`,
            elem: [{ concat: [`10.${(i >> 16) & 255}.${(i >> 8) & 255}.${i & 255}`, "tcp", 443] }],
          },
        },
      },
    ],
  });
  const file = join(tmpdir(), `egressd-bench-small-${process.pid}.json`);
  result.libnftables = await times(runs, (i) => lib.apply(add(i)));
  result.exec = await times(runs, (i) => exec.apply(add(runs + i)));
  result.raw = await times(runs, (i) => {
    writeFileSync(file, JSON.stringify(add(2 * runs + i)));
    raw(file);
  });
  result.libnftablesPresent = await times(runs, (i) => lib.apply(add(i)));
  rmSync(file, { force: true });
}
lib.close();
process.stdout.write(JSON.stringify(result) + "\n");
