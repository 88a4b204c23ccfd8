import { suite } from "uvu";
import * as assert from "uvu/assert";
import { serialQueue } from "../../agent/nft/queue.ts";

const test = suite("the libnftables call queue");

const tick = (ms: number) => new Promise((r) => setTimeout(r, ms));

test("jobs run one at a time, in the order given, and a failure does not stop the queue", async () => {
  const serial = serialQueue();
  let running = 0;
  let most = 0;
  const order: number[] = [];
  const job = (i: number, fail = false) =>
    serial(async () => {
      running++;
      most = Math.max(most, running);
      await tick(5 - (i % 5));
      order.push(i);
      running--;
      if (fail) throw new Error(`job ${i}`);
      return i;
    });
  const results = await Promise.allSettled([0, 1, 2, 3, 4, 5].map((i) => job(i, i === 2)));
  assert.is(most, 1, "never two jobs at once");
  assert.equal(order, [0, 1, 2, 3, 4, 5]);
  assert.equal(
    results.map((r) => r.status),
    ["fulfilled", "fulfilled", "rejected", "fulfilled", "fulfilled", "fulfilled"],
  );
  assert.is((results[5] as PromiseFulfilledResult<number>).value, 5);
});

test.run();
