/**
 * `npm run demo`: the real egressd and egressctl in a throwaway network namespace, narrated.
 * Nothing here touches the host's firewall: every nft command runs inside the namespace.
 */
import { eventually, Sandbox, type Daemon, type Records } from "../test/helpers/sandbox.ts";

const SERVICE_UID = 2001;
const OTHER_UID = 3001;
const OLD = "192.0.2.10";
const NEW = "192.0.2.11";
const ELSEWHERE = "198.51.100.20";
const OLD_STYLE_UID = 2002;
const LEARNER_UID = 2003;
/** A load balancer: seven addresses, one per answer, TTL 5 s. */
const ROT = Array.from({ length: 7 }, (_, i) => `203.0.113.${100 + i}`);

const bold = (s: string) => (process.stdout.isTTY ? `\x1b[1m${s}\x1b[0m` : s);
const say = (s: string) => console.log(`\n${bold("== " + s)}`);
const indent = (s: string) =>
  s
    .trimEnd()
    .split("\n")
    .map((l) => `   ${l}`)
    .join("\n");

/** The number of rules in base chain `chain` of an `nft list table` listing. */
function baseRules(listing: string, chain: string): number {
  const body = new RegExp(`chain ${chain} \\{\\n([\\s\\S]*?)\\n\\s*\\}`).exec(listing)?.[1] ?? "";
  return body.split("\n").filter((l) => l.trim() && !/^\s*type \w+ hook/.test(l)).length;
}

const RECORDS = (api: string): Records => ({
  "api.example.test": { A: [api], ttl: 2 },
  "www.lb.example.test": { A: ROT, rotate: true, ttl: 5 },
  "c2VjcmV0.exfil.example.test": { A: [ELSEWHERE], ttl: 60 },
  "billing.example.test": { A: [ELSEWHERE], ttl: 60 },
});

async function ctl(sb: Sandbox, ...args: string[]): Promise<void> {
  console.log(`$ egressctl ${args.join(" ")}`);
  const r = await sb.egressctl(...args);
  if (r.stdout) console.log(indent(r.stdout));
  if (r.stderr) console.log(indent(r.stderr));
  if (r.exitCode !== 0) throw new Error(`egressctl ${args.join(" ")} exited ${r.exitCode}`);
}

async function connect(
  sb: Sandbox,
  uid: number,
  host: string,
  port: number,
  expect: string,
): Promise<void> {
  const result = await sb.try1(uid, "tcp", host, port);
  const mark = result === expect ? "as expected" : `UNEXPECTED (wanted ${expect})`;
  console.log(`   uid ${uid} -> ${host}:${port}  ${result.padEnd(13)} ${mark}`);
  if (result !== expect) throw new Error(`demo expectation failed for ${host}:${port}`);
}

