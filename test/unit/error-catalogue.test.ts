import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { suite } from "uvu";
import * as assert from "uvu/assert";

const test = suite("the error catalogue in docs/cli.md");

/** Every ERR_EGRESS_... code the sources under rules/, agent/ and cli/ can raise or log. */
function codesInSource(): Map<string, string> {
  const found = new Map<string, string>();
  for (const dir of ["rules", "agent", "cli"]) {
    for (const entry of readdirSync(dir, { recursive: true, encoding: "utf8" })) {
      if (!entry.endsWith(".ts")) continue;
      const file = join(dir, entry);
      for (const m of readFileSync(file, "utf8").matchAll(/ERR_EGRESS_[A-Z_]+/g))
        if (!found.has(m[0])) found.set(m[0], file);
    }
  }
  return found;
}

const catalogued = () =>
  new Set(
    [...readFileSync("docs/cli.md", "utf8").matchAll(/^#### (ERR_EGRESS_[A-Z_]+)$/gm)].map(
      (m) => m[1] ?? "",
    ),
  );

test("every error code in the source has an entry (#### CODE) in docs/cli.md", () => {
  const listed = catalogued();
  const missing = [...codesInSource()].filter(([code]) => !listed.has(code));
  assert.equal(
    missing.map(([code, file]) => `${code} (used in ${file})`),
    [],
    "add each to the error catalogue in docs/cli.md with its message and hint",
  );
});

test("the catalogue lists no code the source no longer uses", () => {
  const used = codesInSource();
  assert.equal(
    [...catalogued()].filter((code) => !used.has(code)),
    [],
  );
});

/** Each catalogue entry's text: from its "#### CODE" heading to the next heading. */
function entries(): Map<string, string> {
  const out = new Map<string, string>();
  const text = readFileSync("docs/cli.md", "utf8");
  const heads = [...text.matchAll(/^#### (ERR_EGRESS_[A-Z_]+)$/gm)];
  for (const h of heads) {
    const start = (h.index ?? 0) + h[0].length;
    const next = /^#{1,4} /m.exec(text.slice(start));
    out.set(h[1] ?? "", text.slice(start, next ? start + next.index : undefined));
  }
  return out;
}

test("every catalogue entry gives the message and a hint (or what to do)", () => {
  const all = entries();
  assert.ok(all.size >= codesInSource().size, `${all.size} entries`);
  const incomplete: string[] = [];
  for (const [code, body] of all) {
    const message = /^- \*\*message:\*\* *(\S.*)$/m.exec(body);
    const hint = /^- \*\*(?:hint|what to do):\*\* *(\S.*)$/m.exec(body);
    if (!message) incomplete.push(`${code}: no "- **message:** ..." line`);
    if (!hint) incomplete.push(`${code}: no "- **hint:** ..." (or "- **what to do:** ...") line`);
  }
  assert.equal(incomplete, [], "each entry of docs/cli.md needs both, with text");
});

test.run();
