/**
 * A Daemon with every effect faked (nft, DNS, clock, proxies, users), for unit tests: the
 * config and state dirs are real temp dirs, everything else is in memory and inspectable.
 */
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pino } from "pino";
import type { Resolution, Resolver } from "../../agent/dns/dns.client.ts";
import type { LookedUpName, ProxyService, ProxyStats } from "../../agent/dns/proxy.sock.ts";
import { Daemon, type Proxies } from "../../agent/daemon.ts";
import type { Nft } from "../../agent/nft/nft.exec.ts";
import { PolicyStore } from "../../agent/store/policy-store.fs.ts";
import { StateStore } from "../../agent/store/state.fs.ts";
import type { Users } from "../../agent/users.sys.ts";
import type { Batch } from "../../rules/batch.ts";
import { validateConfig, validateService } from "../../rules/policy.ts";
import type { Ruleset } from "../../rules/ruleset.ts";

/** The listing `nft -j list table` would print for `r` at `now` (the inverse of parseLive). */
export function listing(r: Ruleset, now: number): unknown {
  const t = { family: r.family, table: r.table };
  const out: unknown[] = [{ table: { family: r.family, name: r.table } }];
  for (const name of r.counters) out.push({ counter: { ...t, name, packets: 0, bytes: 0 } });
  for (const s of r.sets) {
    const elem = s.elem.map((e) => {
      const until = typeof e === "string" ? s.expires?.[e] : undefined;
      return until === undefined
        ? e
        : { elem: { val: e, timeout: 60, expires: Math.floor((until - now) / 1000) } };
    });
    out.push({
      [s.map ? "map" : "set"]: {
        ...t,
        name: s.name,
        type: s.type,
        ...(s.map ? { map: s.map } : {}),
        ...(s.flags?.length ? { flags: s.flags } : {}),
        ...(s.dynamic
          ? {
              size: s.dynamic.size,
              timeout: s.dynamic.timeoutSeconds,
              stmt: [{ counter: null }],
            }
          : {}),
        ...(elem.length ? { elem } : {}),
      },
    });
  }
  for (const c of r.chains) out.push({ chain: { ...t, name: c.name, ...(c.base ?? {}) } });
  for (const c of r.chains)
    for (const expr of c.rules) out.push({ rule: { ...t, chain: c.name, expr } });
  return { nftables: out };
}

/** nft that records batches; `hold()` makes the next applies wait until released; `fail` refuses. */
export class FakeNft implements Nft {
  readonly backend = "nft" as const;
  readonly detail = "fake";
  readonly batches: Batch[] = [];
  inFlight = 0;
  maxInFlight = 0;
  fail = false;
  /** What listTable returns (null: no table). */
  live: unknown = null;
  private gate: Promise<void> | null = null;
  private open: (() => void) | null = null;

  hold(): void {
    this.gate = new Promise((r) => (this.open = r));
  }
  release(): void {
    this.open?.();
    this.gate = null;
  }

  async apply(batch: Batch): Promise<void> {
    this.inFlight++;
    this.maxInFlight = Math.max(this.maxInFlight, this.inFlight);
    try {
      await new Promise((r) => setImmediate(r));
      if (this.gate) await this.gate;
      if (this.fail) throw new Error("fake nft refuses");
      this.batches.push(batch);
    } finally {
      this.inFlight--;
    }
  }
  async check(): Promise<void> {}
  async listTable(): Promise<unknown> {
    return this.live;
  }
  /** What `listSet` answers, by set name (else the set as `live` has it, or null). */
  setListings = new Map<string, unknown>();
  async listSet(_table: string, set: string): Promise<unknown> {
    if (this.setListings.has(set)) return this.setListings.get(set);
    const items = (
      (this.live as { nftables?: Record<string, { name?: string }>[] } | null)?.nftables ?? []
    ).filter((o) => o.set?.name === set);
    return items.length ? { nftables: items } : null;
  }
  async listCounters(): Promise<Map<string, { packets: number; bytes: number }>> {
    return new Map();
  }

  /** Commands of every batch so far, as "verb kind name [elements]". */
  commands(): string[] {
    return this.batches.flatMap((b) =>
      b.nftables.map((c) => {
        const [verb, body] = Object.entries(c)[0] as [
          string,
          Record<string, Record<string, unknown>>,
        ];
        const [kind, o] = Object.entries(body)[0] as [string, Record<string, unknown>];
        const elem = kind === "element" ? ` ${JSON.stringify(o.elem)}` : "";
        return `${verb} ${kind} ${String(o.name ?? o.chain ?? "")}${elem}`;
      }),
    );
  }
}

