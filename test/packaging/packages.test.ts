/**
 * Packages: build the .deb and .rpm, lint them, check the unit, and install the .deb into a
 * real Debian 13 (trixie) root made with debootstrap from the machine's Debian archive:
 * install, run (libnftables loaded through the packaged koffi module), upgrade, remove, purge.
 * Needs root and the archive. Everything it builds lives in one temporary directory, removed
 * at the end (never under dist/); the one thing kept is the debootstrapped base root, cached
 * in /var/cache/egressd-test/trixie-base (a few minutes to make; the README names it).
 */
import {
  cpSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  rmSync,
  writeFileSync,
} from "node:fs";

import { tmpdir } from "node:os";
import { join } from "node:path";
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { execa } from "execa";
import { ROOT } from "../helpers/sandbox.ts";

const test = suite("packages: lint, unit hardening, install into Debian 13");

const version = (
  JSON.parse(readFileSync(join(ROOT, "package.json"), "utf8")) as { version: string }
).version;
const NEXT = `${version}+upgradetest1`;
const ARCH = { x64: { deb: "amd64", rpm: "x86_64" }, arm64: { deb: "arm64", rpm: "aarch64" } }[
  process.arch as "x64" | "arm64"
];
const BASE = "/var/cache/egressd-test/trixie-base";
const MIRROR = process.env.EGRESSD_DEBIAN_MIRROR ?? mirror();
// The test's own temp dir; the packages are built into it, never into dist/packages/.
const work = mkdtempSync(join(tmpdir(), "egressd-pkgtest-"));
const PKGS = join(work, "packages");
const DEB = join(PKGS, `egressd_${version}_${ARCH.deb}.deb`);
const RPM = join(PKGS, `egressd-${version}-1.${ARCH.rpm}.rpm`);
const NEXT_DEB = join(work, "next", `egressd_${NEXT}_${ARCH.deb}.deb`);
const distPackages = join(ROOT, "dist/packages");
const listing = (dir: string) => (existsSync(dir) ? readdirSync(dir).sort() : []);
const distBefore = listing(distPackages);
// scripts/package.ts makes its temp dirs here (TMPDIR), so the test can see they are gone.
const PKG_TMP = join(work, "tmp");
mkdirSync(PKG_TMP);

/** The Debian archive this machine's apt uses. */
function mirror(): string {
  for (const f of ["/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list"]) {
    if (!existsSync(f)) continue;
    const m =
      /URIs:\s*(\S+\/debian)\b/.exec(readFileSync(f, "utf8")) ??
      /^deb\s+(?:\[[^\]]*\]\s+)?(\S+\/debian)\s/m.exec(readFileSync(f, "utf8"));
    if (m?.[1]) return m[1];
  }
  return "http://deb.debian.org/debian";
}

const run = (cmd: string, args: string[], env: Record<string, string> = {}) =>
  execa(cmd, args, {
    reject: false,
    stdin: "ignore",
    env: { DEBIAN_FRONTEND: "noninteractive", ...env },
    timeout: 900_000,
  });

async function must(cmd: string, args: string[], env: Record<string, string> = {}) {
  const r = await run(cmd, args, env);
  assert.is(
    r.exitCode,
    0,
    `${cmd} ${args.join(" ")} failed (${r.exitCode}):\n${r.stdout}\n${r.stderr}`,
  );
  return r;
}

/** Runs a shell command inside the Debian root, with /proc and /dev mounted in a private mount namespace. */
function inRoot(root: string, script: string, netns = false) {
  const setup = `mount -t proc proc ${root}/proc && mount --rbind /dev ${root}/dev && exec chroot ${root} /bin/sh -c "$1"`;
  return run(
    "unshare",
    ["-m", "--propagation", "private", ...(netns ? ["-n"] : []), "sh", "-c", setup, "sh", script],
    // The root's own /tmp: the suite's TMPDIR (a dir of the host) does not exist in it, and
    // maintainer scripts (ca-certificates' mktemp) fail on it.
    { PATH: "/usr/sbin:/usr/bin:/sbin:/bin", TMPDIR: "/tmp" },
  );
}

async function mustInRoot(root: string, script: string, netns = false) {
  const r = await inRoot(root, script, netns);
  assert.is(r.exitCode, 0, `in root: ${script}\n${r.stdout}\n${r.stderr}`);
  return r;
}

test.before(async () => {
  const pkg = (env: Record<string, string>) =>
    must(process.execPath, ["--import", "tsx", join(ROOT, "scripts/package.ts")], {
      ...env,
      TMPDIR: PKG_TMP,
    });
  await pkg({ EGRESSD_PKG_OUT: PKGS });
  await pkg({ EGRESSD_PKG_OUT: join(work, "next"), EGRESSD_PKG_VERSION: NEXT });
});

test.after(() => {
  rmSync(work, { recursive: true, force: true });
});

