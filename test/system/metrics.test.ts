/**
 * The Prometheus endpoint (metrics.listen): scraped over a unix socket and over TCP inside the
 * namespace, parsed with a Prometheus text-format parser, and its refused counter moves when a
 * real process under the service's uid is refused. `egressctl metrics` prints the same text.
 */
import { spawn } from "node:child_process";
import { existsSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { request } from "node:http";
import { join } from "node:path";
import parse from "parse-prometheus-text-format";
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { eventually, withSandbox, type Sandbox } from "../helpers/sandbox.ts";
import { OTHER, SVC_UID, WORLD } from "./world.ts";

const test = suite(
  "metrics: a Prometheus endpoint on a unix socket or HOST:PORT, and egressctl metrics",
);

const FAMILIES = [
  "egressd_build_info",
  "egressd_service_refused_packets_total",
  "egressd_service_refused_bytes_total",
  "egressd_dns_proxy_queries_total",
  "egressd_name_addresses",
  "egressd_service_addresses",
  "egressd_dns_query_duration_seconds",
  "egressd_dns_query_failures_total",
  "egressd_apply_duration_seconds",
  "egressd_apply_failures_total",
  "egressd_drift_findings_total",
  "egressd_drift_repairs_total",
  "egressd_last_refresh_age_seconds",
  "egressd_last_audit_age_seconds",
  "egressd_policy_generation",
];

type Family = ReturnType<typeof parse>[number];

function byName(text: string): Map<string, Family> {
  return new Map(parse(text).map((f) => [f.name, f]));
}

/** The value of one series of a counter or gauge family (labels matched exactly), or null. */
function value(fams: Map<string, Family>, name: string, labels: Record<string, string> = {}) {
  const f = fams.get(name);
  const m = (f?.metrics as { labels?: Record<string, string>; value?: string }[] | undefined)?.find(
    (s) => JSON.stringify(s.labels ?? {}) === JSON.stringify(labels),
  );
  return m?.value === undefined ? null : Number(m.value);
}

/** GET /metrics over a unix socket. */
function scrapeUnix(path: string): Promise<{ status: number; type: string; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request({ socketPath: path, path: "/metrics" }, (res) => {
      let body = "";
      res.setEncoding("utf8");
      res.on("data", (d: string) => (body += d));
      res.on("end", () =>
        resolve({ status: res.statusCode ?? 0, type: String(res.headers["content-type"]), body }),
      );
    });
    req.on("error", reject);
    req.end();
  });
}

/** A scrape after the endpoint's 1 s reuse interval: the values are read anew. */
async function scrapeFresh(path: string): Promise<string> {
  await new Promise((r) => setTimeout(r, 1100));
  return (await scrapeUnix(path)).body;
}

/** GET over TCP inside the namespace (curl), so the address is the namespace's. */
async function scrapeTcp(sb: Sandbox, url: string): Promise<string> {
  const r = await sb.exec("curl", ["-sS", "--fail", "--max-time", "5", url]);
  if (r.exitCode !== 0) throw new Error(`curl ${url}: ${r.stderr}`);
  return r.stdout;
}

