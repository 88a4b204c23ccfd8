import { suite } from "uvu";
import * as assert from "uvu/assert";
import { execa } from "execa";
import { renderManpages } from "../../scripts/manpages.ts";

const test = suite("the generated man pages and completions");
const files = renderManpages();
function page(name: string): string {
  const text = files[name];
  if (text === undefined) throw new Error(`${name} was not generated`);
  return text;
}

/** The roff source with its escapes undone, as man shows it (\- is -, \e is \). */
const plain = (roff: string) => roff.replace(/\\-/g, "-").replace(/\\e/g, "\\").replace(/\\&/g, "");

/** The text of one .SH section, up to the next. */
function section(roff: string, title: string): string {
  const at = roff.indexOf(`\n.SH ${title}\n`);
  assert.ok(at >= 0, `no section ${title}`);
  const end = roff.indexOf("\n.SH ", at + 1);
  return roff.slice(at, end < 0 ? undefined : end);
}

test("egressctl(8) gives the target syntax with *.DOMAIN wildcards, for DNS-aware services only", () => {
  const desc = plain(section(page("man/egressctl.8"), "DESCRIPTION"));
  assert.match(desc, "HOST:PORT[/PROTO] or HOST:LOW-HIGH[/PROTO]");
  assert.match(desc, "a wildcard *.DOMAIN");
  assert.match(
    desc,
    /\*\.cdn\.example\.com:443\) allows every name below the domain, at any depth/,
  );
  assert.match(desc, /not the domain itself/);
  assert.match(desc, /valid only for services in the DNS-aware mode \("dns": "proxy"/);
  assert.match(desc, "register --dns proxy");
});

test("egressctl(8) has the systemd command with its options, and the ENFORCEMENT LAYERS section", () => {
  const roff = page("man/egressctl.8");
  const cmds = section(roff, "COMMANDS");
  const at = cmds.indexOf(".B systemd \\fI<service>\\fR");
  assert.ok(at >= 0, "no systemd command in COMMANDS");
  const systemd = plain(cmds.slice(at, cmds.indexOf("\n.TP\n.B ", cmds.indexOf(".RE", at))));
  for (const flag of ["--unit <name.service>", "--harden", "--rootless-containers", "--write"])
    assert.match(systemd, `.B ${flag}`);
  assert.match(systemd, "--systemd-dir <dir>");
  const layers = plain(section(roff, "ENFORCEMENT LAYERS"));
  assert.match(layers, "systemd: cgroup BPF (IPAddressAllow=, IPAddressDeny=");
  assert.match(layers, "egressd: nftables (meta skuid, meta skgid)");
  assert.match(layers, "Why both:");
  assert.match(plain(section(roff, "EXAMPLES")), "egressctl systemd svc-web --unit web.service");
});

test("egressctl(8) says status shows each service's DNS mode and proxy counters", () => {
  const cmds = plain(section(page("man/egressctl.8"), "COMMANDS"));
  assert.match(
    cmds,
    /\.B status \[\\fIservice\\fR\]\n[^\n]*DNS mode, proxy port, queries allowed and refused, last refused names/,
  );
});

test("egressd(8) describes the DNS proxy: its ports on 127.0.0.1 and ::1, the per-uid redirect, conntrack, fail-closed", () => {
  const dns = plain(section(page("man/egressd.8"), "DNS PROXY"));
  assert.match(dns, "dns.proxyPortRange");
  assert.match(dns, "127.0.0.1 and ::1");
  assert.match(dns, "th dport 53 redirect to :meta skuid map @uid2port");
  assert.match(dns, "conntrack -D -p udp --orig-port-dst 53");
  assert.match(dns, "fail-closed");
  assert.match(dns, "NXDOMAIN");
});

test("the bash completion offers systemd, its options, and unit names after --unit", () => {
  const bash = page("completion/egressctl.bash");
  const top = /COMPREPLY=\(\$\(compgen -W "([^"]*)"/.exec(bash)?.[1] ?? "";
  assert.ok(top.split(" ").includes("systemd"), `top-level words: ${top}`);
  const line = bash.split("\n").find((l) => l.trim().startsWith("systemd)"));
  assert.ok(line, "no case for systemd");
  const opts = /opts="([^"]*)"/.exec(line)?.[1]?.split(" ") ?? [];
  for (const o of ["--unit", "--harden", "--rootless-containers", "--write", "--systemd-dir"])
    assert.ok(opts.includes(o), `systemd's options ${opts.join(" ")} lack ${o}`);
  assert.match(line, "svc=1", "the systemd command's first argument completes service names");
  assert.match(
    bash,
    /== --unit ]]; then\n\s+COMPREPLY=\(\$\(compgen -W "\$\(systemctl list-unit-files --type=service/,
  );
});

test("the bash completion is valid bash", async () => {
  const r = await execa("bash", ["-n"], {
    input: page("completion/egressctl.bash"),
    reject: false,
  });
  assert.is(r.exitCode, 0, r.stderr);
});

test.run();
