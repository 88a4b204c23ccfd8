/** A value computed on first use (schema compilation costs tens of ms; most commands need one schema at most). */
export function lazy<T>(make: () => T): () => T {
  let value: { v: T } | null = null;
  return () => (value ??= { v: make() }).v;
}
