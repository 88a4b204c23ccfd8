/**
 * The daemon's way to the kernel: libnftables (or the `nft` program, when the library will not
 * load) in a small helper process of its own. Why not in the daemon's process:
 *  - libnftables 1.0.6 waits on its netlink socket with select(), which only takes descriptors
 *    below 1024 (glibc aborts the process otherwise), and a daemon with hundreds of DNS-aware
 *    services holds thousands of proxy sockets: its netlink socket would land above 1024;
 *  - an abort inside the library then ends the helper, not the daemon: the call fails, the
 *    kernel keeps the previous ruleset (a transaction is all or nothing), and the next call
 *    starts a new helper.
 * The helper is egressd's own bundle run with --nft-helper; requests and replies are JSON over
 * the IPC channel (a large batch costs a few ms to pass).
 */
import { fork, type ChildProcess } from "node:child_process";
import { EgressError, type ExitCode } from "../../rules/errors.ts";
import type { Batch } from "../../rules/batch.ts";
import { DAEMON_NODE_FLAGS } from "../paths.ts";
import { chooseNft } from "./index.ts";
import type { Counters, Nft, NftBackend } from "./nft.ts";

export const HELPER_FLAG = "--nft-helper";

type Op = "apply" | "check" | "listTable" | "listSet" | "listCounters" | "describe";
interface RequestMsg {
  id: number;
  op: Op;
  arg?: unknown;
}
interface ReplyMsg {
  id: number;
  ok: boolean;
  result?: unknown;
  error?: Record<string, unknown> & { exitCode: number };
}

/** The helper's side: serves requests with the process's own adapter until the daemon goes. */
export function serveNftHelper(): void {
  const nft = chooseNft();
  process.on("disconnect", () => process.exit(0));
  process.on("message", (m: RequestMsg) => {
    const reply = (r: Omit<ReplyMsg, "id">) => process.send?.({ id: m.id, ...r });
    const run = async (): Promise<unknown> => {
      switch (m.op) {
        case "apply":
          return nft.apply(m.arg as Batch);
        case "check":
          return nft.check(m.arg as Batch);
        case "listTable":
          return nft.listTable(m.arg as string);
        case "listSet": {
          const [table, set] = m.arg as [string, string];
          return nft.listSet(table, set);
        }
        case "listCounters":
          return [...(await nft.listCounters(m.arg as string))];
        case "describe":
          return { backend: nft.backend, detail: nft.detail };
      }
    };
    run().then(
      (result) => reply({ ok: true, result: result ?? null }),
      (err: unknown) => {
        const e =
          err instanceof EgressError
            ? err
            : new EgressError("ERR_EGRESS_NFT_FAILED", String((err as Error)?.message ?? err), {
                exitCode: 3,
              });
        reply({ ok: false, error: { ...e.toJSON(), exitCode: e.exitCode } });
      },
    );
  });
}

/** The daemon's side: an Nft that sends every call to the helper (started on first use). */
export function helperNft(entry: string = process.argv[1] ?? ""): Nft & { close(): void } {
  let child: ChildProcess | null = null;
  let seq = 0;
  const pending = new Map<
    number,
    { resolve: (v: unknown) => void; reject: (e: unknown) => void }
  >();
  let described = {
    backend: "libnftables" as NftBackend,
    detail: "libnftables (helper not started yet)",
  };

  const start = (): ChildProcess => {
    const c = fork(entry, [HELPER_FLAG], {
      // The daemon's own Node.js flags (a small young generation), not the parent's execArgv:
      // the helper is a second resident Node.js process of the same service.
      execArgv: [...DAEMON_NODE_FLAGS],
      stdio: ["ignore", "inherit", "inherit", "ipc"],
      serialization: "json",
    });
    c.on("message", (m: ReplyMsg) => {
      const p = pending.get(m.id);
      if (!p) return;
      pending.delete(m.id);
      if (m.ok) p.resolve(m.result);
      else {
        const e = m.error as {
          code: string;
          message: string;
          hint?: string;
          details?: Record<string, unknown>;
          exitCode: number;
        };
        p.reject(
          new EgressError(e.code, e.message, {
            exitCode: e.exitCode as ExitCode,
            ...(e.hint ? { hint: e.hint } : {}),
            ...(e.details ? { details: e.details } : {}),
          }),
        );
      }
    });
    c.on("exit", (code, signal) => {
      if (child === c) child = null;
      for (const [id, p] of pending) {
        pending.delete(id);
        p.reject(
          new EgressError(
            "ERR_EGRESS_NFT_FAILED",
            `nft failed (libnftables helper ended: ${signal ?? `exit ${String(code)}`}); the previous ruleset stays in force`,
            {
              exitCode: 3,
              hint: "the next change starts a new helper; see the log for the library's message",
            },
          ),
        );
      }
    });
    return c;
  };

  const call = <T>(op: Op, arg?: unknown): Promise<T> =>
    new Promise<T>((resolve, reject) => {
      child ??= start();
      const id = ++seq;
      pending.set(id, { resolve: resolve as (v: unknown) => void, reject });
      child.send({ id, op, arg } satisfies RequestMsg, (err) => {
        if (err && pending.delete(id)) reject(err);
      });
    });

  // What the helper chose (libnftables, or the program as its fallback), for logs and status:
  // asked once, after the first call succeeded.
  let asked = false;
  const describe = () => {
    if (asked) return;
    asked = true;
    void call<{ backend: NftBackend; detail: string }>("describe").then(
      (d) => (described = { backend: d.backend, detail: `${d.detail}, in a helper process` }),
      () => (asked = false),
    );
  };

  return {
    get backend() {
      return described.backend;
    },
    get detail() {
      return described.detail;
    },
    apply: async (batch) => {
      await call("apply", batch);
      describe();
    },
    check: (batch) => call<void>("check", batch).then(() => undefined),
    listTable: (table) => call<unknown>("listTable", table),
    listSet: (table, set) => call<unknown>("listSet", [table, set]),
    listCounters: async (table) =>
      new Map(
        await call<[string, { packets: number; bytes: number }][]>("listCounters", table),
      ) as Counters,
    close() {
      child?.disconnect();
      child = null;
    },
  };
}