async function main(): Promise<void> {
  say(
    "Setting up two throwaway network namespaces, a host and its internet (the real firewall is not touched)",
  );
  const sb = await Sandbox.create({
    addresses: [OLD, NEW, ELSEWHERE, ...ROT],
    listen: [
      ...[OLD, NEW, ELSEWHERE].flatMap((host) =>
        [443, 8080].map((port) => ({ proto: "tcp" as const, host, port })),
      ),
      ...ROT.map((host) => ({ proto: "tcp" as const, host, port: 443 })),
    ],
    records: RECORDS(OLD),
    config: {
      resolvers: ["127.0.0.1:53"],
      refresh: { minTtlSeconds: 1, maxTtlSeconds: 60, graceSeconds: 3 },
    },
  });
  let daemon: Daemon | null = null;
  try {
    console.log(
      `   namespace ${sb.ns} is the host; ${sb.netNs}, behind a veth pair, is the internet: web servers on ${OLD}, ${NEW}, ${ELSEWHERE} (ports 443, 8080)`,
    );
    console.log(`   DNS server on the host's 127.0.0.1:53: api.example.test A ${OLD} (TTL 2 s)`);
    console.log(`   config: ${sb.configDir}/egressd.json (grace period 3 s)`);

    say("Register a service running as uid 2001");
    await ctl(sb, "register", "svc-demo", "--user", String(SERVICE_UID));

    say("Start egressd");
    daemon = await sb.startDaemon();
    console.log(
      `   egressd is running (pid ${daemon.child.pid}); its control socket is ${sb.socket}`,
    );

    say("Allow svc-demo to reach api.example.test on port 443");
    await ctl(sb, "allow", "svc-demo", "api.example.test:443");

    say(
      "Connections opened by processes running as uid 2001 (svc-demo) and uid 3001 (not registered)",
    );
    await connect(sb, SERVICE_UID, OLD, 443, "connected");
    await connect(sb, SERVICE_UID, OLD, 8080, "ECONNREFUSED");
    await connect(sb, SERVICE_UID, ELSEWHERE, 443, "ECONNREFUSED");
    await connect(sb, OTHER_UID, ELSEWHERE, 443, "connected");
    console.log("   (refusals are TCP resets: the client knows at once, nothing hangs)");

    say(`The provider moves api.example.test from ${OLD} to ${NEW}`);
    sb.setRecords(RECORDS(NEW));
    const added = await daemon.waitFor(
      (l) => l.name === "api.example.test" && Array.isArray(l.added) && l.added.includes(NEW),
      20_000,
    );
    console.log(
      `   egressd log: ${JSON.stringify({ msg: added.msg, services: added.services, added: added.added, removed: added.removed })}`,
    );
    await connect(sb, SERVICE_UID, NEW, 443, "connected");
    await connect(sb, SERVICE_UID, OLD, 443, "connected");
    console.log(
      `   ${OLD} stays allowed for the grace period: applications may still hold the old answer`,
    );

    say("After the grace period the old address is gone");
    await eventually(
      async () => (await sb.try1(SERVICE_UID, "tcp", OLD, 443)) === "ECONNREFUSED",
      20_000,
      "old address refused",
    );
    const removed = await daemon.waitFor(
      (l) => l.name === "api.example.test" && Array.isArray(l.removed) && l.removed.includes(OLD),
    );
    console.log(
      `   egressd log: ${JSON.stringify({ msg: removed.msg, services: removed.services, added: removed.added, removed: removed.removed })}`,
    );
    await connect(sb, SERVICE_UID, OLD, 443, "ECONNREFUSED");
    await connect(sb, SERVICE_UID, NEW, 443, "connected");

    say(
      "DNS-aware (the default): svc-demo's own lookups go to egressd, which answers only names it may reach",
    );
    await ctl(sb, "allow", "svc-demo", "*.lb.example.test:443");
    console.log(
      `   www.lb.example.test hands out one address of seven per query (${ROT[0]} ... ${ROT[6]}), TTL 5 s`,
    );
    const rounds = (uid: number) =>
      sb.probe(uid, [
        {
          proto: "resolve-connect",
          host: "127.0.0.1",
          port: 53,
          name: "www.lb.example.test",
          connectPort: 443,
          count: 10,
        },
      ]);
    const [aware] = await rounds(SERVICE_UID);
    const okAware = /^ok:(\d+)/.exec(aware?.result ?? "")?.[1];
    console.log(`   svc-demo resolves and connects, 10 times: ${okAware}/10 connected`);
    if (okAware !== "10") throw new Error(`demo expectation failed: ${aware?.result}`);
    await ctl(sb, "register", "svc-old", "--user", String(OLD_STYLE_UID), "--dns", "system");
    await ctl(sb, "allow", "svc-old", "www.lb.example.test:443");
    const [old] = await rounds(OLD_STYLE_UID);
    console.log(
      `   the same from svc-old, "dns": "system" (egressd resolves on its own, the service asks the resolver): ${/^ok:(\d+)/.exec(old?.result ?? "")?.[1]}/10 connected`,
    );

    say("A name svc-demo may not look up never leaves the host");
    const [leak] = await sb.probe(SERVICE_UID, [
      { proto: "resolve", host: "127.0.0.1", port: 53, name: "c2VjcmV0.exfil.example.test" },
    ]);
    console.log(`   svc-demo asks for c2VjcmV0.exfil.example.test: ${leak?.result}`);
    if (leak?.result !== "NXDOMAIN:") throw new Error(`demo expectation failed: ${leak?.result}`);
    const seen = sb.dnsLog().some((l) => l.includes("exfil"));
    console.log(
      `   the DNS server's query log ${seen ? "SAW IT (unexpected)" : "never saw it: egressd answered NXDOMAIN itself"}`,
    );
    if (seen) throw new Error("demo expectation failed: the query left the host");

    say(
      "Learning an allowlist: svc-new runs in audit mode for a while, then egressd proposes one by name",
    );
    await ctl(sb, "register", "svc-new", "--user", String(LEARNER_UID));
    await ctl(sb, "learn", "svc-new", "--for", "10m");
    const learned = await sb.probe(LEARNER_UID, [
      {
        proto: "resolve-connect",
        host: "127.0.0.1",
        port: 53,
        name: "billing.example.test",
        connectPort: 8080,
        count: 2,
      },
      { proto: "tcp", host: NEW, port: 443 },
    ]);
    console.log(
      `   svc-new looks up billing.example.test and connects to it on 8080 (${learned[0]?.result}), and to ${NEW}:443 by address (${learned[1]?.result})`,
    );
    if (learned[0]?.result !== "ok:2/2" || learned[1]?.result !== "connected")
      throw new Error(`demo expectation failed: ${JSON.stringify(learned)}`);
    await ctl(sb, "learn", "svc-new", "--show");
    await ctl(sb, "learn", "svc-new", "--apply");
    await connect(sb, LEARNER_UID, NEW, 443, "connected");
    await connect(sb, LEARNER_UID, OLD, 443, "ECONNREFUSED");

    say("Live status");
    await ctl(sb, "status");

    const table = await sb.nft("list", "table", "inet", "egressd");
    // Counted from the listing, so the heading stays true when the ruleset changes.
    const base = ["output", "input", "dns_redirect"]
      .map((c) => `${baseRules(table, c)} rules in ${c}`)
      .join(", ");
    say(
      `The rules egressd keeps in the namespace's kernel: one table; its base chains hold ${base}, whatever the number of services`,
    );
    console.log(
      indent(
        table
          .split("\n")
          .filter((l) => !/^\s*$/.test(l))
          .join("\n"),
      ),
    );

    say(
      "Where svc-demo tried to go and was refused, as the kernel recorded it (no log parsing): by packets, with the name an address came from",
    );
    await ctl(sb, "refused", "svc-demo");
    const refused = JSON.parse((await sb.egressctl("--json", "refused", "svc-demo")).stdout) as {
      entries: { address: string; port: number }[];
    };
    if (!refused.entries.some((e) => e.address === ELSEWHERE && e.port === 443))
      throw new Error(`demo expectation failed: ${ELSEWHERE}:443 not in egressctl refused`);

    say(
      "The same through metrics: egressctl metrics prints what a Prometheus scrape gets (the histograms' _bucket lines left out here)",
    );
    const scrape = (await sb.egressctl("metrics")).stdout;
    const shown = scrape
      .trimEnd()
      .split("\n")
      .filter((l) => l !== "" && !l.includes("_bucket{"));
    console.log("$ egressctl metrics");
    console.log(indent(shown.join("\n")));
    if (!/^egressd_service_refused_packets_total\{service="svc-demo"\} [1-9]/m.test(scrape))
      throw new Error("demo expectation failed: svc-demo's refused packets are not in the metrics");
  } finally {
    say("Cleaning up: stopping egressd and deleting the namespaces");
    await daemon?.stop();
    await sb.destroy();
  }
  console.log("\nDone. Run the tests with: sudo bash scripts/test-all.sh");
}

main().catch((err: unknown) => {
  console.error(`demo failed: ${(err as Error).message}`);
  process.exitCode = 1;
});
