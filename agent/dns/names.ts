/**
 * DNS bookkeeping for the daemon (pure: the clock is a parameter, no I/O).
 *
 * For each name: the addresses of the last successful answer ("current"), and for every
 * address ever seen, until when it stays allowed: the end of the TTL of the last answer that
 * contained it, plus the grace period. Current addresses stay allowed while DNS fails
 * (fail-static); addresses no longer returned stay until their grace runs out; NXDOMAIN
 * empties "current", so the name's addresses go when their grace runs out.
 */
import { filterAddresses, type Dropped } from "../../rules/resolution.ts";
import type { Resolution } from "./dns.client.ts";

export interface RefreshSettings {
  minTtlSeconds: number;
  maxTtlSeconds: number;
  graceSeconds: number;
  maxAddressesPerName: number;
  allowPrivateAddresses: boolean;
}

export interface NameState {
  /** Addresses of the last successful answer (empty after NXDOMAIN). */
  current: string[];
  /** address -> epoch ms until which it stays allowed (answer TTL end + grace). */
  until: Record<string, number>;
  /** Epoch ms of the last answer (success or NXDOMAIN), or null if never answered. */
  lastAnswer: number | null;
  /** Epoch ms of the last attempt. */
  lastAttempt: number | null;
  /** Epoch ms when the name is due for resolution. */
  nextRefresh: number;
  /** TTL of the last answer after clamping, seconds. */
  ttl: number | null;
  /** Consecutive failures (timeouts, SERVFAIL, ...); drives the backoff. */
  failures: number;
  lastError: { code: string; message: string; at: number } | null;
  /** Addresses the last answer held that may not be allowed, and why. */
  dropped: Dropped[];
}

export interface Observed {
  name: string;
  /** Allowed addresses before and after. */
  before: string[];
  after: string[];
}

/** Backoff after `failures` consecutive failures: minTtl doubled each time, capped at maxTtl (seconds). */
export function backoffSeconds(failures: number, s: RefreshSettings): number {
  const base = Math.max(1, Math.min(s.minTtlSeconds, 30));
  return Math.min(base * 2 ** Math.max(0, failures - 1), s.maxTtlSeconds, 300);
}

export function clampTtl(ttl: number, s: RefreshSettings): number {
  return Math.min(Math.max(ttl, s.minTtlSeconds), s.maxTtlSeconds);
}

function fresh(now: number): NameState {
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
  };
}

export class NameTable {
  private readonly names = new Map<string, NameState>();

  constructor(private settings: RefreshSettings) {}

  configure(settings: RefreshSettings): void {
    this.settings = settings;
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

  /** Addresses allowed for `name` at `now`: the current answer plus those still in grace. */
  allowed(name: string, now: number): string[] {
    const st = this.names.get(name);
    if (!st) return [];
    const out = new Set(st.current);
    for (const [addr, until] of Object.entries(st.until)) if (until > now) out.add(addr);
    return [...out].sort();
  }

  /** Allowed addresses of every tracked name. */
  snapshot(now: number): Map<string, string[]> {
    return new Map(this.list().map((n) => [n, this.allowed(n, now)]));
  }

  /** Records a resolution result; returns how the allowed addresses changed. */
  observe(name: string, result: Resolution, now: number): Observed {
    const st = this.names.get(name) ?? fresh(now);
    this.names.set(name, st);
    const before = this.allowed(name, now);
    st.lastAttempt = now;
    if (result.ok) {
      const f = filterAddresses(result.answer.addresses, {
        allowPrivate: this.settings.allowPrivateAddresses,
        max: this.settings.maxAddressesPerName,
      });
      // An empty answer (NODATA) carries no TTL worth trusting; re-ask at the floor.
      const ttl = clampTtl(
        f.kept.length ? result.answer.ttl : this.settings.minTtlSeconds,
        this.settings,
      );
      const until = now + (ttl + this.settings.graceSeconds) * 1000;
      st.current = f.kept;
      for (const a of f.kept) st.until[a] = Math.max(st.until[a] ?? 0, until);
      st.dropped = f.dropped;
      st.ttl = ttl;
      st.lastAnswer = now;
      st.failures = 0;
      st.lastError = null;
      st.nextRefresh = now + ttl * 1000;
    } else if (result.code === "NXDOMAIN") {
      // The name is gone: its addresses leave when their grace runs out.
      st.current = [];
      st.dropped = [];
      st.lastAnswer = now;
      st.failures = 0;
      st.lastError = { code: result.code, message: result.message, at: now };
      st.ttl = this.settings.minTtlSeconds;
      st.nextRefresh = now + this.settings.minTtlSeconds * 1000;
    } else {
      // Fail-static: keep what we have, ask again after a backoff.
      st.failures += 1;
      st.lastError = { code: result.code, message: result.message, at: now };
      st.nextRefresh = now + backoffSeconds(st.failures, this.settings) * 1000;
    }
    this.prune(st, now);
    return { name, before, after: this.allowed(name, now) };
  }

  /** Names whose refresh is due at `now`. */
  dueForRefresh(now: number): string[] {
    return this.list().filter((n) => (this.names.get(n)?.nextRefresh ?? Infinity) <= now);
  }

  /** The next moment anything changes on its own: a refresh falls due or an address's grace ends. */
  nextEvent(now: number): number | null {
    let next = Infinity;
    for (const st of this.names.values()) {
      next = Math.min(next, st.nextRefresh);
      const current = new Set(st.current);
      for (const [addr, until] of Object.entries(st.until)) {
        if (!current.has(addr) && until > now) next = Math.min(next, until);
      }
    }
    return next === Infinity ? null : next;
  }

  /** Forgets expired addresses that are not current (bookkeeping only; `allowed` already ignores them). */
  private prune(st: NameState, now: number): void {
    const current = new Set(st.current);
    for (const [addr, until] of Object.entries(st.until)) {
      if (!current.has(addr) && until <= now) delete st.until[addr];
    }
  }

  /** For the state file. */
  toJSON(): Record<string, NameState> {
    return Object.fromEntries(this.list().map((n) => [n, this.names.get(n) as NameState]));
  }

  /** Restores saved state: the last-known addresses, so a restart can enforce before any DNS query. */
  static fromJSON(data: unknown, settings: RefreshSettings): NameTable {
    const t = new NameTable(settings);
    if (data && typeof data === "object") {
      for (const [name, raw] of Object.entries(data as Record<string, Partial<NameState>>)) {
        if (!raw || !Array.isArray(raw.current)) continue;
        t.names.set(name, {
          current: raw.current.filter((a): a is string => typeof a === "string"),
          until: raw.until && typeof raw.until === "object" ? { ...raw.until } : {},
          lastAnswer: typeof raw.lastAnswer === "number" ? raw.lastAnswer : null,
          lastAttempt: typeof raw.lastAttempt === "number" ? raw.lastAttempt : null,
          nextRefresh: typeof raw.nextRefresh === "number" ? raw.nextRefresh : 0,
          ttl: typeof raw.ttl === "number" ? raw.ttl : null,
          failures: typeof raw.failures === "number" ? raw.failures : 0,
          lastError: raw.lastError ?? null,
          dropped: Array.isArray(raw.dropped) ? raw.dropped : [],
        });
      }
    }
    return t;
  }
}
