/**
 * Which allowed names a queried name matches (pure). Names compare in lowercase ASCII without a
 * trailing dot; internationalised names are allowed in their punycode form (which is what goes
 * on the wire). `*.example.com` matches any name below example.com, at any depth, and not
 * example.com itself.
 */

const HOSTNAME =
  /^(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$/;

/**
 * A queried name in the form allowances are stored in, or null when it cannot be a name an
 * allowance could hold (bytes outside ASCII letters, digits, `-` and `_`, empty labels, over
 * 253 characters). Such a name matches nothing.
 */
export function normalizeQueryName(wire: string): string | null {
  const name = (wire.endsWith(".") ? wire.slice(0, -1) : wire).toLowerCase();
  if (!name || name.length > 253 || !HOSTNAME.test(name)) return null;
  return name;
}

export type NamePattern = { kind: "domain"; name: string } | { kind: "wildcard"; suffix: string };

/** Whether `name` (normalised) matches `pattern`. */
export function nameMatches(pattern: NamePattern, name: string): boolean {
  if (pattern.kind === "domain") return pattern.name === name;
  return name.length > pattern.suffix.length + 1 && name.endsWith(`.${pattern.suffix}`);
}

/** A set of allowed names and wildcards, asked once per query. */
export class NameMatcher {
  private readonly exact = new Set<string>();
  private readonly suffixes = new Set<string>();

  constructor(patterns: Iterable<NamePattern>) {
    for (const p of patterns) {
      if (p.kind === "domain") this.exact.add(p.name);
      else this.suffixes.add(p.suffix);
    }
  }

  get size(): number {
    return this.exact.size + this.suffixes.size;
  }

  /** Whether a normalised name is allowed: exactly, or below an allowed wildcard. */
  matches(name: string): boolean {
    if (this.exact.has(name)) return true;
    // Walk up the name: a.b.example.com is below b.example.com and below example.com.
    for (let i = name.indexOf("."); i !== -1; i = name.indexOf(".", i + 1)) {
      if (this.suffixes.has(name.slice(i + 1))) return true;
    }
    return false;
  }
}
