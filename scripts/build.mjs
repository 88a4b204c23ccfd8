// Bundles egressctl and egressd under dist/ (no node_modules at run time; see scripts/bundles.mjs),
// checks what egressctl carries, and puts koffi's native module for this machine beside them.
import { copyFileSync, existsSync, readFileSync, rmSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { bundles, ROOT, thinProblems } from "./bundles.mjs";

const pkg = JSON.parse(readFileSync(join(ROOT, "package.json"), "utf8"));
// Packaging tests build a newer version to test upgrades.
const version = process.env.EGRESSD_PKG_VERSION ?? pkg.version;

rmSync(join(ROOT, "dist/chunks"), { recursive: true, force: true });
const meta = await bundles({ version });
const problems = thinProblems(meta);
if (problems.length) {
  console.error(`egressctl is not thin:\n  ${problems.join("\n  ")}`);
  process.exit(1);
}

/**
 * koffi's prebuilt native module for this platform and architecture (glibc), copied to
 * dist/koffi.node where the bundles look first (agent/nft/libnftables.ffi.ts). Without it
 * the programs fall back to the nft program.
 */
function koffiNative() {
  const require = createRequire(join(ROOT, "package.json"));
  const pkgName = `@koromix/koffi-${process.platform}-${process.arch}`;
  try {
    const dir = dirname(require.resolve(`${pkgName}/package.json`));
    const file = join(dir, `${process.platform}_${process.arch}`, "koffi.node");
    return existsSync(file) ? file : null;
  } catch {
    return null;
  }
}
const native = koffiNative();
if (native) copyFileSync(native, join(ROOT, "dist/koffi.node"));
else
  console.warn(
    `warning: no koffi native module for ${process.platform}-${process.arch}; the programs will use the nft program`,
  );
console.log(
  `built dist/egressctl.js (+ dist/chunks/), dist/egressd.js${native ? ", dist/koffi.node" : ""} (version ${version})`,
);
