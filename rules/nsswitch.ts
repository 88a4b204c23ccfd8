/**
 * Whether the host's name service sends lookups around egressd's DNS proxy (pure): the proxy
 * sees a service's own queries to port 53, not lookups another process makes for it.
 */

/** The sources of the `hosts:` line of an nsswitch.conf, in order (empty when there is none). */
export function hostsSources(text: string): string[] {
  for (const line of text.split("\n")) {
    const m = /^\s*hosts\s*:(.*)$/.exec(line.replace(/#.*/, ""));
    if (m?.[1]) return m[1].split(/\s+/).filter((w) => w && !w.startsWith("["));
  }
  return [];
}

/**
 * Warnings for DNS-aware services: `resolve` (systemd-resolved through its varlink socket) or a
 * cache before `dns` in `hosts:`, and a running nscd, each answer a service's lookups through
 * another process, which egressd's per-uid redirect cannot see.
 */
export function dnsBypassWarnings(nsswitch: string, nscdRunning: boolean): string[] {
  const sources = hostsSources(nsswitch);
  const dns = sources.indexOf("dns");
  const before = dns === -1 ? sources : sources.slice(0, dns);
  const out: string[] = [];
  if (before.includes("resolve"))
    out.push(
      'nsswitch.conf resolves hosts through systemd-resolved ("resolve" before "dns"): glibc lookups of DNS-aware services go through resolved\'s socket, not to port 53, and bypass egressd\'s DNS proxy; hide the socket from them (egressctl systemd SERVICE --unit UNIT writes InaccessiblePaths=) or put "dns" first. See docs/dns.md',
    );
  for (const cache of before.filter((s) => s === "cache" || s === "nscd"))
    out.push(
      `nsswitch.conf asks the "${cache}" source before "dns": cached answers reach services without their queries. See docs/dns.md`,
    );
  if (nscdRunning)
    out.push(
      "nscd is running: if it caches hosts, it resolves for services as its own user and their lookups bypass egressd's DNS proxy; disable its hosts cache (enable-cache hosts no). See docs/dns.md",
    );
  return out;
}
