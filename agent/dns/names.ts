/**
 * DNS bookkeeping for the refresh loop (pure: the clock is a parameter, no I/O).
 *
 * Each name has two independent families, A (4) and AAAA (6). For each: the addresses of the
 * last successful answer ("current"), and for every address seen, until when it stays allowed.
 * A family whose queries fail keeps its current addresses (fail-static) while the other family
 * goes on; an address that leaves the answer (rotation, NODATA, NXDOMAIN) stays allowed for
 * the grace period, counted from the moment egressd learns it left (so after an outage the
 * grace starts at the recovery). Every address held has passed the address filter under the
 * current settings: a narrower config or a new host address prunes what is held at once.
 */
import type { Family } from "../../rules/addresses.ts";
import {
  classify,
  filterAddresses,
  refuseReason,
  type Dropped,
} from "../../rules/address-filter.ts";
import type { Problem } from "../../rules/errors.ts";
import type { Lookup, Resolution } from "./dns.client.ts";

export interface RefreshSettings {
  minTtlSeconds: number;
  maxTtlSeconds: number;
  graceSeconds: number;
  maxAddressesPerName: number;
  allowPrivateAddresses: boolean;
}

export interface FilterContext {
  /** The host's own addresses, canonical. */
  hostAddresses: ReadonlySet<string>;
}

export interface FamilyState {
  /** Addresses of the last successful answer that passed the filter (empty after NODATA or NXDOMAIN). */
  current: string[];
  /** address -> epoch ms until which it stays allowed once it is no longer current. */
  until: Record<string, number>;
  /** Epoch ms of the last answer (success, NODATA or NXDOMAIN), or null if never answered. */
  lastAnswer: number | null;
  /** Epoch ms of the last attempt. */
  lastAttempt: number | null;
  /** Epoch ms when this family is due for resolution. */
  nextRefresh: number;
  /** TTL of the last answer after clamping, seconds. */
  ttl: number | null;
  /** Consecutive failures (timeouts, SERVFAIL, ...); drives the backoff. */
  failures: number;
  lastError: { code: string; message: string; at: number } | null;
  /** Addresses the last answer held that may not be allowed (or held ones a narrowing removed), and why. */
  dropped: Dropped[];
  /** CNAME chain of the last answer. */
  chain: string[];
}

export type NameState = Record<Family, FamilyState>;

export const FAMILIES: readonly Family[] = [4, 6];

/** Backoff after `failures` consecutive failures: the TTL floor doubled each time, at most 5 min. */
export function backoffSeconds(failures: number, s: RefreshSettings): number {
  const base = Math.max(1, Math.min(s.minTtlSeconds, 30));
  return Math.min(base * 2 ** Math.max(0, failures - 1), s.maxTtlSeconds, 300);
}

export function clampTtl(ttl: number, s: RefreshSettings): number {
  return Math.min(Math.max(ttl, s.minTtlSeconds), s.maxTtlSeconds);
}

function freshFamily(now: number): FamilyState {
  return {
    current: [],
    until: {},
    lastAnswer: null,
    lastAttempt: null,
    nextRefresh: now,
    ttl: null,
    failures: 0,
    lastError: null,
    dropped: [],
    chain: [],
  };
}

const fresh = (now: number): NameState => ({ 4: freshFamily(now), 6: freshFamily(now) });

export class NameTable {
  private readonly names = new Map<string, NameState>();
  private host: ReadonlySet<string> = new Set();

  constructor(private settings: RefreshSettings) {}

  /**
   * New settings and host addresses. What no longer passes the filter, and current addresses
   * beyond a lowered cap, are forgotten at once; returns what was pruned.
   */
  configure(settings: RefreshSettings, ctx?: FilterContext): (Dropped & { name: string })[] {
    this.settings = settings;
    if (ctx) this.host = ctx.hostAddresses;
    const pruned: (Dropped & { name: string })[] = [];
    for (const [name, st] of this.names) {
      for (const f of FAMILIES) {
        const fam = st[f];
        const keep = (a: string, why: string | null) => {
          if (!why) return true;
          pruned.push({ name, address: a, reason: why });
          // Shown in status like a dropped answer, until the next answer replaces the list.
          fam.dropped = [
            ...fam.dropped.filter((d) => d.address !== a),
            { address: a, reason: why },
          ];
          return false;
        };
        fam.current = fam.current.filter((a) => keep(a, this.reason(a)));
        for (const a of fam.current.slice(settings.maxAddressesPerName)) {
          keep(a, `over maxAddressesPerName (${settings.maxAddressesPerName})`);
          delete fam.until[a];
        }
        fam.current = fam.current.slice(0, settings.maxAddressesPerName);
        for (const a of Object.keys(fam.until))
          if (!fam.current.includes(a) && !keep(a, this.reason(a))) delete fam.until[a];
      }
    }
    return pruned;
  }

  private reason(address: string): string | null {
    return refuseReason(address, {
      allowPrivateAddresses: this.settings.allowPrivateAddresses,
      hostAddresses: this.host,
    });
  }

