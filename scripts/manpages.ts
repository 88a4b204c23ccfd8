/**
 * Generates the man pages egressctl(8) and egressd(8) and the bash and zsh completions from
 * the same commander programs that print --help, so they cannot disagree. The texts come from
 * renderManpages() (a unit test reads them); running the file writes them.
 * Usage: node --import tsx scripts/manpages.ts OUTDIR
 */
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import type { Command, Option } from "commander";
import { egressdProgram } from "../agent/egressd-program.ts";
import { program as egressctlProgram } from "../cli/program.ts";

const pkg = JSON.parse(readFileSync(new URL("../package.json", import.meta.url), "utf8")) as {
  version: string;
};
const epoch = Number(process.env.SOURCE_DATE_EPOCH ?? Math.floor(Date.now() / 1000));
const date = new Date(epoch * 1000).toISOString().slice(0, 10);

const noop = () => undefined;
const io = { stdout: noop, stderr: noop };
const ctl = egressctlProgram(io, noop);
const daemon = egressdProgram(async () => undefined);

/** Escapes text for roff. */
const roff = (s: string) =>
  s
    .replace(/\\/g, "\\e")
    .replace(/-/g, "\\-")
    .replace(/^([.'])/gm, "\\&$1");

const visible = (c: Command) => c.options.filter((o: Option) => !o.hidden);

function synopsisArgs(c: Command): string {
  return c.registeredArguments
    .map((a) =>
      a.required
        ? `\\fI<${a.name()}${a.variadic ? "..." : ""}>\\fR`
        : `[\\fI${a.name()}${a.variadic ? "..." : ""}\\fR]`,
    )
    .join(" ");
}

function optionItems(opts: readonly Option[]): string[] {
  return opts.flatMap((o) => [
    ".TP",
    `.B ${roff(o.flags)}`,
    roff(
      o.description +
        (o.defaultValue !== undefined && typeof o.defaultValue !== "object"
          ? ` (default: ${String(o.defaultValue)})`
          : ""),
    ),
  ]);
}

const COMMON_TAIL = (prog: string) => [
  ".SH EXIT STATUS",
  ".TP\n.B 0\nsuccess",
  ".TP\n.B 1\nthe audit found drift (egressctl audit only)",
  ".TP\n.B 2\nusage or validation error; nothing was changed",
  ".TP\n.B 3\nthe system refused: nft failed, permission denied, or the daemon was required and is not running",
  ".TP\n.B 4\ninternal error",
  ".SH FILES",
  ".TP\n.I /etc/egressd/egressd.json\ndaemon configuration",
  ".TP\n.I /etc/egressd/services.d/<service>.json\none policy per service",
  ".TP\n.I /var/lib/egressd/state.json\nlast-known resolutions, applied before any DNS query at start-up",
  ".TP\n.I /run/egressd/egressd.sock\ncontrol socket",
  ".SH ENVIRONMENT",
  ".TP\n.B EGRESSD_CONFIG_DIR, EGRESSD_STATE_DIR, EGRESSD_SOCKET\nas the corresponding options",
  ".TP\n.B EGRESSD_NFT\nrun this nft program for every nftables call instead of using libnftables in-process (by default the library is used, and the nft program on PATH only when the library cannot be loaded)",
  ".TP\n.B EGRESSD_LIBNFTABLES\nthe libnftables shared library to load (default: libnftables.so.1)",
  ".TP\n.B TMPDIR\nwhere the nft program's batch files are made, in a private egressd-<uid> directory (default: /tmp)",
  ".TP\n.B EGRESSD_RESOLV_CONF\nthe resolv.conf whose nameserver lines are the resolvers when egressd.json names none (default: /etc/resolv.conf)",
  ".SH SEE ALSO",
  prog === "egressctl" ? ".BR egressd (8), " : ".BR egressctl (8), ",
  ".BR nft (8), ",
  ".BR systemd.exec (5)",
  "",
  "The documentation in /usr/share/doc/egressd describes the policy format, the ruleset, inbound allowances, the DNS modes (dns.md), the audit and the daemon.",
];

/** Which layer enforces what, for egressctl systemd's drop-ins (docs/systemd.md has the detail). */
const LAYERS = [
  ".SH ENFORCEMENT LAYERS",
  roff(
    "egressctl systemd writes a drop-in that makes systemd enforce part of a service's policy in its unit, next to egressd's nftables rules, which enforce all of it.",
  ),
  ".TP",
  ".B systemd: cgroup BPF (IPAddressAllow=, IPAddressDeny=, SocketBindAllow=, SocketBindDeny=)",
  roff(
    "Judges every socket in the unit's cgroup, whatever uid opened it. Addresses and networks only, one list for both directions (destination going out, source coming in), no ports and no names: with domain names in the policy only what DNS never yields (loopback, link-local, multicast, cloud metadata) is refused here, and a port open to anywhere or audit mode turns the address filter off. The filter sees a DNS query after egressd's redirect (127.0.0.1, ::1) and the reply from the address asked. bind() is limited to the declared inbound ports where systemd is built with its BPF framework.",
  ),
  ".TP",
  ".B systemd: seccomp and mount namespace (User=, RestrictAddressFamilies=, InaccessiblePaths=, \\-\\-harden)",
  roff(
    'Runs the unit as the service\'s user, removes socket families the policy does not need, and for "dns": "proxy" services hides systemd-resolved\'s varlink socket and nscd\'s socket, so glibc sends DNS to port 53 where egressd sees it instead of handing lookups to a daemon that sends them as its own user.',
  ),
  ".TP",
  ".B egressd: nftables (meta skuid, meta skgid)",
  roff(
    "Judges every socket owned by the service's uid or gid, wherever the process runs (outside the unit too: cron jobs, su, the slirp4netns or pasta of rootless containers). Address, protocol and port per allowance; domain names kept resolved; DNS redirected to its per-service proxy; refusals counted and logged; audit mode; drift audited and repaired.",
  ),
  ".PP",
  roff(
    "Why both: nftables rules belong to the whole host and know a process only by its uid; another tool can flush them until egressd's audit restores them. The unit's filters hold every process of the unit whatever uid it switches to, and add what nftables cannot express. egressd covers the user outside the unit, understands names and ports, and explains what it refuses.",
  ),
];

/** egressd(8)'s account of the DNS-aware mode (docs/dns.md has the detail). */
const DNS_PROXY = [
  ".SH DNS PROXY",
  roff(
    'A service in the DNS-aware mode ("dns": "proxy", the default of egressctl register) has its own DNS lookups answered by egressd, which answers only names the service may reach and returns an answer only once the kernel allows its addresses.',
  ),
  ".TP",
  ".B Ports",
  roff(
    "Each DNS-aware service gets its own port from dns.proxyPortRange in egressd.json (default 20000-32767), on which egressd serves DNS over UDP and TCP on 127.0.0.1 and ::1. A service keeps its port across restarts (state.json records it); a port another program holds moves the service to the next free one.",
  ),
  ".TP",
  ".B Redirect per uid",
  roff(
    "A type nat hook output chain in egressd's table redirects every UDP and TCP packet to port 53 that the service's uid (or gid) sends, to any address, IPv4 or IPv6, to that service's port: meta l4proto { tcp, udp } th dport 53 redirect to :meta skuid map @uid2port. The reply comes back from the address the client asked, so ordinary resolvers accept it. The port tells egressd who asked. A redirected packet is accepted only to the sender's own port; a packet sent straight to any proxy port, and a port-53 packet of a DNS-aware service that escaped the redirect, are refused.",
  ),
  ".TP",
  ".B Answers",
  roff(
    `A name on the service's allowlist (exact, or below a *.DOMAIN wildcard) is forwarded to the configured resolvers; the answer's addresses pass the address filter and go into the service's sets in one nft transaction, with a kernel timeout of the answer's TTL (clamped to refresh.minTtlSeconds..maxTtlSeconds) plus refresh.graceSeconds, before the answer is returned. If that transaction fails the client gets SERVFAIL. Any other name is answered NXDOMAIN (REFUSED with dns.unlistedNames "refused"), never forwarded, and counted and logged with the name; a service in audit mode has it forwarded and logged as "would refuse". egressctl status shows, per service, the mode, the proxy port, queries allowed, refused and failed, and the last refused names.`,
  ),
  ".TP",
  ".B Conntrack",
  roff(
    "NAT is decided on a flow's first packet, so a UDP flow to port 53 opened before a service's redirect existed would keep reaching the resolver. When a uid gains a redirect, egressd deletes the host's UDP conntrack entries to port 53 (conntrack -D -p udp --orig-port-dst 53; the conntrack package, conntrack-tools on rpm systems). Without the tool it logs ERR_EGRESS_CONNTRACK and such flows keep going to the resolver until they idle out.",
  ),
  ".TP",
  ".B When egressd is not running",
  roff(
    "The redirect stays in the kernel and nothing answers on the ports: a DNS-aware service's new lookups fail (fail-closed). Addresses already in its sets keep working until their timeouts. A restart reuses the same ports and keeps what the kernel still holds.",
  ),
];

function ctlPage(): string {
  const lines = [
    `.TH EGRESSCTL 8 "${date}" "egressd ${pkg.version}" "System Administration"`,
    ".SH NAME",
    "egressctl \\- manage egressd, the per-service outbound firewall",
    ".SH SYNOPSIS",
    ".B egressctl",
    "[\\fIoptions\\fR] \\fIcommand\\fR [\\fIarguments\\fR]",
    ".SH DESCRIPTION",
    roff(ctl.description()),
    ".PP",
    roff(
      "Targets are HOST:PORT[/PROTO] or HOST:LOW-HIGH[/PROTO], where HOST is a domain name, a wildcard *.DOMAIN, an IPv4 address, a bracketed IPv6 address ([2001:db8::1]:443) or a CIDR (10.0.0.0/8:5432, [2001:db8::/32]:443), and PROTO is tcp (the default) or udp.",
    ),
    ".PP",
    roff(
      'A wildcard (*.cdn.example.com:443) allows every name below the domain, at any depth (a.cdn.example.com, a.b.cdn.example.com), and not the domain itself. Wildcards are valid only for services in the DNS-aware mode ("dns": "proxy", the default of register), whose lookups egressd answers: it adds the addresses of a name it allowed to the service\'s sets before the service gets the answer. A service in system or none mode cannot have one (exit 2; the hint names register --dns proxy).',
    ),
    ".SH OPTIONS",
    ...optionItems(visible(ctl)),
    ".SH COMMANDS",
  ];
  for (const c of ctl.commands) {
    lines.push(".TP", `.B ${c.name()} ${synopsisArgs(c)}`.trimEnd(), roff(c.description()));
    const opts = visible(c).filter((o) => o.long !== "--help");
    if (opts.length) lines.push(".RS", ...optionItems(opts), ".RE");
  }
  lines.push(...LAYERS);
  lines.push(
    ".SH EXAMPLES",
    ".nf",
    "egressctl register svc\\-web \\-\\-user svc\\-web \\-\\-create\\-user",
    "egressctl allow svc\\-web api.example.com:443 10.0.0.0/8:5432",
    "egressctl allow\\-in svc\\-web 8080 \\-\\-from 192.0.2.0/24",
    "egressctl status svc\\-web",
    "egressctl refused svc\\-web    # what it tried and was refused, by packets",
    "egressctl audit \\-\\-repair",
    "egressctl systemd svc\\-web \\-\\-unit web.service \\-\\-harden \\-\\-write",
    "egressctl check && systemctl reload egressd    # after configuration management wrote services.d/",
    ".fi",
    ...COMMON_TAIL("egressctl"),
  );
  return lines.join("\n") + "\n";
}

function daemonPage(): string {
  return (
    [
      `.TH EGRESSD 8 "${date}" "egressd ${pkg.version}" "System Administration"`,
      ".SH NAME",
      "egressd \\- per-service outbound firewall agent (nftables, keyed on the socket owner)",
      ".SH SYNOPSIS",
      ".B egressd",
      "[\\fIoptions\\fR]",
      ".SH DESCRIPTION",
      roff(daemon.description()),
      "At start-up it applies the last-known resolutions before any DNS query. SIGHUP reloads the configuration and policies; SIGTERM exits and leaves the ruleset in the kernel.",
      ".SH OPTIONS",
      ...optionItems(visible(daemon)),
      ...DNS_PROXY,
      ...COMMON_TAIL("egressd"),
    ].join("\n") + "\n"
  );
}

function bash(): string {
  const cmds = ctl.commands.map((c) => c.name());
  const global = visible(ctl).flatMap((o) =>
    [o.short, o.long].filter((x): x is string => Boolean(x)),
  );
  const per = ctl.commands.map((c) => {
    const flags = visible(c).flatMap((o) => [o.long].filter((x): x is string => Boolean(x)));
    // svc=1: complete a service name; svc=2: complete file names (check's paths).
    const first = c.registeredArguments[0]?.name();
    const svc = first === "service" ? 1 : first === "path" ? 2 : 0;
    return `    ${c.name()}) opts="${flags.join(" ")}"; svc=${svc} ;;`;
  });
  return `# bash completion for egressctl (generated from its --help source)
_egressctl() {
  local cur cmd opts svc i
  cur="\${COMP_WORDS[COMP_CWORD]}"
  cmd=""
  for ((i = 1; i < COMP_CWORD; i++)); do
    case "\${COMP_WORDS[i]}" in
      --config-dir|--state-dir|--socket) ((i++)) ;;
      -*) ;;
      *) cmd="\${COMP_WORDS[i]}"; break ;;
    esac
  done
  if [[ -z "$cmd" ]]; then
    COMPREPLY=($(compgen -W "${cmds.join(" ")} ${global.join(" ")}" -- "$cur"))
    return
  fi
  if [[ "\${COMP_WORDS[COMP_CWORD-1]}" == --unit ]]; then
    COMPREPLY=($(compgen -W "$(systemctl list-unit-files --type=service --no-legend 2>/dev/null | awk '{print $1}')" -- "$cur"))
    return
  fi
  opts=""; svc=0
  case "$cmd" in
${per.join("\n")}
  esac
  if [[ "$cur" == -* ]]; then
    COMPREPLY=($(compgen -W "$opts ${global.join(" ")}" -- "$cur"))
  elif [[ $svc == 1 && $((COMP_CWORD - i)) == 1 ]]; then
    local dir="\${EGRESSD_CONFIG_DIR:-/etc/egressd}/services.d"
    COMPREPLY=($(compgen -W "$(cd "$dir" 2>/dev/null && ls *.json 2>/dev/null | sed 's/\\.json$//')" -- "$cur"))
  elif [[ $svc == 2 ]]; then
    COMPREPLY=($(compgen -f -- "$cur"))
  fi
}
complete -F _egressctl egressctl
`;
}

function zsh(): string {
  const cmds = ctl.commands.map((c) => `'${c.name()}:${c.description().replace(/'/g, "")}'`);
  return `#compdef egressctl
# zsh completion for egressctl (generated from its --help source)
_egressctl() {
  local -a commands
  commands=(${cmds.join(" ")})
  if (( CURRENT == 2 )); then
    _describe 'command' commands
  else
    _files -W "\${EGRESSD_CONFIG_DIR:-/etc/egressd}/services.d" -g '*.json(:r)'
  fi
}
_egressctl "$@"
`;
}

/** The generated files, by path below the output directory. */
export function renderManpages(): Record<string, string> {
  return {
    "man/egressctl.8": ctlPage(),
    "man/egressd.8": daemonPage(),
    "completion/egressctl.bash": bash(),
    "completion/_egressctl": zsh(),
  };
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) {
  const out = process.argv[2] ?? "dist/share";
  mkdirSync(join(out, "man"), { recursive: true });
  mkdirSync(join(out, "completion"), { recursive: true });
  for (const [name, text] of Object.entries(renderManpages())) writeFileSync(join(out, name), text);
  console.log(`wrote man pages and completions under ${out}`);
}
