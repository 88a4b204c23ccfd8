import { suite } from "uvu";
import * as assert from "uvu/assert";
import { replaceBatch } from "../../rules/batch.ts";
import { compile } from "../../rules/compile.ts";
import { EgressError } from "../../rules/errors.ts";
import { validateBatch } from "../../rules/nft-schema.ts";
import { policy } from "../helpers/builders.ts";

const test = suite("nft JSON schema");

const good = () =>
  replaceBatch(
    compile(
      policy()
        .service("svc-web", 2001)
        .allow("api.example.test:443", "10.0.0.0/8:5432")
        .service("svc-dns", 2002)
        .gid(2002)
        .proxy(20000)
        .allow("*.cdn.example.test:443")
        .resolve("api.example.test", "192.0.2.1")
        .build(),
    ),
    0,
  );

function rejects(
  mutate: (b: { nftables: Record<string, Record<string, Record<string, unknown>>>[] }) => void,
  fragment: string,
) {
  const b = structuredClone(good()) as unknown as {
    nftables: Record<string, Record<string, Record<string, unknown>>>[];
  };
  mutate(b);
  try {
    validateBatch(b);
    assert.unreachable("accepted");
  } catch (err) {
    assert.instance(err, EgressError);
    assert.is((err as EgressError).code, "ERR_EGRESS_NFT_SCHEMA");
    assert.match((err as EgressError).message, fragment);
  }
}

const ruleIndex = (b: { nftables: Record<string, Record<string, Record<string, unknown>>>[] }) =>
  b.nftables.findIndex((c) => c.add?.rule && JSON.stringify(c).includes("reject"));

test("a compiled batch is valid", () => validateBatch(good()));

test("a misspelt key in a rule is caught", () => {
  rejects((b) => {
    const rule = b.nftables[ruleIndex(b)]?.add?.rule as Record<string, unknown>;
    rule.exprs = rule.expr;
    delete rule.expr;
  }, "/nftables/");
});

test("a misspelt statement is caught", () => {
  rejects((b) => {
    const rule = b.nftables[ruleIndex(b)]?.add?.rule as { expr: unknown[] };
    rule.expr = [{ rejekt: { type: "tcp reset" } }];
  }, "expr/0");
});

test("a wrongly shaped expression is caught", () => {
  rejects((b) => {
    const i = b.nftables.findIndex(
      (c) => JSON.stringify(c).includes("@s_svc_web_lit4") && c.add?.rule,
    );
    const rule = b.nftables[i]?.add?.rule as { expr: { match: { left: unknown } }[] };
    (rule.expr[0] as { match: { left: unknown } }).match.left = {
      payload: { protocol: "ip", field: "daddr", offset: 3 },
    };
  }, "/nftables/");
});

test("another family, a flush, or a bad element are caught", () => {
  rejects((b) => {
    (b.nftables[0]?.add?.table as Record<string, unknown>).family = "ip";
  }, "/nftables/0");
  rejects((b) => {
    b.nftables.push({ flush: { ruleset: {} } } as never);
  }, "/nftables/");
  rejects((b) => {
    const s = b.nftables.find((c) => c.add?.set?.name === "s_svc_web_lit4")?.add?.set as {
      elem: unknown[];
    };
    s.elem.push({ concat: ["10.0.0.300", "tcp", 1] });
  }, "/nftables/");
});

test.run();