  /** Keeps exactly `names`: new ones are due now; ones no service allows any more are forgotten. */
  track(names: Iterable<string>, now: number): { added: string[]; removed: string[] } {
    const want = new Set(names);
    const added: string[] = [];
    const removed: string[] = [];
    for (const n of want) {
      if (!this.names.has(n)) {
        this.names.set(n, fresh(now));
        added.push(n);
      }
    }
    for (const n of [...this.names.keys()]) {
      if (!want.has(n)) {
        this.names.delete(n);
        removed.push(n);
      }
    }
    return { added: added.sort(), removed: removed.sort() };
  }

  has(name: string): boolean {
    return this.names.has(name);
  }

  get(name: string): Readonly<NameState> | undefined {
    return this.names.get(name);
  }

  list(): string[] {
    return [...this.names.keys()].sort();
  }

  /** Addresses allowed for `name` at `now`: current answers plus those still in grace. */
  allowed(name: string, now: number): string[] {
    const st = this.names.get(name);
    if (!st) return [];
    const out: string[] = [];
    for (const f of FAMILIES) {
      const fam = st[f];
      const set = new Set(fam.current);
      for (const [addr, until] of Object.entries(fam.until)) if (until > now) set.add(addr);
      out.push(...[...set].sort());
    }
    return out;
  }

  /** Allowed addresses of every tracked name. */
  snapshot(now: number): Map<string, string[]> {
    return new Map(this.list().map((n) => [n, this.allowed(n, now)]));
  }

  /** Records one family's resolution result. */
  observe(name: string, family: Family, result: Resolution, now: number): void {
    const st = this.names.get(name) ?? fresh(now);
    this.names.set(name, st);
    const fam = st[family];
    const s = this.settings;
    fam.lastAttempt = now;
    if (!result.ok && result.code !== "NXDOMAIN") {
      // Fail-static: keep what we have, ask again after a backoff.
      fam.failures += 1;
      fam.lastError = { code: result.code, message: result.message, at: now };
      fam.nextRefresh = now + backoffSeconds(fam.failures, s) * 1000;
      return;
    }
    let next: string[] = [];
    let dropped: Dropped[] = [];
    let ttl = s.minTtlSeconds;
    if (result.ok) {
      const f = filterAddresses(
        result.answer.addresses.filter((a) => classify(a)?.family === family),
        { allowPrivateAddresses: s.allowPrivateAddresses, hostAddresses: this.host },
      );
      next = f.kept.slice(0, s.maxAddressesPerName);
      dropped = [
        ...f.dropped,
        ...f.kept.slice(s.maxAddressesPerName).map((address) => ({
          address,
          reason: `over maxAddressesPerName (${s.maxAddressesPerName})`,
        })),
      ];
      // An empty answer (NODATA) carries no TTL worth trusting; ask again at the floor.
      ttl = clampTtl(next.length ? result.answer.ttl : s.minTtlSeconds, s);
      fam.chain = result.answer.chain;
      fam.lastError = null;
    } else {
      fam.lastError = { code: result.code, message: result.message, at: now };
      fam.chain = [];
    }
    const grace = s.graceSeconds * 1000;
    // An address leaving the answer keeps its grace from now, when egressd learns it left:
    // after an outage that is the recovery, not the TTL of an answer long past.
    for (const a of fam.current)
      if (!next.includes(a)) fam.until[a] = Math.max(fam.until[a] ?? 0, now + grace);
    for (const a of next) fam.until[a] = Math.max(fam.until[a] ?? 0, now + ttl * 1000 + grace);
    fam.current = next;
    fam.dropped = dropped;
    fam.ttl = ttl;
    fam.lastAnswer = now;
    fam.failures = 0;
    fam.nextRefresh = now + ttl * 1000;
    this.prune(fam, now);
  }

  /** (name, family) pairs whose refresh is due at `now`. */
  dueForRefresh(now: number): Lookup[] {
    const out: Lookup[] = [];
    for (const name of this.list()) {
      const st = this.names.get(name) as NameState;
      for (const family of FAMILIES) if (st[family].nextRefresh <= now) out.push({ name, family });
    }
    return out;
  }

  /** Both families of each name. */
  static lookups(names: Iterable<string>): Lookup[] {
    return [...names].flatMap((name) => FAMILIES.map((family) => ({ name, family })));
  }

  /**
   * The next moment anything changes on its own: a refresh falls due or an address's grace
   * ends. Refreshes of lookups `skip` names (those being asked now) do not count.
   */
  nextEvent(now: number, skip?: (l: Lookup) => boolean): number | null {
    let next = Infinity;
    for (const [name, st] of this.names) {
      for (const f of FAMILIES) {
        const fam = st[f];
        if (!skip?.({ name, family: f })) next = Math.min(next, fam.nextRefresh);
        const current = new Set(fam.current);
        for (const [addr, until] of Object.entries(fam.until)) {
          if (!current.has(addr) && until > now) next = Math.min(next, until);
        }
      }
    }
    return next === Infinity ? null : next;
  }

