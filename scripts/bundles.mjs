// The esbuild builds of egressctl and egressd, shared by scripts/build.mjs and the test that
// checks what each bundle carries (test/unit/bundles.test.ts).
//  - The JSON Schema validators are compiled here (ajv standalone code) and bundled in place of
//    rules/validators.ts: neither program carries ajv's compiler.
//  - egressctl is split: dist/egressctl.js answers `--version` and loads the command tree from
//    dist/chunks/ for anything else; each command then loads its own code when it runs.
//  - Whitespace and syntax are minified (names are kept, so stack traces still name functions):
//    less to read and parse at every start.
import { existsSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join, relative, resolve } from "node:path";
import { build } from "esbuild";
import { tsImport } from "tsx/esm/api";

export const ROOT = resolve(new URL("..", import.meta.url).pathname);
const VALIDATORS = resolve(ROOT, "rules/validators.ts");

// CommonJS dependencies call require(); give the ESM bundle one.
const banner = [
  "#!/usr/bin/env node",
  "import { createRequire as __egressdRequire } from 'node:module';",
  "import { fileURLToPath as __egressdPath } from 'node:url';",
  "const require = __egressdRequire(import.meta.url);",
  "const __filename = __egressdPath(import.meta.url);",
  "const __dirname = __egressdPath(new URL('.', import.meta.url));",
].join("\n");

/** Replaces rules/validators.ts with its importer's validators, compiled now. */
async function aheadOfTimeValidators() {
  const { validatorsModule } = await tsImport("./validators.build.ts", import.meta.url);
  return {
    name: "egressd-validators",
    setup(b) {
      b.onResolve({ filter: /validators\.ts$/ }, (args) =>
        resolve(args.resolveDir, args.path) === VALIDATORS
          ? { path: relative(ROOT, args.importer), namespace: "egressd-validators" }
          : undefined,
      );
      b.onLoad({ filter: /.*/, namespace: "egressd-validators" }, (args) => ({
        contents: validatorsModule(args.path),
        resolveDir: ROOT,
        loader: "js",
      }));
    },
  };
}

/**
 * Builds both programs into `outdir` (egressctl.js, chunks/, egressd.js); returns each build's
 * metafile. `write: false` builds in memory.
 */
export async function bundles({ version, outdir = "dist", write = true }) {
  const common = {
    absWorkingDir: ROOT,
    bundle: true,
    platform: "node",
    target: "node20",
    format: "esm",
    sourcemap: false,
    legalComments: "none",
    minifyWhitespace: true,
    minifySyntax: true,
    define: { EGRESSD_VERSION: JSON.stringify(version) },
    // jsonc-parser's "main" is a UMD build whose require() calls a bundler cannot follow;
    // its ES module build bundles cleanly.
    alias: { "jsonc-parser": "jsonc-parser/lib/esm/main.js" },
    banner: { js: banner },
    plugins: [await aheadOfTimeValidators()],
    metafile: true,
    write,
    logLevel: "warning",
  };
  const egressctl = await build({
    ...common,
    entryPoints: { egressctl: "cli/egressctl.ts" },
    outdir,
    splitting: true,
    chunkNames: "chunks/[name]-[hash]",
  });
  const egressd = await build({
    ...common,
    entryPoints: ["agent/egressd.ts"],
    outfile: join(outdir, "egressd.js"),
  });
  return { egressctl: egressctl.metafile, egressd: egressd.metafile };
}

const has = (output, pattern) => Object.keys(output?.inputs ?? {}).filter((f) => pattern.test(f));

/** What each bundle must not carry; returns the problems found (none: an empty list). */
export function thinProblems(meta) {
  const problems = [];
  const entry = Object.values(meta.egressctl.outputs).find(
    (o) => o.entryPoint === "cli/egressctl.ts",
  );
  if (!entry) return ["no egressctl.js in the build"];
  const ctlOutputs = Object.entries(meta.egressctl.outputs);
  const rules = [
    // The daemon is never reachable from egressctl, not even from a lazily loaded chunk.
    ...ctlOutputs.map(([file, out]) => [file, out, /^agent\/daemon\.ts$/, "the daemon"]),
    // Loaded by the commands that need them, never at start-up.
    ["dist/egressctl.js", entry, /^node_modules\/commander\//, "the command tree"],
    ["dist/egressctl.js", entry, /^agent\/dns\//, "DNS code"],
    ["dist/egressctl.js", entry, /^node_modules\/dns2\//, "dns2 (DNS client and server)"],
    ["dist/egressctl.js", entry, /^agent\/apply\.ts$/, "the one-shot apply path"],
    ["dist/egressctl.js", entry, /^rules\/(compile|diff|nft-schema)\.ts$/, "the compiler"],
    ["dist/egressctl.js", entry, /^agent\/nft\//, "the nftables adapters"],
    ["dist/egressctl.js", entry, /^node_modules\/execa\//, "execa"],
    ["dist/egressctl.js", entry, /^node_modules\/ajv\//, "ajv"],
    // Validators are compiled at build time: ajv's compiler ships in neither program.
    ...[...ctlOutputs, ...Object.entries(meta.egressd.outputs)].map(([file, out]) => [
      file,
      out,
      /^node_modules\/ajv\/dist\/(compile|core|ajv|2020)/,
      "ajv's compiler",
    ]),
  ];
  for (const [file, out, pattern, what] of rules) {
    const found = has(out, pattern);
    if (found.length) problems.push(`${file} carries ${what}: ${found.join(", ")}`);
  }
  return problems;
}

/**
 * koffi's prebuilt native module for this platform and architecture (glibc), or null. The
 * build puts it beside the bundles (dist/koffi.node), where agent/nft/libnftables.ffi.ts looks
 * first; the packages ship it for their architecture.
 */
export function koffiNative() {
  const require = createRequire(join(ROOT, "package.json"));
  try {
    const pkg = `@koromix/koffi-${process.platform}-${process.arch}`;
    const dir = dirname(require.resolve(`${pkg}/package.json`));
    const file = join(dir, `${process.platform}_${process.arch}`, "koffi.node");
    return existsSync(file) ? file : null;
  } catch {
    return null;
  }
}
