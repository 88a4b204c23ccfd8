// Bundles egressctl and egressd under dist/ (no node_modules at run time; see scripts/bundles.mjs),
// checks what egressctl carries, and puts koffi's native module for this machine beside them.
import { copyFileSync, readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { bundles, koffiNative, ROOT, thinProblems } from "./bundles.mjs";

const pkg = JSON.parse(readFileSync(join(ROOT, "package.json"), "utf8"));
const version = process.env.EGRESSD_PKG_VERSION ?? pkg.version;

rmSync(join(ROOT, "dist/chunks"), { recursive: true, force: true });
const problems = thinProblems(await bundles({ version }));
if (problems.length) {
  console.error(`egressctl is not thin:\n  ${problems.join("\n  ")}`);
  process.exit(1);
}
// Without it the programs fall back to the nft program.
const native = koffiNative();
if (native) copyFileSync(native, join(ROOT, "dist/koffi.node"));
else console.warn(`warning: no koffi native module for ${process.platform}-${process.arch}`);
console.log(
  `built dist/egressctl.js (+ dist/chunks/), dist/egressd.js${native ? ", dist/koffi.node" : ""} (version ${version})`,
);