test("the packages are for this architecture and carry one native module: koffi's, for it", async () => {
  const deb = await must("dpkg-deb", ["--field", DEB, "Architecture", "Depends"]);
  assert.match(deb.stdout, `Architecture: ${ARCH.deb}`);
  assert.match(deb.stdout, /Depends: .*libnftables1.*procps.*libc6 \(>= /);
  const debFiles = (await must("dpkg-deb", ["-c", DEB])).stdout;
  const rpmFiles = (await must("rpm", ["-qpl", RPM])).stdout;
  for (const files of [debFiles, rpmFiles]) {
    const natives = files.split("\n").filter((l) => /\.node$/.test(l));
    assert.is(natives.length, 1, natives.join("\n"));
    assert.match(natives[0] ?? "", "/usr/lib/egressd/koffi.node");
    assert.match(files, /\/usr\/lib\/egressd\/chunks\/[^\s]+\.js/);
    // The policy and config JSON Schemas ship when the docs have them.
    const schemaDir = join(ROOT, "docs/schema");
    for (const f of listing(schemaDir).filter((x) => x.endsWith(".json")))
      assert.match(files, `/usr/share/egressd/schema/${f}`);
  }
});

test("lintian reports no errors or warnings on the .deb", async () => {
  // lintian leaves its ELF cache (mldbm-elf-*) in TMPDIR: give it one inside the work dir.
  const lintTmp = join(work, "lintian-tmp");
  mkdirSync(lintTmp, { recursive: true });
  const r = await run("lintian", ["--tag-display-limit", "0", DEB], { TMPDIR: lintTmp });
  const tags = r.stdout.split("\n").filter((l) => /^[EW]: /.test(l));
  assert.equal(tags, [], r.stdout);
  assert.is(r.exitCode, 0, r.stdout + r.stderr);
});

test("rpmlint: a plain run reports only unknown-key (the build's signing key), none once the key is imported, as docs/packaging.md says", async () => {
  const home = join(work, "rpmhome");
  mkdirSync(home, { recursive: true });
  writeFileSync(join(home, ".rpmmacros"), `%_dbpath ${home}/rpmdb\n`);
  await must("rpm", ["--initdb"], { HOME: home });
  const errors = (out: string) =>
    out
      .split("\n")
      .filter((l) => / E: /.test(l))
      .map((l) => l.replace(/^.* E: /, "").split(" ")[0]);
  const plain = await run("rpmlint", [RPM], { HOME: home });
  assert.equal(errors(plain.stdout), ["unknown-key"], plain.stdout);
  await must("rpm", ["--import", join(PKGS, "egressd-rpm-key.asc")], { HOME: home });
  const r = await run("rpmlint", [RPM], { HOME: home });
  assert.equal(errors(r.stdout), [], r.stdout);
  assert.match(r.stdout, "0 errors");
  const doc = readFileSync(join(ROOT, "docs/packaging.md"), "utf8");
  assert.match(doc, "`unknown-key`");
  for (const w of new Set(r.stdout.match(/(?<= W: )[a-z%-]+/g) ?? []))
    assert.match(doc, `\`${w}\``, `docs/packaging.md explains rpmlint's ${w}`);
});

test("the unit's exposure score is 3.0 or lower, as docs/packaging.md records", async () => {
  const root = join(work, "unitroot");
  await must("dpkg-deb", ["-x", DEB, root]);
  const s = await must("systemd-analyze", [
    "security",
    "--offline=true",
    join(root, "usr/lib/systemd/system/egressd.service"),
  ]);
  const score = Number(
    /Overall exposure level for egressd\.service: ([0-9.]+)/.exec(s.stdout)?.[1],
  );
  assert.ok(score <= 3.0, `exposure ${score}`);
  const doc = readFileSync(join(ROOT, "docs/packaging.md"), "utf8");
  assert.match(
    doc,
    `exposure level: ${score.toFixed(1)}`,
    "docs/packaging.md records the current score",
  );
});

test("the .deb installs into Debian 13 with apt, runs, upgrades keeping the config, removes and purges cleanly", async () => {
  if (!existsSync(join(BASE, "etc/debian_version"))) {
    rmSync(BASE, { recursive: true, force: true });
    await must("debootstrap", ["--variant=minbase", "trixie", BASE, MIRROR]);
  }
  const root = join(work, "trixie");
  await must("cp", ["-a", BASE, root]);
  cpSync(DEB, join(root, "tmp/egressd.deb"));
  cpSync(NEXT_DEB, join(root, "tmp/egressd-next.deb"));
  writeFileSync(join(root, "usr/sbin/policy-rc.d"), "#!/bin/sh\nexit 101\n", { mode: 0o755 });

  await mustInRoot(
    root,
    "apt-get update -qq && apt-get install -y -qq /tmp/egressd.deb >/tmp/apt.log 2>&1 || { cat /tmp/apt.log; exit 1; }",
  );
  const v = await mustInRoot(root, "egressctl --version && node --version && nft --version");
  assert.match(v.stdout, version);
  assert.ok(existsSync(join(root, "usr/lib/egressd/egressctl.js")));
  assert.ok(existsSync(join(root, "usr/share/man/man8/egressctl.8.gz")));
  // An absolute symlink into the root: read the link, do not follow it on the host.
  assert.match(
    readlinkSync(join(root, "etc/systemd/system/multi-user.target.wants/egressd.service")),
    /^(\/usr)?\/lib\/systemd\/system\/egressd\.service$/,
    "enabled on install",
  );

  // verify needs the unit's programs in place: the installed root has them.
  const verify = await run("systemd-analyze", [
    "verify",
    "--man=no",
    `--root=${root}`,
    "/usr/lib/systemd/system/egressd.service",
  ]);
  assert.is(verify.exitCode, 0, `systemd-analyze verify: ${verify.stdout}${verify.stderr}`);

  await mustInRoot(
    root,
    "egressctl register svc-pkg --user svc-pkg --create-user && egressctl allow svc-pkg 192.0.2.1:443",
  );
  // Both programs reach the kernel through libnftables and the packaged koffi module: with the
  // nft program moved away they still apply, and egressctl says which way it went.
  const withoutNft = (cmd: string) =>
    `mv /usr/sbin/nft /usr/sbin/nft.away && { ${cmd}; rc=$?; mv /usr/sbin/nft.away /usr/sbin/nft; [ $rc -eq 0 ]; }`;
  const applied = await mustInRoot(
    root,
    `${withoutNft("egressd --once >/tmp/once.log")} && nft list table inet egressd`,
    true,
  );
  assert.match(applied.stdout, "meta skuid vmap @uid_dispatch");
  assert.match(applied.stdout, "192.0.2.1 . tcp . 443");
  const ctl = await mustInRoot(root, withoutNft("egressctl --json apply"), true);
  const nft = (JSON.parse(ctl.stdout) as { nft: { backend: string; detail: string } }).nft;
  assert.is(nft.backend, "libnftables", nft.detail);
  assert.match(nft.detail, "in-process through koffi");

  // Upgrade: the operator's edit of the conffile survives.
  const conf = join(root, "etc/egressd/egressd.json");
  const edited = readFileSync(conf, "utf8").replace('"level": "info"', '"level": "debug"');
  writeFileSync(conf, edited);
  await mustInRoot(
    root,
    "apt-get install -y -qq -o Dpkg::Options::=--force-confold /tmp/egressd-next.deb >/tmp/apt.log 2>&1 || { cat /tmp/apt.log; exit 1; }",
  );
  assert.match((await mustInRoot(root, "egressctl --version")).stdout, NEXT);
  assert.is(readFileSync(conf, "utf8"), edited);
  assert.ok(
    existsSync(join(root, "etc/egressd/services.d/svc-pkg.json")),
    "policies survive the upgrade",
  );

  // Remove: nothing left but the operator's configuration.
  await mustInRoot(
    root,
    "apt-get remove -y -qq egressd >/tmp/apt.log 2>&1 || { cat /tmp/apt.log; exit 1; }",
  );
  for (const gone of [
    "usr/bin/egressctl",
    "usr/bin/egressd",
    "usr/lib/egressd",
    "usr/lib/systemd/system/egressd.service",
    "usr/share/man/man8/egressd.8.gz",
  ]) {
    assert.not.ok(existsSync(join(root, gone)), `${gone} left after remove`);
  }
  assert.ok(existsSync(conf), "config kept on remove");
  assert.ok(
    existsSync(join(root, "etc/egressd/services.d/svc-pkg.json")),
    "policies kept on remove",
  );
  const left = await mustInRoot(
    root,
    "dpkg -L egressd 2>/dev/null || true; dpkg-query -W -f='${Status}' egressd",
  );
  assert.match(left.stdout, "config-files");

  // Purge: the configuration and the state go too.
  mkdirSync(join(root, "var/lib/egressd"), { recursive: true });
  writeFileSync(join(root, "var/lib/egressd/state.json"), "{}");
  await mustInRoot(
    root,
    "apt-get purge -y -qq egressd >/tmp/apt.log 2>&1 || { cat /tmp/apt.log; exit 1; }",
  );
  assert.not.ok(existsSync(join(root, "etc/egressd")), "config removed on purge");
  assert.not.ok(existsSync(join(root, "var/lib/egressd")), "state removed on purge");
});

test("the test leaves nothing behind: no package under dist/packages/, no build dir of scripts/package.ts", () => {
  assert.equal(
    listing(PKG_TMP).filter((f) => f.startsWith("egressd-")),
    [],
    "scripts/package.ts removed its temp dirs",
  );
  assert.equal(listing(distPackages), distBefore, "dist/packages/ untouched");
});

// The work dir goes whatever happened above; that it is really gone (with every other temp dir
// of the run) is checked by scripts/test.mjs after the last test, not here.
test.after(() => rmSync(work, { recursive: true, force: true }));

test.run();
