/**
 * What each service's DNS proxy learned (pure: the clock is a parameter, no I/O): per service,
 * per queried name, the addresses its answers carried and until when each stays allowed (the
 * answer's TTL clamped to minTtl..maxTtl, plus grace). The kernel holds the same expiry on each
 * set element, so what is learned lapses with or without egressd.
 */
import { refuseReason, type Dropped } from "../../rules/address-filter.ts";
import { classify } from "../../rules/address-filter.ts";
import type { Learned } from "../../rules/compile.ts";
import type { Problem } from "../../rules/errors.ts";
import type { NameMatcher } from "../../rules/name-match.ts";
import { clampTtl, type FilterContext, type RefreshSettings } from "./names.ts";

interface Entry {
  /** Epoch ms until which the address stays allowed. */
  expires: number;
  /** Epoch ms of the last answer that carried it. */
  answered: number;
}

export class LearnedTable {
  private readonly services = new Map<string, Map<string, Map<string, Entry>>>();
  /**
   * Timed elements found in the kernel at start-up that the saved state does not explain (it
   * was older than the kernel's table: a crash between a proxy transaction and the next save).
   * They are kept, by set, until they expire: a restart loses nothing a client may still use.
   */
  private readonly adopted = new Map<string, Map<string, Map<string, number>>>();
  /** Bumped whenever a service's learned addresses change (the daemon recompiles it then). */
  private readonly versions = new Map<string, number>();
  private bump(service: string): void {
    this.versions.set(service, (this.versions.get(service) ?? 0) + 1);
  }

  /** A number that changes whenever `service`'s learned addresses do. */
  version(service: string): number {
    return this.versions.get(service) ?? 0;
  }
  private host: ReadonlySet<string> = new Set();

  constructor(private settings: RefreshSettings) {}

