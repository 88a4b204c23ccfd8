/** Which DNS servers egressd uses and lets services reach: the config's, else /etc/resolv.conf's. */
import { readFile } from "node:fs/promises";
import type { ResolverAddr } from "../../rules/compile.ts";
import { parseResolver, type DaemonConfig } from "../../rules/policy.ts";

/** Nameserver lines of a resolv.conf text (pure). Zoned link-local entries are skipped. */
export function parseResolvConf(text: string): ResolverAddr[] {
  const out: ResolverAddr[] = [];
  for (const line of text.split("\n")) {
    const m = /^\s*nameserver\s+(\S+)/.exec(line);
    if (!m?.[1] || m[1].includes("%")) continue;
    const r = parseResolver(m[1].includes(":") ? `[${m[1]}]:53` : m[1]);
    if (!("error" in r)) out.push(r);
  }
  return out;
}

export async function configuredResolvers(
  config: DaemonConfig,
  resolvConf = process.env.EGRESSD_RESOLV_CONF || "/etc/resolv.conf",
): Promise<ResolverAddr[]> {
  if (config.resolvers) {
    return config.resolvers.map(parseResolver).filter((r): r is ResolverAddr => !("error" in r));
  }
  try {
    return parseResolvConf(await readFile(resolvConf, "utf8"));
  } catch {
    return [];
  }
}
