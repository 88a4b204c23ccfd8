// Runs every uvu test file (test/**/*.test.ts) through tsx in one process, echoes uvu's
// output, and ends with the plain summary line CI reads: "N passed, N failed".
import { spawn } from "node:child_process";
import { stripVTControlCharacters } from "node:util";

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
const env = { ...process.env, FORCE_COLOR: tty ? "1" : "0" };

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
  if (Number.isNaN(total)) {
    console.log(`0 passed, 1 failed`);
    console.error(`test runner ended (exit ${code}) without a summary`);
    process.exit(1);
  }
  const failed = total - passed - skipped;
  console.log(`${passed} passed, ${failed} failed${skipped ? `, ${skipped} skipped` : ""}`);
  process.exit(code === 0 && failed === 0 && skipped === 0 ? 0 : 1);
});
