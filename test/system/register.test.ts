import { suite } from "uvu";
import * as assert from "uvu/assert";
import { HOST_ADDRESSES, withSandbox, type Sandbox } from "../helpers/sandbox.ts";
import { OTHER, SVC_UID, UNMANAGED_UID, WORLD } from "./world.ts";

const test = suite(
  "register reads the namespace's socket table: no silent cut of a running server",
);

const HOST = HOST_ADDRESSES.v4;

async function connectFromInternet(sb: Sandbox, port: number): Promise<string | undefined> {
  const [r] = await sb.probeFrom(UNMANAGED_UID, [
    { proto: "tcp", host: HOST, port, source: OTHER, timeoutMs: 2000 },
  ]);
  return r?.result;
}

test("a uid serving undeclared ports is refused without --force, named port by port, and accepted with it", async () => {
  await withSandbox(WORLD, async (sb) => {
    await sb.serveAs(SVC_UID, [
      { proto: "tcp", host: "::", port: 9082 },
      { proto: "udp", host: HOST, port: 6354 },
    ]);
    let r = await sb.egressctl("register", "svc-web", "--user", String(SVC_UID));
    assert.is(r.exitCode, 2, r.stderr);
    assert.match(
      r.stderr,
      "uid 2001 listens on ports svc-web does not declare: 6354/udp (on 203.0.113.1), 9082/tcp (on [::])",
    );
    assert.match(r.stderr, "or add --force to register anyway");
    r = await sb.egressctl("list");
    assert.match(r.stdout, "no services registered");

    r = await sb.egressctl("register", "svc-web", "--user", String(SVC_UID), "--force");
    assert.is(r.exitCode, 0, r.stderr);
    assert.match(r.stderr, "warning: uid 2001 listens on ports svc-web does not declare");

    // A uid that listens on nothing registers as before, without a word on stderr.
    r = await sb.egressctl("register", "svc-other", "--user", String(UNMANAGED_UID));
    assert.is(r.exitCode, 0, r.stderr);
    assert.is(r.stderr, "");
  });
});

test("audit mode, allow-in, then enforce registers a running server that keeps serving", async () => {
  await withSandbox(WORLD, async (sb) => {
    await sb.serveAs(SVC_UID, [{ proto: "tcp", host: "::", port: 9082 }]);
    for (const args of [
      ["register", "svc-web", "--user", String(SVC_UID), "--mode", "audit"],
      ["allow-in", "svc-web", "9082"],
      ["register", "svc-web", "--user", String(SVC_UID)],
      ["apply"],
    ]) {
      const r = await sb.egressctl(...args);
      assert.is(r.exitCode, 0, `egressctl ${args.join(" ")}: ${r.stderr}`);
    }
    assert.match((await sb.egressctl("list", "svc-web")).stdout, "mode enforce");
    assert.is(await connectFromInternet(sb, 9082), "connected");
  });
});

test.run();