/** A resolver answering from `answers` (name -> family -> addresses); a name in `stall` never answers. */
export class FakeResolver implements Resolver {
  answers = new Map<string, { 4?: string[]; 6?: string[]; ttl?: number }>();
  /** Names whose lookups hang until release(name). */
  stall = new Set<string>();
  calls: string[] = [];
  private readonly hanging = new Map<string, (() => void)[]>();
  async resolve(name: string, family: 4 | 6): Promise<Resolution> {
    this.calls.push(`${name}/${family}`);
    if (this.stall.has(name)) {
      await new Promise<void>((r) =>
        this.hanging.set(name, [...(this.hanging.get(name) ?? []), r]),
      );
    }
    const a = this.answers.get(name);
    if (!a) return { ok: false, code: "NXDOMAIN", message: `${name}: NXDOMAIN` };
    return { ok: true, answer: { addresses: a[family] ?? [], ttl: a.ttl ?? 60, chain: [] } };
  }
  /** Ends the hanging lookups of `name`: they answer from `answers` now. */
  release(name: string): void {
    this.stall.delete(name);
    for (const r of this.hanging.get(name) ?? []) r();
    this.hanging.delete(name);
  }
}

export class FakeProxies implements Proxies {
  readonly listening = new Map<string, { service: ProxyService; port: number }>();
  /** Ports another program holds: listen() on them fails with EADDRINUSE. */
  readonly busy = new Set<number>();
  attempts = 0;
  async listen(service: ProxyService, port: number): Promise<void> {
    this.attempts++;
    if (this.busy.has(port)) throw new Error(`listen EADDRINUSE: address already in use :${port}`);
    this.listening.set(service.name, { service, port });
  }
  update(service: ProxyService): void {
    const l = this.listening.get(service.name);
    if (l) l.service = service;
  }
  async close(service: string): Promise<void> {
    this.listening.delete(service);
  }
  async closeAll(): Promise<void> {
    this.listening.clear();
  }
  port(service: string): number | undefined {
    return this.listening.get(service)?.port;
  }
  stats(): ProxyStats | undefined {
    return undefined;
  }
  services(): string[] {
    return [...this.listening.keys()];
  }
  /** What each service looked up outside its policy (tests fill it in). */
  readonly names = new Map<string, LookedUpName[]>();
  lookedUp(service: string, since = 0): LookedUpName[] {
    return (this.names.get(service) ?? []).filter((n) => n.at >= since);
  }
}

const users: Users = {
  users: async (specs) => new Map(specs.map((s) => [s, { id: Number(s) }])),
  groups: async (specs) => new Map(specs.map((s) => [s, { id: Number(s) }])),
  createUser: async () => {
    throw new Error("not in unit tests");
  },
};

export interface Harness {
  daemon: Daemon;
  nft: FakeNft;
  resolver: FakeResolver;
  proxies: FakeProxies;
  store: PolicyStore;
  clock: { now: number };
  /** The host's own addresses, as the kernel would list them now (tests add to it). */
  host: Set<string>;
  logs: { msg: string; [k: string]: unknown }[];
  /** The host's name-service settings status reads (null: no nsswitch.conf). */
  nameService: { nsswitch: string; nscdRunning: boolean } | null;
  /** Writes a service policy (validated) into the config dir. */
  service(doc: Record<string, unknown>): Promise<void>;
  done(): Promise<void>;
}

/** A daemon over temp dirs with fake nft, DNS, clock and proxies. */
export async function harness(config: Record<string, unknown> = {}): Promise<Harness> {
  const dir = mkdtempSync(join(tmpdir(), "egressd-unit-"));
  const store = new PolicyStore(join(dir, "etc"));
  const nft = new FakeNft();
  const resolver = new FakeResolver();
  const proxies = new FakeProxies();
  const clock = { now: 1_700_000_000_000 };
  const host = new Set<string>();
  const logs: Harness["logs"] = [];
  const log = pino(
    { level: "debug" },
    { write: (line: string) => void logs.push(JSON.parse(line) as Harness["logs"][number]) },
  );
  await store.locked(async () => undefined);
  const doc = { resolvers: ["127.0.0.1:53"], ...config };
  validateConfig(doc, "egressd.json"); // a typo in a test's config fails here, loudly
  writeFileSync(join(dir, "etc", "egressd.json"), JSON.stringify(doc));
  let nameService: Harness["nameService"] = null;
  const daemon = new Daemon({
    store,
    state: new StateStore(join(dir, "state")),
    nft,
    users,
    resolver: () => resolver,
    clock: () => clock.now,
    hostAddresses: () => new Set(host),
    log,
    proxies,
    nameService: async () => {
      if (!nameService) throw new Error("ENOENT: no nsswitch.conf");
      return nameService;
    },
  });
  return {
    get nameService() {
      return nameService;
    },
    set nameService(v) {
      nameService = v;
    },
    daemon,
    nft,
    resolver,
    proxies,
    store,
    clock,
    host,
    logs,
    service: (doc) =>
      store.locked(() => store.writeService(validateService(doc, "unit", String(doc.name)))),
    done: async () => {
      await daemon.stop();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
