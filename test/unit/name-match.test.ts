import { suite } from "uvu";
import * as assert from "uvu/assert";
import { NameMatcher, nameMatches, normalizeQueryName } from "../../rules/name-match.ts";
import { parseHost } from "../../rules/target.ts";

const test = suite("which names a service may look up");

const matcher = (...hosts: string[]) =>
  new NameMatcher(
    hosts.map((h) => {
      const p = parseHost(h);
      if ("error" in p || p.kind === "net") throw new Error(h);
      return p;
    }),
  );

test("queried names compare in lowercase, without the trailing dot", () => {
  assert.is(normalizeQueryName("API.Example.COM."), "api.example.com");
  assert.is(normalizeQueryName("_dmarc.example.com"), "_dmarc.example.com");
  assert.is(normalizeQueryName("xn--bcher-kva.example"), "xn--bcher-kva.example");
  for (const bad of [
    "",
    ".",
    "a..b",
    "bücher.example",
    "a b.example",
    "-a.example",
    "a".repeat(254),
  ])
    assert.is(normalizeQueryName(bad), null, JSON.stringify(bad));
});

test("an exact allowance matches that name only", () => {
  const m = matcher("api.example.com");
  assert.ok(m.matches("api.example.com"));
  assert.not.ok(m.matches("www.api.example.com"));
  assert.not.ok(m.matches("example.com"));
  assert.not.ok(m.matches("api.example.com.evil.test"));
});

test("a wildcard matches names below it at any depth, never the apex or a lookalike", () => {
  const m = matcher("*.cdn.example.com");
  assert.ok(m.matches("a.cdn.example.com"));
  assert.ok(m.matches("a.b.c.cdn.example.com"));
  assert.not.ok(m.matches("cdn.example.com"), "the apex");
  assert.not.ok(m.matches("evilcdn.example.com"), "a suffix that is not a label boundary");
  assert.not.ok(m.matches("cdn.example.com.evil.test"));
  assert.ok(nameMatches({ kind: "wildcard", suffix: "cdn.example.com" }, "x.cdn.example.com"));
});

test("internationalised allowances match their punycode form, which is what is on the wire", () => {
  const m = matcher("bücher.example", "*.bücher.example");
  const wire = normalizeQueryName("XN--BCHER-KVA.example.");
  assert.is(wire, "xn--bcher-kva.example");
  assert.ok(m.matches(wire as string));
  assert.ok(m.matches("shop.xn--bcher-kva.example"));
  assert.is(m.size, 2);
});

test.run();
