/**
 * System-test sandbox: two throwaway network namespaces joined by a veth pair. The "host"
 * (`ns`) is where egressd, its services and the DNS server on 127.0.0.1:53 run; it owns the
 * addresses in HOST_ADDRESSES and nothing else. The "internet" (`netNs`) holds the
 * documentation-range addresses the tests reach, on its loopback, and the servers on them.
 * Keeping them apart matters: egressd never allows a DNS answer that is one of the host's own
 * addresses, so the fake internet must not be the host. Helpers run egressctl, nft and probes
 * (under test uids) on the host, and clients on the internet side.
 */
import { spawn, type ChildProcess } from "node:child_process";
import {
  chmodSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  writeFileSync,
  renameSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";
import { execa } from "execa";
import { DAEMON_NODE_FLAGS } from "../../agent/paths.ts";

export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
export const EGRESSCTL = join(ROOT, "dist/egressctl.js");
export const EGRESSD = join(ROOT, "dist/egressd.js");

let fixtureDir: string | null = null;

/** Bundles a TypeScript entry into one ES module a plain `node` runs (for test uids). */
export async function bundleScript(entry: string, outfile: string): Promise<void> {
  await build({
    entryPoints: [entry],
    outfile,
    bundle: true,
    platform: "node",
    format: "esm",
    target: "node20",
    banner: {
      js: "import { createRequire as __r } from 'node:module'; const require = __r(import.meta.url);",
    },
    logLevel: "error",
  });
}

/** Bundles the peer and probe fixtures once into a world-readable temp dir (test uids run them). */
export async function fixtures(): Promise<{ peer: string; probe: string }> {
  if (!fixtureDir) {
    const dir = mkdtempSync(join(tmpdir(), "egressd-fixtures-"));
    chmodSync(dir, 0o755);
    // Shared by every sandbox of the run: removed when the test process ends.
    process.once("exit", () => rmSync(dir, { recursive: true, force: true }));
    for (const name of ["peer", "probe"])
      await bundleScript(join(ROOT, `test/fixtures/${name}.ts`), join(dir, `${name}.mjs`));
    fixtureDir = dir;
  }
  return { peer: join(fixtureDir, "peer.mjs"), probe: join(fixtureDir, "probe.mjs") };
}

export interface Listen {
  proto: "tcp" | "udp" | "tcp-echo";
  host: string;
  port: number;
}

type Rcode = "NXDOMAIN" | "SERVFAIL" | "REFUSED" | "DROP";
/** What the test DNS server answers; see test/fixtures/peer.ts. */
export type Records = Record<
  string,
  {
    A?: string[];
    AAAA?: string[];
    CNAME?: string;
    ttl?: number;
    rcode?: Rcode;
    rcodes?: { A?: Rcode; AAAA?: Rcode };
    truncate?: boolean;
    tcp?: "stall";
    /** Answer with one address of the list per query, the next one each time. */
    rotate?: boolean;
    /** An HTTPS record (type 65) with these address hints. */
    HTTPS?: { ipv4hint?: string[]; ipv6hint?: string[] };
    TXT?: string;
  }
>;

/** One thing test/fixtures/probe.ts tries; see there for what each answers. */
export interface Attempt {
  proto: "tcp" | "udp" | "dns" | "tcp-rate" | "lookup" | "resolve" | "resolve-connect" | "hold";
  host: string;
  port: number;
  name?: string;
  /** Local address to connect from. */
  source?: string;
  timeoutMs?: number;
  /** resolve, resolve-connect: the record type (A by default) and transport (udp by default). */
  qtype?: "A" | "AAAA" | "HTTPS" | "TXT";
  transport?: "udp" | "tcp";
  /** resolve: the local port to send from (the same flow each time). */
  sourcePort?: number;
  /** resolve-connect: the port to connect to on the answer, and how many rounds. */
  connectPort?: number;
  count?: number;
  /** hold: how long to keep the connection open before checking it still carries data. */
  holdMs?: number;
}

export interface ProbeResult {
  proto: string;
  host: string;
  port: number;
  result: string;
  ms: number;
}

let counter = 0;

/** The host's own addresses (on its loopback), besides the link addresses of its veth. */
export const HOST_ADDRESSES = { v4: "203.0.113.1", v6: "2001:db8:ffff::1" } as const;
/** The point-to-point link between host and internet. */
export const LINK = {
  host4: "10.254.0.1",
  net4: "10.254.0.2",
  host6: "fd00:254::1",
  net6: "fd00:254::2",
} as const;

const isLoopback = (host: string) => host.startsWith("127.") || host === "::1";

export class Sandbox {
  private readonly peers: ChildProcess[] = [];
  private readonly daemons: Daemon[] = [];
  private readonly servers: ChildProcess[] = [];
  readonly configDir: string;
  readonly stateDir: string;
  readonly recordsFile: string;

  /** The fake internet's namespace. */
  readonly netNs: string;

  private constructor(
    readonly ns: string,
    readonly dir: string,
  ) {
    this.netNs = `${ns}-n`;
    this.configDir = join(dir, "etc");
    this.stateDir = join(dir, "state");
    this.recordsFile = join(dir, "records.json");
  }

  /**
   * A fresh host and internet, `addresses` on the internet's loopback with servers on
   * `listen` (loopback ones on the host), and a DNS server on the host's 127.0.0.1:53.
   */
  static async create(
    opts: { addresses?: string[]; listen?: Listen[]; records?: Records; config?: object } = {},
  ): Promise<Sandbox> {
    const ns = `egt-${process.pid}-${++counter}`;
    const dir = mkdtempSync(join(tmpdir(), `${ns}-`));
    chmodSync(dir, 0o755);
    const sb = new Sandbox(ns, dir);
    try {
      await sb.link();
      for (const a of opts.addresses ?? []) await sb.addAddress(sb.netNs, a);
      sb.setRecords(opts.records ?? {});
      sb.writeConfig(opts.config ?? { resolvers: ["127.0.0.1:53"] });
      const listen = opts.listen ?? [];
      await sb.startPeer(
        sb.netNs,
        listen.filter((l) => !isLoopback(l.host)),
        false,
      );
      await sb.startPeer(
        sb.ns,
        listen.filter((l) => isLoopback(l.host)),
        true,
      );
    } catch (err) {
      await sb.destroy();
      throw err;
    }
    return sb;
  }

  /** Both namespaces, the veth between them, addresses and routes. */
  private async link(): Promise<void> {
    const { ns, netNs } = this;
    for (const n of [ns, netNs]) {
      await execa("ip", ["netns", "add", n]);
      await execa("ip", ["-n", n, "link", "set", "lo", "up"]);
      // No duplicate address detection: addresses are usable at once.
      await execa("ip", [
        "netns",
        "exec",
        n,
        "sysctl",
        "-qw",
        "net.ipv6.conf.all.accept_dad=0",
        "net.ipv6.conf.default.accept_dad=0",
      ]);
    }
    await execa("ip", [
      "-n",
      ns,
      "link",
      "add",
      "veth0",
      "type",
      "veth",
      "peer",
      "name",
      "veth1",
      "netns",
      netNs,
    ]);
    const h = (...a: string[]) => execa("ip", ["-n", ns, ...a]);
    const n = (...a: string[]) => execa("ip", ["-n", netNs, ...a]);
    await h("addr", "add", `${LINK.host4}/30`, "dev", "veth0");
    await h("addr", "add", `${LINK.host6}/64`, "dev", "veth0", "nodad");
    await n("addr", "add", `${LINK.net4}/30`, "dev", "veth1");
    await n("addr", "add", `${LINK.net6}/64`, "dev", "veth1", "nodad");
    await h("link", "set", "veth0", "up");
    await n("link", "set", "veth1", "up");
    await h("route", "add", "default", "via", LINK.net4);
    await h("-6", "route", "add", "default", "via", LINK.net6);
    await this.addAddress(ns, HOST_ADDRESSES.v4);
    await this.addAddress(ns, HOST_ADDRESSES.v6);
    await n("route", "add", `${HOST_ADDRESSES.v4}/32`, "via", LINK.host4);
    await n("-6", "route", "add", `${HOST_ADDRESSES.v6}/128`, "via", LINK.host6);
  }

  private async addAddress(ns: string, a: string): Promise<void> {
    const v6 = a.includes(":");
    await execa("ip", [
      "-n",
      ns,
      "addr",
      "add",
      `${a}/${v6 ? 128 : 32}`,
      "dev",
      "lo",
      ...(v6 ? ["nodad"] : []),
    ]);
  }

  /** `ip` on the host. */
  ip(...args: string[]) {
    return execa("ip", ["-n", this.ns, ...args]);
  }

  /** Runs a command on the host. */
  exec(
    cmd: string,
    args: readonly string[],
    opts: { input?: string; env?: Record<string, string>; timeoutMs?: number } = {},
  ) {
    return this.execIn(this.ns, cmd, args, opts);
  }

  /** Runs a command on the internet side. */
  netExec(cmd: string, args: readonly string[]) {
    return this.execIn(this.netNs, cmd, args, {});
  }

  private execIn(
    ns: string,
    cmd: string,
    args: readonly string[],
    opts: { input?: string; env?: Record<string, string>; timeoutMs?: number },
  ) {
    return execa("ip", ["netns", "exec", ns, cmd, ...args], {
      reject: false,
      timeout: opts.timeoutMs ?? 120_000,
      ...(opts.input !== undefined ? { input: opts.input } : { stdin: "ignore" as const }),
      ...(opts.env ? { env: opts.env } : {}),
    });
  }

  get socket(): string {
    return join(this.dir, "egressd.sock");
  }

  /** The path flags that point egressctl and egressd at this sandbox. */
  get pathFlags(): string[] {
    return ["--config-dir", this.configDir, "--state-dir", this.stateDir, "--socket", this.socket];
  }

  /** Runs egressctl inside the namespace against this sandbox's config dir and socket. */
  egressctl(...args: string[]) {
    return this.exec(process.execPath, [EGRESSCTL, ...this.pathFlags, ...args]);
  }

  /** Runs egressctl and returns its stdout; throws (naming the command and output) unless it exits 0. */
  async ok(...args: string[]): Promise<string> {
    const r = await this.egressctl(...args);
    if (r.exitCode !== 0)
      throw new Error(
        `egressctl ${args.join(" ")} exited ${r.exitCode}:\n${r.stdout}\n${r.stderr}`,
      );
    return r.stdout;
  }

  /**
   * Starts egressd (the daemon) inside the namespace; resolves once it enforces its table
   * (or, with until "socket", once its control socket answers).
   * `as` runs it as an unprivileged uid holding only CAP_NET_ADMIN, as the systemd unit does.
   */
  async startDaemon(
    env: Record<string, string> = {},
    as?: number,
    until: "ready" | "socket" = "ready",
  ): Promise<Daemon> {
    const drop =
      as === undefined
        ? []
        : [
            "setpriv",
            `--reuid=${as}`,
            `--regid=${as}`,
            "--clear-groups",
            "--inh-caps=-all,+net_admin",
            "--ambient-caps=-all,+net_admin",
            "--bounding-set=-all,+net_admin",
          ];
    const child = spawn(
      "ip",
      [
        "netns",
        "exec",
        this.ns,
        ...drop,
        process.execPath,
        ...DAEMON_NODE_FLAGS,
        EGRESSD,
        ...this.pathFlags,
      ],

      // Its temp dir (the nft program's batch dir, egressd-UID, when EGRESSD_NFT is set) is
      // the sandbox's, so it goes with the sandbox.
      {
        stdio: ["ignore", "pipe", "pipe"],
        env: { ...process.env, TMPDIR: this.daemonTmp(), ...env },
      },
    );
    const d = new Daemon(child);
    this.daemons.push(d);
    // "ready": the table is in the kernel (what systemd's READY=1 says); "socket": the control
    // socket answers, start-up may still be under way.
    await d.waitFor(
      (l) => l.msg === (until === "ready" ? "ready" : "control socket ready"),
      30_000,
    );
    return d;
  }

  /** A world-writable temp dir inside the sandbox (like /tmp), for its daemons. */
  private daemonTmp(): string {
    const dir = join(this.dir, "daemon-tmp");
    if (!existsSync(dir)) {
      mkdirSync(dir);
      chmodSync(dir, 0o1777);
    }
    return dir;
  }

  async nft(...args: string[]): Promise<string> {
    const r = await this.exec("nft", args);
    if (r.exitCode !== 0) throw new Error(`nft ${args.join(" ")}: ${r.stderr}`);
    return r.stdout;
  }

  /** A program that runs nft inside this namespace: for calling agent modules directly. */
  nftWrapper(): string {
    const file = join(this.dir, "nft-in-ns");
    writeFileSync(file, `#!/bin/sh\nexec ip netns exec ${this.ns} nft "$@"\n`, { mode: 0o755 });
    return file;
  }

  /** Loads an nft script (text syntax) inside the namespace. */
  async nftScript(text: string): Promise<void> {
    const file = join(this.dir, `script-${++counter}.nft`);
    writeFileSync(file, text);
    await this.nft("-f", file);
  }

  async nftJson(
    ...args: string[]
  ): Promise<{ nftables: Record<string, Record<string, unknown>>[] }> {
    return JSON.parse(await this.nft("-j", ...args)) as {
      nftables: Record<string, Record<string, unknown>>[];
    };
  }

  /** Tries connections as `uid` from the host. */
  probe(uid: number, attempts: Attempt[], gid = uid): Promise<ProbeResult[]> {
    return this.probeIn(this.ns, uid, attempts, gid);
  }

  /** Tries connections as `uid` from the internet side (clients of the host's services). */
  probeFrom(uid: number, attempts: Attempt[]): Promise<ProbeResult[]> {
    return this.probeIn(this.netNs, uid, attempts, uid);
  }

  private async probeIn(
    ns: string,
    uid: number,
    attempts: Attempt[],
    gid: number,
  ): Promise<ProbeResult[]> {
    const { probe } = await fixtures();
    const r = await this.execIn(
      ns,
      "setpriv",
      [
        `--reuid=${uid}`,
        `--regid=${gid}`,
        "--clear-groups",
        process.execPath,
        probe,
        JSON.stringify(attempts),
      ],
      {},
    );
    if (r.exitCode !== 0) throw new Error(`probe failed: ${r.stderr}`);
    return JSON.parse(r.stdout) as ProbeResult[];
  }

  /** One probe's result string. */
  async try1(uid: number, proto: "tcp" | "udp", host: string, port: number): Promise<string> {
    const [r] = await this.probe(uid, [{ proto, host, port }]);
    return r?.result ?? "none";
  }

  get dnsLogFile(): string {
    return join(this.dir, "dns-queries.log");
  }

  /** Every question the DNS server was asked so far: "name TYPE" lines. */
  dnsLog(): string[] {
    try {
      return readFileSync(this.dnsLogFile, "utf8").trim().split("\n").filter(Boolean);
    } catch {
      return [];
    }
  }

  setRecords(records: Records): void {
    const tmp = `${this.recordsFile}.tmp`;
    writeFileSync(tmp, JSON.stringify(records));
    renameSync(tmp, this.recordsFile);
  }

  writeConfig(config: object): void {
    mkdirSync(this.configDir, { recursive: true });
    writeFileSync(join(this.configDir, "egressd.json"), JSON.stringify(config, null, 2));
  }

  servicesFile(name: string): string {
    return join(this.configDir, "services.d", `${name}.json`);
  }

  readService(name: string): string {
    return readFileSync(this.servicesFile(name), "utf8");
  }

  /** Servers running as `uid` (TCP greets, UDP echoes); stopped with the sandbox. */
  async serveAs(uid: number, listen: Listen[]): Promise<void> {
    const { peer } = await fixtures();
    const setpriv = ["setpriv", `--reuid=${uid}`, `--regid=${uid}`, "--clear-groups"];
    const child = spawn(
      "ip",
      ["netns", "exec", this.ns, ...setpriv, process.execPath, peer, JSON.stringify({ listen })],
      {
        stdio: ["pipe", "pipe", "inherit"],
      },
    );
    this.servers.push(child);
    await ready(child);
  }

  /** Servers on `listen` in `ns`, and the DNS server when `dns` (the host's 127.0.0.1:53). */
  private async startPeer(ns: string, listen: Listen[], dns: boolean): Promise<void> {
    if (!listen.length && !dns) return;
    const { peer } = await fixtures();
    const spec = {
      listen,
      ...(dns
        ? { dns: { host: "127.0.0.1", port: 53, records: this.recordsFile, log: this.dnsLogFile } }
        : {}),
    };
    const child = spawn("ip", ["netns", "exec", ns, process.execPath, peer, JSON.stringify(spec)], {
      stdio: ["pipe", "pipe", "inherit"],
    });
    this.peers.push(child);
    await ready(child);
  }

  async destroy(): Promise<void> {
    for (const d of this.daemons) await d.stop("SIGKILL");
    for (const c of this.servers) c.kill("SIGKILL");
    for (const peer of this.peers) {
      if (peer.exitCode !== null) continue;
      const exited = new Promise((r) => peer.once("exit", r));
      peer.kill("SIGTERM");
      await Promise.race([exited, new Promise((r) => setTimeout(r, 2000))]);
    }
    for (const n of [this.ns, this.netNs])
      await execa("ip", ["netns", "delete", n], { reject: false });
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** Waits for a fixture's "ready" line. */
function ready(child: ChildProcess): Promise<void> {
  return new Promise<void>((resolveReady, reject) => {
    const timer = setTimeout(() => reject(new Error("fixture did not start within 10 s")), 10_000);
    child.stdout?.on("data", (d: Buffer) => {
      if (d.toString().includes("ready")) {
        clearTimeout(timer);
        resolveReady();
      }
    });
    child.on("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`fixture exited with ${String(code)}`));
    });
  });
}

export interface LogLine {
  level: number;
  msg: string;
  [key: string]: unknown;
}

/** A running egressd: its JSON log lines, and ways to wait for them or stop it. */
export class Daemon {
  readonly lines: LogLine[] = [];
  stderr = "";
  private waiters: { pred: (l: LogLine) => boolean; resolve: (l: LogLine) => void }[] = [];
  readonly exited: Promise<number | null>;

  constructor(readonly child: ChildProcess) {
    let buf = "";
    child.stdout?.setEncoding("utf8");
    child.stdout?.on("data", (d: string) => {
      buf += d;
      let nl;
      while ((nl = buf.indexOf("\n")) !== -1) {
        const text = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        let line: LogLine;
        try {
          line = JSON.parse(text) as LogLine;
        } catch {
          line = { level: 0, msg: text };
        }
        this.lines.push(line);
        this.waiters = this.waiters.filter((w) => (w.pred(line) ? (w.resolve(line), false) : true));
      }
    });
    child.stderr?.setEncoding("utf8");
    child.stderr?.on("data", (d: string) => (this.stderr += d));
    this.exited = new Promise((r) => child.once("exit", (code) => r(code)));
  }

  /** The first log line (already seen or yet to come) that matches, or an error after `ms`. */
  waitFor(pred: (l: LogLine) => boolean, ms = 20_000): Promise<LogLine> {
    const seen = this.lines.find(pred);
    if (seen) return Promise.resolve(seen);
    return new Promise((resolve, reject) => {
      const dump = () => `${this.lines.map((l) => JSON.stringify(l)).join("\n")}\n${this.stderr}`;
      const timer = setTimeout(() => {
        this.waiters = this.waiters.filter((w) => w.resolve !== done);
        reject(new Error(`egressd log line not seen within ${ms} ms; log:\n${dump()}`));
      }, ms);
      const done = (l: LogLine) => {
        clearTimeout(timer);
        resolve(l);
      };
      this.waiters.push({ pred, resolve: done });
      void this.exited.then((code) => {
        if (this.waiters.some((w) => w.resolve === done)) {
          clearTimeout(timer);
          reject(new Error(`egressd exited (${code}) first; log:\n${dump()}`));
        }
      });
    });
  }

  async stop(signal: NodeJS.Signals = "SIGTERM"): Promise<number | null> {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill(signal);
    return Promise.race([this.exited, new Promise<null>((r) => setTimeout(() => r(null), 5000))]);
  }
}

/** Polls `fn` until it returns true or `ms` pass (an upper bound against hangs, not a timing assertion). */
export async function eventually(
  fn: () => Promise<boolean>,
  ms: number,
  what: string,
): Promise<void> {
  const end = Date.now() + ms;
  for (;;) {
    if (await fn()) return;
    if (Date.now() > end) throw new Error(`not within ${ms} ms: ${what}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

/** Runs `fn` with a fresh sandbox and always tears it down. */
export async function withSandbox<T>(
  opts: Parameters<typeof Sandbox.create>[0],
  fn: (sb: Sandbox) => Promise<T>,
): Promise<T> {
  const sb = await Sandbox.create(opts);
  try {
    return await fn(sb);
  } finally {
    await sb.destroy();
  }
}
