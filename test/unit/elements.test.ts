import { suite } from "uvu";
import * as assert from "uvu/assert";
import type { AddrRange } from "../../rules/addresses.ts";
import { disjoint, type Allow } from "../../rules/elements.ts";

const test = suite("disjoint set elements");

/** A tiny deterministic PRNG so failures reproduce. */
function rng(seed: number) {
  let s = seed >>> 0;
  return (n: number) => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s % n;
  };
}

const covered = (allows: readonly Allow[], addr: bigint, proto: string, port: number) =>
  allows.some(
    (a) =>
      a.protocol === proto &&
      a.range.lo <= addr &&
      addr <= a.range.hi &&
      a.ports.low <= port &&
      port <= a.ports.high,
  );

test("random overlapping allowances: same coverage, no two boxes overlap", () => {
  const rand = rng(42);
  for (let round = 0; round < 200; round++) {
    const input: Allow[] = [];
    for (let i = 0; i < 1 + rand(8); i++) {
      const len = 24 + rand(9); // /24../32 inside 10.0.0.0/22 so they collide often
      const size = 1n << BigInt(32 - len);
      const lo = ((0x0a000000n + BigInt(rand(1024))) / size) * size;
      const range: AddrRange = { family: 4, lo, hi: lo + size - 1n };
      const low = 1 + rand(40);
      input.push({
        range,
        protocol: rand(2) ? "tcp" : "udp",
        ports: { low, high: low + rand(10) },
      });
    }
    const out = disjoint(input);
    for (let i = 0; i < out.length; i++) {
      for (let j = i + 1; j < out.length; j++) {
        const a = out[i] as Allow;
        const b = out[j] as Allow;
        const overlap =
          a.protocol === b.protocol &&
          a.range.lo <= b.range.hi &&
          b.range.lo <= a.range.hi &&
          a.ports.low <= b.ports.high &&
          b.ports.low <= a.ports.high;
        assert.not.ok(overlap, `round ${round}: boxes ${i} and ${j} overlap`);
      }
    }
    for (let k = 0; k < 300; k++) {
      const addr = 0x0a000000n + BigInt(rand(1100));
      const proto = rand(2) ? "tcp" : "udp";
      const port = 1 + rand(55);
      assert.is(
        covered(out, addr, proto, port),
        covered(input, addr, proto, port),
        `round ${round}: ${addr} ${proto} ${port}`,
      );
    }
  }
});

test("adjacent networks and port ranges merge back into one element", () => {
  const r = (lo: number, hi: number): AddrRange => ({ family: 4, lo: BigInt(lo), hi: BigInt(hi) });
  const out = disjoint([
    { range: r(0, 127), protocol: "tcp", ports: { low: 1, high: 10 } },
    { range: r(128, 255), protocol: "tcp", ports: { low: 1, high: 10 } },
    { range: r(0, 255), protocol: "tcp", ports: { low: 11, high: 20 } },
  ]);
  assert.equal(out, [{ range: r(0, 255), protocol: "tcp", ports: { low: 1, high: 20 } }]);
});

test.run();
