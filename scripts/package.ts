/**
 * `npm run package`: builds dist/packages/egressd_<version>_<arch>.deb and
 * dist/packages/egressd-<version>-1.<arch>.rpm for this machine's architecture (koffi's native
 * module for it is inside) with dpkg-deb and rpmbuild. The programs are bundled afresh for the
 * package's version in a temporary directory, removed at the end, as is everything else built
 * on the way (man pages, staging trees, the throwaway signing key).
 *   EGRESSD_PKG_VERSION  the version (default: package.json's; the upgrade test builds a newer one)
 *   EGRESSD_PKG_OUT      where the packages go (default: dist/packages; the test uses a temp dir)
 */
import {
  chmodSync,
  copyFileSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { createHash } from "node:crypto";
import { tmpdir } from "node:os";
import { dirname, join, relative, resolve } from "node:path";
import { gzipSync } from "node:zlib";
import { execa } from "execa";
import { DAEMON_NODE_FLAGS } from "../agent/paths.ts";
import { bundles, koffiNative, thinProblems } from "./bundles.mjs";

const root = resolve(dirname(new URL(import.meta.url).pathname), "..");
const pkg = JSON.parse(readFileSync(join(root, "package.json"), "utf8")) as { version: string };
const version = process.env.EGRESSD_PKG_VERSION ?? pkg.version;
const out = resolve(process.env.EGRESSD_PKG_OUT ?? join(root, "dist/packages"));
const work = mkdtempSync(join(tmpdir(), "egressd-package-"));
const epoch = Number(process.env.SOURCE_DATE_EPOCH ?? 1_795_305_600); // reproducible timestamps
const DOCS = [
  "README.md",
  "CHANGELOG.md",
  ...readdirSync(join(root, "docs"))
    .filter((f) => f.endsWith(".md"))
    .map((f) => `docs/${f}`),
];
/** The JSON Schemas of the policy and config files, when the docs have them. */
const SCHEMA_DIR = join(root, "docs/schema");
const SCHEMAS = existsSync(SCHEMA_DIR)
  ? readdirSync(SCHEMA_DIR).filter((f) => f.endsWith(".json"))
  : [];

/** The package architecture names of this machine (koffi's native module is built for it). */
const ARCH: Record<string, { deb: string; rpm: string }> = {
  x64: { deb: "amd64", rpm: "x86_64" },
  arm64: { deb: "arm64", rpm: "aarch64" },
};
const arch = ((a) => {
  if (!a) throw new Error(`packages are built for x64 and arm64, not ${process.arch}`);
  return a;
})(ARCH[process.arch]);
const dist = join(work, "dist");
const share = join(work, "share");

function put(stage: string, path: string, content: string | Buffer, mode = 0o644): void {
  const file = join(stage, path);
  mkdirSync(dirname(file), { recursive: true });
  writeFileSync(file, content);
  chmodSync(file, mode);
}

/** The files both packages share; `layout` says where distribution-specific things go. */
function stageCommon(stage: string, layout: { unitDir: string; zshDir: string }): void {
  // The wrappers in /usr/bin run the bundles with the distribution's node: no shebangs needed.
  const js = (file: string) => readFileSync(file, "utf8").replace(/^#!.*\n/, "");
  for (const prog of ["egressctl", "egressd"]) {
    put(stage, `usr/lib/egressd/${prog}.js`, js(join(dist, `${prog}.js`)));
    put(
      stage,
      `usr/bin/${prog}`,
      `#!/bin/sh\nexec /usr/bin/node ${prog === "egressd" ? `${DAEMON_NODE_FLAGS.join(" ")} ` : ""}/usr/lib/egressd/${prog}.js "$@"\n`,
      0o755,
    );
    put(
      stage,
      `usr/share/man/man8/${prog}.8.gz`,
      gzipSync(readFileSync(join(share, `man/${prog}.8`)), { level: 9 }),
    );
  }
  for (const chunk of readdirSync(join(dist, "chunks")))
    put(stage, `usr/lib/egressd/chunks/${chunk}`, js(join(dist, "chunks", chunk)));
  // The one native module: koffi's, for this architecture (libnftables in-process).
  put(stage, "usr/lib/egressd/koffi.node", readFileSync(join(dist, "koffi.node")));
  for (const f of SCHEMAS)
    put(stage, `usr/share/egressd/schema/${f}`, readFileSync(join(SCHEMA_DIR, f)));
  put(
    stage,
    `${layout.unitDir}/egressd.service`,
    readFileSync(join(root, "packaging/egressd.service")),
  );
  put(stage, "etc/egressd/egressd.json", readFileSync(join(root, "packaging/egressd.json")));
  mkdirSync(join(stage, "etc/egressd/services.d"), { recursive: true });
  put(
    stage,
    "usr/share/bash-completion/completions/egressctl",
    readFileSync(join(share, "completion/egressctl.bash")),
  );
  put(stage, `${layout.zshDir}/_egressctl`, readFileSync(join(share, "completion/_egressctl")));
  for (const d of DOCS) put(stage, `usr/share/doc/egressd/${d}`, readFileSync(join(root, d)));
}

function walk(dir: string): string[] {
  return readdirSync(dir).flatMap((e) => {
    const p = join(dir, e);
    return statSync(p).isDirectory() ? walk(p) : [p];
  });
}

function rfc2822(seconds: number): string {
  return new Date(seconds * 1000).toUTCString().replace("GMT", "+0000");
}

async function deb(): Promise<string> {
  const stage = join(work, "deb");
  stageCommon(stage, {
    unitDir: "usr/lib/systemd/system",
    zshDir: "usr/share/zsh/vendor-completions",
  });
  put(
    stage,
    "usr/share/doc/egressd/copyright",
    readFileSync(join(root, "packaging/debian/copyright")),
  );
  const changelog = `egressd (${version}) unstable; urgency=medium\n\n  * Release ${version}. See /usr/share/doc/egressd/CHANGELOG.md.\n\n -- egressd maintainers <egressd@example.org>  ${rfc2822(epoch)}\n`;
  put(stage, "usr/share/doc/egressd/changelog.gz", gzipSync(changelog, { level: 9 }));
  const files = walk(stage);
  const size = Math.ceil(files.reduce((n, f) => n + statSync(f).size, 0) / 1024);
  const control = readFileSync(join(root, "packaging/debian/control.in"), "utf8")
    .replace("@VERSION@", version)
    .replace("@ARCH@", arch.deb)
    .replace("@SHLIBS@", await shlibs(join(stage, "usr/lib/egressd/koffi.node")))
    .replace("@SIZE@", String(size));
  put(stage, "DEBIAN/control", control);
  put(stage, "DEBIAN/conffiles", "/etc/egressd/egressd.json\n");
  for (const s of ["postinst", "prerm", "postrm"])
    put(stage, `DEBIAN/${s}`, readFileSync(join(root, `packaging/debian/${s}`)), 0o755);
  const md5 = files
    .filter((f) => !relative(stage, f).startsWith("etc/"))
    .map((f) => `${createHash("md5").update(readFileSync(f)).digest("hex")}  ${relative(stage, f)}`)
    .join("\n");
  put(stage, "DEBIAN/md5sums", md5 + "\n");
  const file = join(out, `egressd_${version}_${arch.deb}.deb`);
  await execa("dpkg-deb", ["--root-owner-group", "-Zxz", "--build", stage, file], {
    env: { SOURCE_DATE_EPOCH: String(epoch) },
  });
  return file;
}

/** The libraries koffi's native module needs, as Debian dependencies (dpkg-shlibdeps). */
async function shlibs(file: string): Promise<string> {
  const dir = join(work, "shlibs");
  mkdirSync(join(dir, "debian"), { recursive: true });
  writeFileSync(
    join(dir, "debian/control"),
    `Source: egressd\n\nPackage: egressd\nArchitecture: ${arch.deb}\n`,
  );
  // Node-API symbols come from the node process itself: no library provides them, as expected.
  const r = await execa("dpkg-shlibdeps", ["-O", "--warnings=0", file], { cwd: dir });
  const m = /^shlibs:Depends=(.+)$/m.exec(r.stdout);
  if (!m?.[1]) throw new Error(`dpkg-shlibdeps gave no dependencies for ${file}: ${r.stdout}`);
  return m[1];
}

async function rpm(): Promise<string> {
  const stage = join(work, "rpm-stage");
  stageCommon(stage, { unitDir: "usr/lib/systemd/system", zshDir: "usr/share/zsh/site-functions" });
  put(stage, "usr/share/licenses/egressd/LICENSE", readFileSync(join(root, "LICENSE")));
  const top = join(work, "rpmbuild");
  const date = new Date(epoch * 1000).toUTCString().split(" ");
  const changelog = `* ${date[0]?.replace(",", "")} ${date[2]} ${date[1]} ${date[3]} egressd maintainers <egressd@example.org> - ${version}-1\n- Release ${version}; see /usr/share/doc/egressd/CHANGELOG.md`;
  const spec = join(work, "egressd.spec");
  writeFileSync(
    spec,
    readFileSync(join(root, "packaging/rpm/egressd.spec.in"), "utf8")
      .replace("@VERSION@", version)
      .replace("@SCHEMAS@", SCHEMAS.length ? "%{_datadir}/egressd" : "")
      .replace("@CHANGELOG@", changelog),
  );
  await execa(
    "rpmbuild",
    [
      "-bb",
      "--target",
      arch.rpm,
      "--define",
      `_topdir ${top}`,
      "--define",
      `stage ${stage}`,
      "--define",
      "_build_id_links none",
      "--define",
      `source_date_epoch_from_changelog 0`,
      spec,
    ],
    { env: { SOURCE_DATE_EPOCH: String(epoch) } },
  );
  const name = `egressd-${version}-1.${arch.rpm}.rpm`;
  const built = join(top, "RPMS", arch.rpm, name);
  await sign(built);
  const file = join(out, name);
  copyFileSync(built, file);
  return file;
}

/**
 * Signs the rpm. Release builds name their key in EGRESSD_RPM_GPG_NAME (with GNUPGHOME set);
 * otherwise a throwaway key is made, so the package is signed as rpmlint and rpm expect.
 */
async function sign(file: string): Promise<void> {
  let name = process.env.EGRESSD_RPM_GPG_NAME;
  const env: Record<string, string> = {};
  if (!name) {
    name = "egressd build key <build@egressd.invalid>";
    const home = join(work, "gnupg");
    mkdirSync(home, { recursive: true, mode: 0o700 });
    env.GNUPGHOME = home;
    await execa(
      "gpg",
      [
        "--batch",
        "--pinentry-mode",
        "loopback",
        "--passphrase",
        "",
        "--quick-generate-key",
        name,
        "rsa3072",
        "sign",
        "never",
      ],
      { env },
    );
  }
  await execa(
    "rpmsign",
    ["--addsign", "--define", `_gpg_name ${name}`, "--define", "__gpg /usr/bin/gpg", file],
    { env },
  );
  // The public half, so the signature can be checked (rpm --import, rpmlint).
  const key = await execa("gpg", ["--armor", "--export", name], { env });
  writeFileSync(join(out, "egressd-rpm-key.asc"), key.stdout + "\n");
}

try {
  mkdirSync(out, { recursive: true });
  const native = koffiNative();
  if (!native) throw new Error(`no koffi native module for ${process.platform}-${process.arch}`);
  const problems = thinProblems(await bundles({ version, outdir: dist }));
  if (problems.length) throw new Error(`egressctl is not thin:\n  ${problems.join("\n  ")}`);
  copyFileSync(native, join(dist, "koffi.node"));
  await execa(process.execPath, ["--import", "tsx", join(root, "scripts/manpages.ts"), share], {
    cwd: root,
    env: { SOURCE_DATE_EPOCH: String(epoch) },
  });
  const files = [await deb(), await rpm()];
  for (const f of files) console.log(`built ${relative(process.cwd(), f)}`);
} finally {
  rmSync(work, { recursive: true, force: true });
}