  /** New settings and host addresses; what the filter now refuses is forgotten and returned. */
  configure(settings: RefreshSettings, ctx?: FilterContext): (Dropped & { name: string })[] {
    this.settings = settings;
    if (ctx) this.host = ctx.hostAddresses;
    const pruned: (Dropped & { name: string })[] = [];
    for (const [service, names] of this.services) {
      for (const [name, addrs] of names) {
        for (const a of [...addrs.keys()]) {
          const why = this.reason(a);
          if (why) {
            addrs.delete(a);
            this.bump(service);
            pruned.push({ name, address: a, reason: why });
          }
        }
        if (!addrs.size) names.delete(name);
      }
    }
    for (const [service, sets] of this.adopted)
      for (const [set, m] of sets)
        for (const a of [...m.keys()]) {
          const why = this.reason(a);
          if (why) {
            m.delete(a);
            this.bump(service);
            pruned.push({ name: `(${set})`, address: a, reason: why });
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

  /** Lifetime of an address answered now with `ttl`: the clamped TTL plus grace, as an expiry. */
  expiryFor(ttl: number, now: number): number {
    return now + (clampTtl(ttl, this.settings) + this.settings.graceSeconds) * 1000;
  }

  /**
   * Records an answer to `service`'s query for `name` (addresses already filtered). At most
   * maxAddressesPerName per name: the oldest answered go first, never one answered within the
   * grace period (a client may still be using it).
   */
  learn(
    service: string,
    name: string,
    addresses: readonly string[],
    ttl: number,
    now: number,
  ): void {
    if (!addresses.length) return;
    let names = this.services.get(service);
    if (!names) this.services.set(service, (names = new Map()));
    let addrs = names.get(name);
    if (!addrs) names.set(name, (addrs = new Map()));
    const expires = this.expiryFor(ttl, now);
    this.bump(service);
    for (const a of addresses) {
      const e = addrs.get(a);
      addrs.set(a, { expires: Math.max(e?.expires ?? 0, expires), answered: now });
    }
    const max = this.settings.maxAddressesPerName;
    if (addrs.size <= max) return;
    const recent = now - this.settings.graceSeconds * 1000;
    const evictable = [...addrs.entries()]
      .filter(([, e]) => e.answered < recent)
      .sort((x, y) => x[1].answered - y[1].answered);
    for (const [a] of evictable.slice(0, addrs.size - max)) addrs.delete(a);
  }

  /** Keeps a timed element the kernel holds in `set` of `service` (already filtered). */
  adopt(service: string, set: string, address: string, expires: number): void {
    let sets = this.adopted.get(service);
    if (!sets) this.adopted.set(service, (sets = new Map()));
    let m = sets.get(set);
    if (!m) sets.set(set, (m = new Map()));
    m.set(address, Math.max(m.get(address) ?? 0, expires));
    this.bump(service);
  }

  /** Adopted elements of `service` still alive at `now`, by set. */
  adoptedOf(service: string, now: number): Map<string, Map<string, number>> {
    const out = new Map<string, Map<string, number>>();
    for (const [set, m] of this.adopted.get(service) ?? []) {
      const live = new Map([...m].filter(([, t]) => t > now));
      if (live.size) out.set(set, live);
    }
    return out;
  }

  /** Keeps only services and names still allowed (`matcher` per DNS-aware service). */
  retain(matchers: ReadonlyMap<string, NameMatcher>): void {
    for (const service of [...this.adopted.keys()])
      if (!matchers.has(service)) this.adopted.delete(service);
    for (const [service, names] of this.services) {
      const m = matchers.get(service);
      if (!m) {
        this.services.delete(service);
        this.bump(service);
        continue;
      }
      for (const name of [...names.keys()])
        if (!m.matches(name)) {
          names.delete(name);
          this.bump(service);
        }
    }
  }

  /** Forgets what has expired. */
  prune(now: number): void {
    for (const [service, sets] of this.adopted) {
      for (const [set, m] of sets) {
        for (const [a, t] of m)
          if (t <= now) {
            m.delete(a);
            this.bump(service);
          }
        if (!m.size) sets.delete(set);
      }
      if (!sets.size) this.adopted.delete(service);
    }
    for (const [service, names] of this.services) {
      for (const [name, addrs] of names) {
        for (const [a, e] of addrs)
          if (e.expires <= now) {
            addrs.delete(a);
            this.bump(service);
          }
        if (!addrs.size) names.delete(name);
      }
      if (!names.size) this.services.delete(service);
    }
  }

  /** One service's learned addresses, for the compiler: name -> address -> expiry. */
  of(service: string, now: number): Learned {
    const out = new Map<string, Map<string, number>>();
    for (const [name, addrs] of this.services.get(service) ?? []) {
      const live = new Map<string, number>();
      for (const [a, e] of addrs) if (e.expires > now) live.set(a, e.expires);
      if (live.size) out.set(name, live);
    }
    return out;
  }

  /** Every service's learned addresses. */
  all(now: number): Map<string, Learned> {
    return new Map([...this.services.keys()].map((s) => [s, this.of(s, now)]));
  }

  /** The queried names each of `service`'s learned addresses came from. */
  namesOf(service: string): Map<string, string[]> {
    const out = new Map<string, string[]>();
    for (const [name, addrs] of this.services.get(service) ?? [])
      for (const a of addrs.keys()) out.set(a, [...(out.get(a) ?? []), name]);
    return out;
  }

  /** Addresses learned per service (for status). */
  count(service: string): number {
    let n = 0;
    for (const addrs of this.services.get(service)?.values() ?? []) n += addrs.size;
    return n;
  }

  /** The next moment something learned expires. */
  nextExpiry(now: number): number | null {
    let next = Infinity;
    for (const names of this.services.values())
      for (const addrs of names.values())
        for (const e of addrs.values()) if (e.expires > now) next = Math.min(next, e.expires);
    return next === Infinity ? null : next;
  }

  /**
   * For the state file: service -> name -> address -> [expires, answered]. Adopted elements go
   * under "@<set name>" instead of a name.
   */
  toJSON(): Record<string, Record<string, Record<string, [number, number]>>> {
    const out: Record<string, Record<string, Record<string, [number, number]>>> = {};
    for (const [service, names] of this.services) {
      const n: Record<string, Record<string, [number, number]>> = (out[service] = {});
      for (const [name, addrs] of names)
        n[name] = Object.fromEntries([...addrs].map(([a, e]) => [a, [e.expires, e.answered]]));
    }
    for (const [service, sets] of this.adopted) {
      const n = (out[service] ??= {});
      for (const [set, m] of sets)
        n[`@${set}`] = Object.fromEntries([...m].map(([a, t]) => [a, [t, 0]]));
    }
    return out;
  }

  /**
   * Restores saved learning like the refresh loop's cache: only DNS-aware services in `matchers`,
   * only names they may ask, only single addresses the filter passes, only expiries in the future
   * and no later than maxTtl + grace from now. Everything else is left out and reported.
   */
  static fromJSON(
    data: unknown,
    settings: RefreshSettings,
    opts: {
      matchers: ReadonlyMap<string, NameMatcher>;
      /** The name sets each DNS-aware service has (for adopted entries). */
      sets?: (service: string) => ReadonlySet<string>;
      now: number;
      file: string;
      hostAddresses?: ReadonlySet<string>;
    },
  ): { table: LearnedTable; problems: Problem[] } {
    const t = new LearnedTable(settings);
    t.host = opts.hostAddresses ?? new Set();
    const problems: Problem[] = [];
    const { now, file } = opts;
    const latest = now + (settings.maxTtlSeconds + settings.graceSeconds) * 1000;
    const obj = (v: unknown) =>
      v && typeof v === "object" && !Array.isArray(v) ? (v as Record<string, unknown>) : {};
    for (const [service, names] of Object.entries(obj(data))) {
      const matcher = opts.matchers.get(service);
      if (!matcher) {
        problems.push({
          where: `${file}: learned["${service}"]`,
          text: "not a DNS-aware service; left out",
        });
        continue;
      }
      for (const [name, addrs] of Object.entries(obj(names))) {
        const where = `${file}: learned["${service}"]["${name}"]`;
        const set = name.startsWith("@") ? name.slice(1) : null;
        if (set !== null && !opts.sets?.(service).has(set)) {
          problems.push({ where, text: `${set} is not a name set of ${service}; left out` });
          continue;
        }
        if (set === null && !matcher.matches(name)) {
          problems.push({ where, text: `${service} may not look up ${name}; left out` });
          continue;
        }
        for (const [address, v] of Object.entries(obj(addrs))) {
          const [expires, answered] = Array.isArray(v) ? v : [];
          const c = classify(address);
          const why = !c ? `${JSON.stringify(address)} is not an address` : t.reason(c.address);
          if (why) {
            problems.push({ where, text: `${c?.address ?? address}: ${why}; left out` });
            continue;
          }
          if (typeof expires !== "number" || typeof answered !== "number" || expires <= now)
            continue;
          if (expires > latest) {
            problems.push({
              where,
              text: `${c?.address} expires ${new Date(expires).toISOString()}, later than maxTtlSeconds + graceSeconds from now; left out`,
            });
            continue;
          }
          if (set !== null) {
            t.adopt(service, set, c?.address as string, expires);
            continue;
          }
          let n = t.services.get(service);
          if (!n) t.services.set(service, (n = new Map()));
          let m = n.get(name);
          if (!m) n.set(name, (m = new Map()));
          m.set(c?.address as string, { expires, answered: Math.min(answered, now) });
        }
      }
    }
    return { table: t, problems };
  }
}
