// Bundles egressctl and egressd into self-contained files under dist/ (no node_modules at run time).
import { build } from "esbuild";
import { readFileSync } from "node:fs";

const pkg = JSON.parse(readFileSync(new URL("../package.json", import.meta.url), "utf8"));
// Packaging tests build a newer version to test upgrades.
const version = process.env.EGRESSD_PKG_VERSION ?? pkg.version;

const entries = { egressctl: "cli/egressctl.ts", egressd: "agent/egressd.ts" };

for (const [name, entry] of Object.entries(entries)) {
  await build({
    entryPoints: [entry],
    outfile: `dist/${name}.js`,
    bundle: true,
    platform: "node",
    target: "node20",
    format: "esm",
    sourcemap: false,
    legalComments: "none",
    define: { EGRESSD_VERSION: JSON.stringify(version) },
    // jsonc-parser's "main" is a UMD build whose require() calls a bundler cannot follow;
    // its ES module build bundles cleanly.
    alias: { "jsonc-parser": "jsonc-parser/lib/esm/main.js" },
    // CommonJS dependencies call require(); give the ESM bundle one.
    banner: {
      js: [
        "#!/usr/bin/env node",
        "import { createRequire as __egressdRequire } from 'node:module';",
        "import { fileURLToPath as __egressdPath } from 'node:url';",
        "const require = __egressdRequire(import.meta.url);",
        "const __filename = __egressdPath(import.meta.url);",
        "const __dirname = __egressdPath(new URL('.', import.meta.url));",
      ].join("\n"),
    },
    logLevel: "warning",
  });
}
console.log(`built dist/egressctl.js and dist/egressd.js (version ${version})`);
