import parse from "parse-prometheus-text-format";
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { EgressError } from "../../rules/errors.ts";
import { parseListen, validateConfig } from "../../rules/policy.ts";
import { Metrics } from "../../agent/metrics/metrics.ts";

const test = suite("metrics: definitions, values read at scrape, metrics.listen");

const CONFIG = "/etc/egressd/egressd.json";

test("metrics.listen: unix:PATH, IPv4:PORT and [IPv6]:PORT; anything else is refused naming the value, the file and the fix", () => {
  assert.equal(parseListen("unix:/run/egressd/metrics.sock"), {
    kind: "unix",
    path: "/run/egressd/metrics.sock",
  });
  assert.equal(parseListen("127.0.0.1:9100"), {
    kind: "tcp",
    host: "127.0.0.1",
    port: 9100,
    family: 4,
  });
  assert.equal(parseListen("[::1]:9100"), { kind: "tcp", host: "::1", port: 9100, family: 6 });
  for (const bad of [
    "unix:metrics.sock",
    "localhost:9100",
    "127.0.0.1",
    "127.0.0.1:70000",
    "::1:9100",
  ])
    assert.ok("error" in parseListen(bad), bad);
  assert.equal(validateConfig({}, CONFIG).metrics, {}, "off unless set");
  try {
    validateConfig({ metrics: { listen: "localhost:9100" } }, CONFIG);
    assert.unreachable("accepted");
  } catch (err) {
    assert.instance(err, EgressError);
    const [p] = (err as EgressError).problems;
    assert.is(p?.where, `${CONFIG}: $.metrics.listen`);
    assert.match(p?.text ?? "", '"localhost:9100"');
    assert.match(p?.text ?? "", "127.0.0.1:9100");
  }
});

test("values come from the daemon at each scrape; counters, gauges and histograms parse", async () => {
  const m = new Metrics("1.2.3", 0);
  let packets = 5;
  m.source = async () => ({
    refused: new Map([["svc-web", { packets, bytes: packets * 60 }]]),
    proxy: new Map([["svc-web", { allowed: 3, refused: 1, failed: 0 }]]),
    nameAddresses: new Map([["api.example.test", 3]]),
    serviceAddresses: new Map([["svc-web", 4]]),
    lastRefresh: 10_000,
    lastAudit: null,
    generation: 2,
    now: 12_500,
  });
  m.observeApply("full", 0.02, true);
  m.observeApply("incremental", 0, false);
  m.observeDns({ server: "127.0.0.1:53", transport: "udp", ms: 3, outcome: 2 });
  m.observeDns({ server: "127.0.0.1:53", transport: "udp", ms: 2000, outcome: "TIMEOUT" });
  m.observeDns({ server: "127.0.0.1:53", transport: "udp", ms: 1, outcome: 0 });
  const text = await m.text();
  const fams = new Map(parse(text).map((f) => [f.name, f]));
  const v = (name: string, labels: Record<string, string> = {}) =>
    fams.get(name)?.metrics.find((s) => JSON.stringify(s.labels ?? {}) === JSON.stringify(labels))
      ?.value;
  assert.is(v("egressd_service_refused_packets_total", { service: "svc-web" }), "5");
  assert.is(v("egressd_service_refused_bytes_total", { service: "svc-web" }), "300");
  assert.is(v("egressd_dns_proxy_queries_total", { service: "svc-web", result: "refused" }), "1");
  assert.is(v("egressd_name_addresses", { name: "api.example.test" }), "3");
  assert.is(v("egressd_service_addresses", { service: "svc-web" }), "4");
  assert.is(v("egressd_last_refresh_age_seconds"), "2.5");
  assert.is(v("egressd_last_audit_age_seconds"), "-1");
  assert.is(v("egressd_policy_generation"), "2");
  assert.is(v("egressd_apply_failures_total", { kind: "incremental" }), "1");
  assert.is(
    v("egressd_dns_query_failures_total", { resolver: "127.0.0.1:53", rcode: "SERVFAIL" }),
    "1",
  );
  assert.is(
    v("egressd_dns_query_failures_total", { resolver: "127.0.0.1:53", rcode: "TIMEOUT" }),
    "1",
  );
  assert.is(v("egressd_build_info", { version: "1.2.3", node: process.versions.node }), "1");
  assert.is(fams.get("egressd_apply_duration_seconds")?.type, "HISTOGRAM");
  assert.match(text, /^egressd_apply_duration_seconds_count\{kind="full"\} 1$/m);
  assert.match(text, /^egressd_dns_query_duration_seconds_count\{resolver="127\.0\.0\.1:53"\} 3$/m);
  // The kernel's counter is read again at the next scrape (a counter that was reset, e.g. by a
  // table replace, shows the kernel's value: Prometheus treats the drop as a counter reset).
  packets = 9;
  assert.match(await m.text(), /^egressd_service_refused_packets_total\{service="svc-web"\} 9$/m);
});

test("scrapes closer together than the interval reuse the values read last time", async () => {
  const m = new Metrics("1.2.3", 60_000);
  let reads = 0;
  m.source = async () => {
    reads++;
    return {
      refused: new Map(),
      proxy: new Map(),
      nameAddresses: new Map(),
      serviceAddresses: new Map(),
      lastRefresh: null,
      lastAudit: null,
      generation: 1,
      now: 0,
    };
  };
  await Promise.all(Array.from({ length: 20 }, () => m.text()));
  assert.is(reads, 1);
});

test.run();