test("unix socket and TCP: every family parses, the refused counter moves, a reload rebinds, egressctl metrics prints the same families", async () => {
  await withSandbox(WORLD, async (sb) => {
    const sock = join(sb.dir, "run", "metrics.sock");
    sb.writeConfig({
      ...WORLD.config,
      audit: { schedule: "*/2 * * * * *", repair: true },
      metrics: { listen: `unix:${sock}` },
    });
    await sb.ok("register", "svc-web", "--user", String(SVC_UID));
    await sb.ok("allow", "svc-web", "api.example.test:443");
    const d = await sb.startDaemon();
    await d.waitFor((l) => l.msg === "metrics endpoint ready");
    assert.is(statSync(sock).mode & 0o777, 0o660, "root and the daemon's group only");

    const first = await scrapeUnix(sock);
    assert.is(first.status, 200);
    assert.match(first.type, /^text\/plain; version=0\.0\.4/);
    const fams = byName(first.body);
    for (const name of FAMILIES) assert.ok(fams.has(name), `${name} missing:\n${first.body}`);
    assert.is(fams.get("egressd_apply_duration_seconds")?.type, "HISTOGRAM");
    assert.is(fams.get("egressd_dns_query_duration_seconds")?.type, "HISTOGRAM");
    assert.is(fams.get("egressd_service_refused_packets_total")?.type, "COUNTER");
    // The parser merges a histogram's labelled series into one: the per-kind count is read from
    // its sample line. The start-up applied the whole table once at least.
    const fullCount = /^egressd_apply_duration_seconds_count\{kind="full"\} (\d+)$/m.exec(
      first.body,
    );
    assert.ok(Number(fullCount?.[1]) >= 1, `a full apply was timed:\n${first.body}`);
    assert.match(
      first.body,
      /^egressd_dns_query_duration_seconds_count\{resolver="127\.0\.0\.1:53"\} [1-9]/m,
    );
    assert.is(value(fams, "egressd_name_addresses", { name: "api.example.test" }), 3);
    assert.ok((value(fams, "egressd_policy_generation") ?? 0) >= 1);
    // -1 until this daemon has refreshed (it may have started from saved state); then an age.
    await sb.ok("refresh");
    const refreshed = byName(await scrapeFresh(sock));
    const age = value(refreshed, "egressd_last_refresh_age_seconds") ?? -1;
    assert.ok(age >= 0 && age < 5, `refresh age ${age}`);
    const before =
      value(fams, "egressd_service_refused_packets_total", { service: "svc-web" }) ?? 0;
    const bytesBefore =
      value(fams, "egressd_service_refused_bytes_total", { service: "svc-web" }) ?? 0;

    // A real connection by a real process under svc-web's uid, refused by the kernel.
    assert.is(await sb.try1(SVC_UID, "tcp", OTHER, 443), "ECONNREFUSED");
    const after = byName(await scrapeFresh(sock));
    const packets = value(after, "egressd_service_refused_packets_total", { service: "svc-web" });
    assert.ok(packets !== null && packets > before, `refused packets ${before} -> ${packets}`);
    const bytes = value(after, "egressd_service_refused_bytes_total", { service: "svc-web" });
    assert.ok(bytes !== null && bytes > bytesBefore, `refused bytes ${bytesBefore} -> ${bytes}`);

    // The audit runs every 2 s: its age becomes a number of seconds.
    await eventually(
      async () =>
        (value(byName((await scrapeUnix(sock)).body), "egressd_last_audit_age_seconds") ?? -1) >= 0,
      10_000,
      "an audit is reported",
    );

    // egressctl metrics: the same text through the control socket, parseable.
    const cli = byName(await sb.ok("metrics"));
    for (const name of FAMILIES) assert.ok(cli.has(name), `egressctl metrics: ${name} missing`);
    assert.ok(
      (value(cli, "egressd_service_refused_packets_total", { service: "svc-web" }) ?? 0) >= packets,
    );

    // SIGHUP with another listen: the unix socket goes, 127.0.0.1:9464 answers.
    sb.writeConfig({ ...WORLD.config, metrics: { listen: "127.0.0.1:9464" } });
    d.child.kill("SIGHUP");
    await d.waitFor((l) => l.msg === "metrics endpoint ready" && l.listen === "127.0.0.1:9464");
    assert.not.ok(existsSync(sock), "the old socket is removed");
    const tcp = byName(await scrapeTcp(sb, "http://127.0.0.1:9464/metrics"));
    for (const name of FAMILIES) assert.ok(tcp.has(name), `tcp: ${name} missing`);
    assert.ok(
      (value(tcp, "egressd_service_refused_packets_total", { service: "svc-web" }) ?? 0) >= packets,
    );
    // Bound exactly there: not on the namespace's other addresses.
    const other = await sb.exec("curl", ["-sS", "--max-time", "3", "http://[::1]:9464/metrics"]);
    assert.is.not(other.exitCode, 0, "not listening on ::1");

    // Off by default: a config without "metrics" closes the endpoint; egressctl metrics still answers.
    sb.writeConfig({ ...WORLD.config });
    d.child.kill("SIGHUP");
    await d.waitFor((l) => l.msg === "metrics endpoint closed");
    const gone = await sb.exec("curl", ["-sS", "--max-time", "3", "http://127.0.0.1:9464/metrics"]);
    assert.is.not(gone.exitCode, 0, "nothing listens once metrics.listen is gone");
    assert.ok(byName(await sb.ok("metrics")).has("egressd_policy_generation"));
  });
});

test("a file that is not a socket is left alone (logged, enforcing, egressctl metrics still works); a stale socket is replaced", async () => {
  await withSandbox(WORLD, async (sb) => {
    const path = join(sb.dir, "metrics.sock");
    writeFileSync(path, "keep me\n");
    sb.writeConfig({ ...WORLD.config, metrics: { listen: `unix:${path}` } });
    await sb.ok("register", "svc-web", "--user", String(SVC_UID));
    const d = await sb.startDaemon();
    const err = await d.waitFor(
      (l) => (l.err as { code?: string })?.code === "ERR_EGRESS_METRICS_LISTEN",
    );
    assert.match(String(err.msg), "is not a socket");
    assert.is(readFileSync(path, "utf8"), "keep me\n", "never unlinked");
    assert.is(await sb.try1(SVC_UID, "tcp", OTHER, 443), "ECONNREFUSED", "still enforcing");
    assert.ok(byName(await sb.ok("metrics")).has("egressd_build_info"));
    assert.match(await sb.ok("status"), "metrics endpoint NOT listening");
    await d.stop();

    // A socket left by a killed process (nobody answers on it) does not stop the endpoint.
    const { rmSync } = await import("node:fs");
    rmSync(path);
    const holder = spawn(process.execPath, [
      "-e",
      `require("net").createServer().listen(${JSON.stringify(path)}, () => console.log("up"))`,
    ]);
    await new Promise<void>((r) => holder.stdout.once("data", () => r()));
    holder.kill("SIGKILL");
    await new Promise((r) => holder.once("exit", r));
    assert.ok(statSync(path).isSocket(), "a stale socket file is left");
    const d2 = await sb.startDaemon();
    await d2.waitFor((l) => l.msg === "metrics endpoint ready");
    const r = await scrapeUnix(path);
    assert.is(r.status, 200);
    assert.ok(byName(r.body).has("egressd_policy_generation"));
  });
});

test.run();
