// Runs every uvu test file (test/**/*.test.ts) through tsx in one process, echoes uvu's
// output, then checks the run left the host as it found it, and ends with the plain summary
// line CI reads: "N passed, N failed" (the leftover check counts as one test).
import { execFileSync, spawn } from "node:child_process";
import { chmodSync, mkdtempSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { stripVTControlCharacters } from "node:util";

// The suite's own temp dir. Every temp dir the tests make goes through os.tmpdir(), which
// follows TMPDIR, so they all land in here: egressd-unit-*, egressd-unit-nft-*,
// egressd-helper-*, egressd-fixtures-*, egressd-safe-*, egressd-pkgtest-* (with
// scripts/package.ts's egressd-package-* inside), egressd-verify-*, egressd-recipe-*,
// egressctl-cli-*, egressctl-systemd-*, egressctl-register-*, the sandboxes' egt-PID-N-*,
// and the daemon's own nft batch dir (egressd-UID). Whatever is in it after the run was left
// behind by this run, however many other runs share /tmp. Test uids run fixtures from inside
// it, hence 0755.
const suiteTmp = mkdtempSync(join(tmpdir(), "egressd-test-"));
chmodSync(suiteTmp, 0o755);

/** `git status --porcelain` lines, or null outside a git checkout (a release tarball). */
function gitStatus() {
  try {
    const out = execFileSync("git", ["status", "--porcelain", "--untracked-files=all"], {
      encoding: "utf8",
      stdio: ["ignore", "pipe", "ignore"],
    });
    return out.split("\n").filter(Boolean);
  } catch {
    return null;
  }
}

/** Network namespaces whose names start with `prefix` (none when `ip` cannot list them). */
function namespaces(prefix) {
  try {
    const out = execFileSync("ip", ["netns", "list"], {
      encoding: "utf8",
      stdio: ["ignore", "pipe", "ignore"],
    });
    return out
      .split("\n")
      .map((l) => l.split(" ")[0])
      .filter((n) => n && n.startsWith(prefix));
  } catch {
    return [];
  }
}

const gitBefore = gitStatus();

/**
 * What the run left behind: anything in the suite's temp dir, a sandbox namespace of the
 * test process, and, in a git checkout, a `git status` line that was not there before (on a
 * clean clone: any line at all).
 */
function leftovers(pid) {
  const found = [];
  for (const f of readdirSync(suiteTmp))
    // tsx's compile cache (tsx-UID) belongs to the runner, not to a test: it goes with the dir.
    if (!/^tsx-\d+$/.test(f)) found.push(`temp: ${join(suiteTmp, f)}`);
  for (const n of namespaces(`egt-${pid}-`)) found.push(`network namespace: ${n}`);
  const after = gitStatus();
  if (gitBefore && after)
    for (const l of after) if (!gitBefore.includes(l)) found.push(`git status: ${l}`);
  return found;
}

// Colour only on a terminal: a saved log (CI, `| tee`) stays plain text. uvu forces colour
// unless told --no-color, whatever FORCE_COLOR says.
const tty = Boolean(process.stdout.isTTY);
const args = [
  "--import",
  "tsx",
  "node_modules/uvu/bin.js",
  "test",
  process.argv[2] ?? "\\.test\\.ts$",
  ...(tty ? [] : ["--no-color"]),
];
const env = { ...process.env, FORCE_COLOR: tty ? "1" : "0", TMPDIR: suiteTmp };

const child = spawn(process.execPath, args, {
  stdio: ["ignore", "pipe", "inherit"],
  env,
});
let out = "";
child.stdout.on("data", (d) => {
  out += d;
  process.stdout.write(tty ? d : stripVTControlCharacters(String(d)));
});
child.on("close", (code) => {
  const plain = stripVTControlCharacters(out);
  const num = (label) => Number(new RegExp(`${label}:\\s+(\\d+)`).exec(plain)?.[1] ?? NaN);
  const total = num("Total");
  const passed = num("Passed");
  const skipped = num("Skipped");

  // The last test, after every other: the run left nothing behind.
  const left = leftovers(child.pid);
  rmSync(suiteTmp, { recursive: true, force: true });
  if (left.length) {
    console.log(`\n  FAIL  the test run left the host as it found it: ${left.length} leftover(s)`);
    for (const l of left) console.log(`    ${l}`);
  } else
    console.log(
      "\n  the test run left the host as it found it: no temp dir, namespace or git change",
    );

  if (Number.isNaN(total)) {
    console.log(`${left.length ? 0 : 1} passed, ${left.length ? 2 : 1} failed`);
    console.error(`test runner ended (exit ${code}) without a summary`);
    process.exit(1);
  }
  // uvu's Total counts the tests that ran: skipped ones (test.skip, or beside a test.only) are not in it.
  const failed = total - passed + (left.length ? 1 : 0);
  const ok = passed + (left.length ? 0 : 1);
  console.log(`${ok} passed, ${failed} failed${skipped ? `, ${skipped} skipped` : ""}`);
  process.exit(code === 0 && failed === 0 && skipped === 0 ? 0 : 1);
});
