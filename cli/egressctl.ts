/** egressctl's entry point. `--version` alone answers without loading the command tree. */
import { VERSION } from "../agent/paths.ts";

const argv = process.argv.slice(2);
if (argv.length === 1 && argv[0] === "--version") {
  process.stdout.write(`${VERSION}\n`);
} else {
  const { main } = await import("./program.ts");
  process.exitCode = await main(argv, {
    stdout: (s) => process.stdout.write(s),
    stderr: (s) => process.stderr.write(s),
  });
}
