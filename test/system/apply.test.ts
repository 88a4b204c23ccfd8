import { cpSync, existsSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { execa } from "execa";
import { execNft } from "../../agent/nft/nft.exec.ts";
import { replaceBatch } from "../../rules/batch.ts";
import { compile } from "../../rules/compile.ts";
import { diff } from "../../rules/diff.ts";
import { EgressError } from "../../rules/errors.ts";
import { parseLive } from "../../rules/live.ts";
import { PolicyStore } from "../../agent/store/policy-store.fs.ts";
import { validateService } from "../../rules/policy.ts";
import { policy } from "../helpers/builders.ts";
import { EGRESSCTL, withSandbox } from "../helpers/sandbox.ts";
import { API4, DB, OTHER, SVC_UID, WORLD } from "./world.ts";

const test = suite("apply: atomicity, scale, users, DNS failures");

test("a batch that nft rejects is reported with command, exit code and message, and leaves the previous ruleset in force", async () => {
  await withSandbox(WORLD, async (sb) => {
    assert.is((await sb.egressctl("register", "svc-web", "--user", String(SVC_UID))).exitCode, 0);
    assert.is((await sb.egressctl("allow", "svc-web", `${DB}:5432`)).exitCode, 0);
    assert.is((await sb.egressctl("apply")).exitCode, 0);
    const before = await sb.nft("list", "table", "inet", "egressd");

    // A batch that passes egressd's schema but that the kernel refuses: its last rule names a set
    // that does not exist. Everything before it (the table delete and re-create) must not apply.
    const r = compile(policy().service("svc-web", SVC_UID).allow(`${OTHER}:443`).build());
    const batch = replaceBatch(r, 0);
    batch.nftables.push({
      add: {
        rule: {
          family: "inet",
          table: "egressd",
          chain: "s_svc_web",
          expr: [
            {
              match: {
                op: "==",
                left: { payload: { protocol: "ip", field: "daddr" } },
                right: "@no_such_set",
              },
            },
            { accept: null },
          ],
        },
      },
    });
    try {
      await execNft(sb.nftWrapper()).apply(batch);
      assert.unreachable("nft accepted a rule naming a missing set");
    } catch (err) {
      assert.instance(err, EgressError);
      const e = err as EgressError;
      assert.is(e.exitCode, 3);
      assert.is(e.code, "ERR_EGRESS_NFT_FAILED");
      assert.match(String(e.details?.command), "-j -f");
      assert.is(e.details?.exitCode, 1);
      assert.match(e.message, "nft failed (exit 1)");
      assert.match(String(e.details?.stderr), "Error");
    }
    assert.is(await sb.nft("list", "table", "inet", "egressd"), before);
    assert.is(await sb.try1(SVC_UID, "tcp", DB, 5432), "connected");
    assert.is(await sb.try1(SVC_UID, "tcp", OTHER, 443), "ECONNREFUSED");
  });
});

test("egressctl apply with 1,000 services keeps the base chains at ten, two and two rules: map lookups, not a rule per service", async () => {
  await withSandbox(WORLD, async (sb) => {
    const store = new PolicyStore(sb.configDir);
    await store.locked(async () => {
      for (let i = 0; i < 1000; i++) {
        await store.writeService(
          validateService(
            {
              name: `svc-${i}`,
              user: 10_000 + i,
              outbound: [{ host: `198.51.100.${i % 250}`, ports: String(1000 + i) }],
            },
            "generated",
          ),
        );
      }
    });
    const r = await sb.egressctl("apply");
    assert.is(r.exitCode, 0, r.stderr);
    const listing = await sb.nftJson("list", "table", "inet", "egressd");
    const baseRules = listing.nftables.filter((o) => o.rule?.chain === "output");
    assert.is(baseRules.length, 10);
    assert.is(listing.nftables.filter((o) => o.rule?.chain === "input").length, 2);
    assert.is(listing.nftables.filter((o) => o.rule?.chain === "dns_redirect").length, 2);
    const uidMap = listing.nftables.find((o) => o.map?.name === "uid_dispatch")?.map as {
      elem: unknown[];
    };
    assert.is(uidMap.elem.length, 1000);
    assert.is(
      listing.nftables.filter((o) => o.chain).length,
      3 + 2 * 1000,
      "output, input, dns_redirect, and s_ and r_ per service",
    );
  });
});

test("no false drift: after applying generated policies, the live table equals the compiled one", async () => {
  await withSandbox(WORLD, async (sb) => {
    const nft = execNft(sb.nftWrapper());
    let seed = 7;
    const rand = (n: number) => {
      seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
      return seed % n;
    };
    for (let round = 0; round < 25; round++) {
      const b = policy().withResolvers([
        { address: "127.0.0.1", family: 4, port: 53 },
        { address: "2001:db8::53", family: 6, port: 5353 },
      ]);
      for (let s = 0; s < 1 + rand(5); s++) {
        const svc = b.service(`svc-${round}-${s}`, 20_000 + s);
        if (rand(3) === 0) svc.set({ mode: "audit" });
        if (rand(4) === 0) svc.set({ dns: "none" });
        if (rand(3) === 0) svc.gid(30_000 + s);
        // Inbound: each service in its own port block, so no two services overlap.
        for (let t = 0; t < rand(4); t++) {
          const low = 10_000 + s * 100 + rand(90);
          const from = [
            [],
            ["192.0.2.0/24"],
            ["198.51.100.7", "2001:db8::/48"],
            ["10.0.0.0/8", "10.1.0.0/16"],
          ][rand(4)] as string[];
          svc.input.policy.inbound.push({
            ports: rand(2) ? String(low) : `${low}-${low + rand(9)}`,
            protocol: rand(2) ? "tcp" : "udp",
            ...(from.length ? { from } : {}),
          });
        }
        for (let t = 0; t < rand(7); t++) {
          const port = 1 + rand(2000);
          const ports = rand(2) ? String(port) : `${port}-${port + rand(500)}`;
          const proto = rand(3) === 0 ? "/udp" : "";
          const kind = rand(5);
          const host =
            kind === 0
              ? `n${rand(4)}.example.test`
              : kind === 1
                ? `10.${rand(4)}.0.0/16`
                : kind === 2
                  ? `192.0.2.${rand(256)}`
                  : kind === 3
                    ? `[2001:db8:${rand(3)}::/48]`
                    : `[2001:db8::${rand(99)}]`;
          svc.allow(`${host}:${ports}${proto}`);
        }
      }
      for (let n = 0; n < 4; n++) {
        b.resolve(
          `n${n}.example.test`,
          ...Array.from({ length: rand(4) }, () => `203.0.113.${rand(256)}`),
          ...(rand(2) ? [`2001:db8:9::${rand(50)}`] : []),
        );
      }
      const desired = compile(b.build());
      await nft.apply(replaceBatch(desired, 0));
      const findings = diff(parseLive(await nft.listTable("egressd"), "egressd"), desired);
      assert.equal(findings, [], `round ${round}`);
    }
  }).finally(() =>
    // The nft program ran in this process: its private batch dir (egressd-UID, kept for the
    // process's life by design) is in the runner's temp dir, not the sandbox's.
    rmSync(join(tmpdir(), `egressd-${process.geteuid?.() ?? 0}`), { recursive: true, force: true }),
  );
});

test("a user given by name is looked up in the system's user database", async () => {
  await withSandbox(WORLD, async (sb) => {
    const r = await sb.egressctl("register", "svc-nobody", "--user", "nobody");
    assert.is(r.exitCode, 0, r.stderr);
    assert.match(r.stdout, "uid 65534");
    assert.match(sb.readService("svc-nobody"), '"user": "nobody"');
    assert.is((await sb.egressctl("apply")).exitCode, 0);
    assert.is(await sb.try1(65534, "tcp", OTHER, 443), "ECONNREFUSED");
  });
});

test("--create-user creates a locked system account with no login shell (in a private copy of /etc)", async () => {
  await withSandbox(WORLD, async (sb) => {
    const etc = join(sb.dir, "etc-copy");
    cpSync("/etc", etc, { recursive: true, dereference: false, verbatimSymlinks: true });
    const name = `egt${process.pid % 100000}`;
    const script = `mount --bind ${etc} /etc && exec "$@"`;
    const r = await execa(
      "unshare",
      [
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
        "sh",
        process.execPath,
        EGRESSCTL,
        "--config-dir",
        sb.configDir,
        "register",
        "svc-new",
        "--user",
        name,
        "--create-user",
      ],
      { reject: false, stdin: "ignore" },
    );
    assert.is(r.exitCode, 0, r.stderr);
    assert.match(r.stdout, "created");
    const passwd = readFileSync(join(etc, "passwd"), "utf8")
      .split("\n")
      .find((l) => l.startsWith(`${name}:`));
    assert.ok(passwd, "account in the copy's passwd");
    assert.match(passwd ?? "", /nologin$/);
    const shadow = readFileSync(join(etc, "shadow"), "utf8")
      .split("\n")
      .find((l) => l.startsWith(`${name}:`));
    assert.match(shadow ?? "", new RegExp(`^${name}:!`), "password locked");
    assert.not.ok(
      readFileSync("/etc/passwd", "utf8").includes(`${name}:`),
      "the host's /etc is untouched",
    );
    assert.ok(existsSync(sb.servicesFile("svc-new")));
  });
});

test("a name that does not resolve is reported and does not stop the rest from applying", async () => {
  await withSandbox(
    {
      ...WORLD,
      records: {
        ...WORLD.records,
        "broken.example.test": { rcode: "SERVFAIL" },
        "gone.example.test": { rcode: "NXDOMAIN" },
      },
    },
    async (sb) => {
      await sb.egressctl("register", "svc-web", "--user", String(SVC_UID));
      await sb.egressctl(
        "allow",
        "svc-web",
        "api.example.test:443",
        "broken.example.test:443",
        "gone.example.test:443",
      );
      const r = await sb.egressctl("apply");
      assert.is(r.exitCode, 0, r.stderr);
      assert.match(r.stderr, "broken.example.test (svc-web) did not resolve");
      assert.match(r.stderr, "SERVFAIL");
      assert.match(r.stderr, "gone.example.test (svc-web) did not resolve");
      assert.match(r.stderr, "NXDOMAIN");
      assert.match(r.stdout, "2 unresolved");
      assert.is(await sb.try1(SVC_UID, "tcp", API4[0] as string, 443), "connected");
    },
  );
});

test.run();
