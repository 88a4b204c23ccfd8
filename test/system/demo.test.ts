/**
 * The demo (`npm run demo`) is documentation that runs: README and docs/observability.md quote
 * its output. It checks its own expectations and exits non-zero when one fails; this runs it to
 * the end and checks the lines issue 12 and 14 promise, so a change that breaks them fails here.
 */
import { execFileSync } from "node:child_process";
import { execa } from "execa";
import { suite } from "uvu";
import * as assert from "uvu/assert";

const test = suite("the demo runs to the end, as the docs quote it");

test("a rotating name connects 10/10 under a wildcard, an exfiltration name is NXDOMAIN and never asked upstream, refused and metrics are shown, and it cleans up", async () => {
  const child = execa(process.execPath, ["--import", "tsx", "scripts/demo.ts"], {
    reject: false,
    timeout: 300_000,
    env: { FORCE_COLOR: "0" },
  });
  const pid = child.pid;
  const r = await child;
  const out = r.stdout + r.stderr;
  assert.is(r.exitCode, 0, out);
  assert.match(r.stdout, "svc-demo resolves and connects, 10 times: 10/10 connected");
  assert.match(r.stdout, /svc-demo asks for c2VjcmV0\.exfil\.example\.test: NXDOMAIN:/);
  assert.match(
    r.stdout,
    "the DNS server's query log never saw it: egressd answered NXDOMAIN itself",
  );
  assert.match(r.stdout, "$ egressctl refused");
  assert.match(r.stdout, /egressd_service_refused_packets_total\{service="svc-demo"\} [1-9]/);
  assert.match(r.stdout, "$ egressctl learn svc-new --show");
  const left = execFileSync("ip", ["netns", "list"], { encoding: "utf8" })
    .split("\n")
    .filter((l) => l.startsWith(`egt-${pid}-`));
  assert.equal(left, [], "the demo's namespaces are gone");
});

test.run();