  /** Forgets expired addresses that are not current (bookkeeping only; `allowed` already ignores them). */
  private prune(fam: FamilyState, now: number): void {
    const current = new Set(fam.current);
    for (const [addr, until] of Object.entries(fam.until)) {
      if (!current.has(addr) && until <= now) delete fam.until[addr];
    }
  }

  /** For the state file. */
  toJSON(): Record<string, NameState> {
    return Object.fromEntries(this.list().map((n) => [n, this.names.get(n) as NameState]));
  }

  /**
   * Restores saved resolutions as a cache, never as an authority: only names still in policy,
   * only single addresses of the right family that pass the filter under the current settings,
   * only expiries within maxTtl + grace from now. Everything else is left out and reported,
   * naming `file` and the entry. Accepts the per-family form and the older single-list form.
   */
  static fromJSON(
    data: unknown,
    settings: RefreshSettings,
    opts: {
      names: Iterable<string>;
      now: number;
      file: string;
      hostAddresses?: ReadonlySet<string>;
    },
  ): { table: NameTable; problems: Problem[] } {
    const t = new NameTable(settings);
    t.host = opts.hostAddresses ?? new Set();
    const problems: Problem[] = [];
    const wanted = new Set(opts.names);
    const { now, file } = opts;
    const latest = now + (settings.maxTtlSeconds + settings.graceSeconds) * 1000;
    const entries =
      data && typeof data === "object" ? Object.entries(data as Record<string, unknown>) : [];
    for (const [name, raw] of entries) {
      const where = `${file}: names["${name}"]`;
      if (!wanted.has(name)) {
        problems.push({ where, text: "not a name any service allows; left out" });
        continue;
      }
      if (!raw || typeof raw !== "object") {
        problems.push({ where, text: "not an object; left out" });
        continue;
      }
      const r = raw as Record<string, unknown>;
      // Older state files kept one list per name; split it by family.
      const legacy = !("4" in r || "6" in r);
      const families: Record<Family, Record<string, unknown>> = legacy
        ? { 4: r, 6: r }
        : {
            4: (r["4"] ?? {}) as Record<string, unknown>,
            6: (r["6"] ?? {}) as Record<string, unknown>,
          };
      const st = fresh(now);
      for (const family of FAMILIES) {
        const src = families[family];
        const fam = st[family];
        const at = `${where}[${family === 4 ? "A" : "AAAA"}]`;
        const accept = (value: unknown): string | null => {
          const text = JSON.stringify(value);
          const c = typeof value === "string" ? classify(value) : null;
          // The older form mixes families in one list: each family takes its own and the
          // IPv4 pass reports what is no address at all.
          if (legacy && (c ? c.family !== family : family === 6)) return null;
          if (!c) {
            const kind = text.includes("/") ? "a network, not an address" : "not an address";
            problems.push({ where: at, text: `${text} is ${kind}; left out` });
            return null;
          }
          if (c.family !== family) {
            problems.push({
              where: at,
              text: `${c.address} is not an IPv${family} address; left out`,
            });
            return null;
          }
          const why = t.reason(c.address);
          if (why) {
            problems.push({ where: at, text: `${c.address}: ${why}; left out` });
            return null;
          }
          return c.address;
        };
        const current = Array.isArray(src.current) ? src.current : [];
        for (const v of current) {
          const a = accept(v);
          if (a && !fam.current.includes(a)) fam.current.push(a);
        }
        fam.current = fam.current.slice(0, settings.maxAddressesPerName);
        const until =
          src.until && typeof src.until === "object" ? (src.until as Record<string, unknown>) : {};
        for (const [addr, when] of Object.entries(until)) {
          const a = accept(addr);
          if (!a) continue;
          if (typeof when !== "number" || !Number.isFinite(when)) continue;
          if (when > latest) {
            problems.push({
              where: at,
              text: `${a} expires ${new Date(when).toISOString()}, later than maxTtlSeconds + graceSeconds from now; left out`,
            });
            fam.current = fam.current.filter((x) => x !== a);
            continue;
          }
          if (when > now || fam.current.includes(a)) fam.until[a] = when;
        }
        const num = (v: unknown) => (typeof v === "number" && Number.isFinite(v) ? v : null);
        fam.lastAnswer = num(src.lastAnswer);
        fam.lastAttempt = num(src.lastAttempt);
        fam.ttl = num(src.ttl);
        fam.failures = Math.max(0, Math.floor(num(src.failures) ?? 0));
        const e = src.lastError as { code?: unknown; message?: unknown; at?: unknown } | null;
        if (e && typeof e.code === "string" && typeof e.message === "string" && num(e.at) !== null)
          fam.lastError = { code: e.code, message: e.message, at: e.at as number };
        // Never later than one maximal TTL from now, whatever the file says.
        fam.nextRefresh = Math.min(
          num(src.nextRefresh) ?? now,
          now + settings.maxTtlSeconds * 1000,
        );
      }
      t.names.set(name, st);
    }
    return { table: t, problems };
  }
}
