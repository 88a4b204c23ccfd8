/**
 * libnftables in-process: the library `nft` itself is built on, called through the koffi FFI
 * binding with the same JSON `nft -j` reads and prints. No process and no file per call: a
 * one-element change costs a fraction of a millisecond instead of a fork, an exec and a file.
 *
 * One nft context per process, used by one call at a time (libnftables is not thread-safe
 * per context). Every call runs on a worker thread (koffi's async calls), so the event loop
 * keeps answering DNS while the kernel works: measured, the thread hop adds ~0.04 ms to a
 * call, while a synchronous call would stop the loop for the whole call: ~2 ms for one element
 * in a table of 1,000 interval sets (libnftables re-reads the sets after every commit), ~370 ms
 * for a full replace at 1,000 services (docs/performance.md).
 */
import type { Batch } from "../../rules/batch.ts";
import { validateBatch } from "../../rules/nft-schema.ts";
import { nftFailed, noSuchTable, parseCounters, type Nft } from "./nft.ts";
import { serialQueue } from "./queue.ts";
import { loadKoffi, type KoffiFn } from "../koffi.ffi.ts";

/** The library's file name, or EGRESSD_LIBNFTABLES (a path; tests point it at a bad one). */
export const libraryName = (env: NodeJS.ProcessEnv = process.env): string =>
  env.EGRESSD_LIBNFTABLES || "libnftables.so.1";

const NFT_CTX_DEFAULT = 0;
const NFT_CTX_OUTPUT_JSON = 1 << 4;

interface Binding {
  run: KoffiFn;
  out: KoffiFn;
  err: KoffiFn;
  dryRun: KoffiFn;
  free: KoffiFn;
  /** A new context: JSON output, output and errors buffered. */
  context(): unknown;
  /** glibc's malloc_trim(0) (absent elsewhere): gives freed heap back to the system. */
  trim: (() => void) | null;
  koffi: string;
}

/** Loads the library and checks that a context can be made; throws when either fails. */
function bind(library: string): Binding {
  const koffi = loadKoffi();
  const lib = koffi.load(library);
  const f = (p: string) => lib.func(p);
  const ctxNew = f("void *nft_ctx_new(uint32_t flags)");
  const setFlags = f("void nft_ctx_output_set_flags(void *ctx, unsigned int flags)");
  const bufferOutput = f("int nft_ctx_buffer_output(void *ctx)");
  const bufferError = f("int nft_ctx_buffer_error(void *ctx)");
  const free = f("void nft_ctx_free(void *ctx)");
  let trim: (() => void) | null = null;
  try {
    const mallocTrim = koffi.load("libc.so.6").func("int malloc_trim(size_t pad)");
    trim = () => void mallocTrim(0);
  } catch {
    // Not glibc: nothing to trim with.
  }
  const b: Binding = {
    run: f("int nft_run_cmd_from_buffer(void *ctx, const uint8_t *buf)"),
    out: f("const char *nft_ctx_get_output_buffer(void *ctx)"),
    err: f("const char *nft_ctx_get_error_buffer(void *ctx)"),
    dryRun: f("void nft_ctx_set_dry_run(void *ctx, bool dry)"),
    free,
    context() {
      const ctx = ctxNew(NFT_CTX_DEFAULT);
      if (!ctx) throw new Error("nft_ctx_new returned NULL");
      setFlags(ctx, NFT_CTX_OUTPUT_JSON);
      if (bufferOutput(ctx) !== 0 || bufferError(ctx) !== 0) {
        free(ctx);
        throw new Error("nft_ctx_buffer_output/error failed");
      }
      return ctx;
    },
    trim,
    koffi: koffi.version,
  };
  return b;
}

/**
 * After a command this large (its batch or its output), the context is freed and made anew and
 * the heap trimmed. A context keeps its cache of the table, and each worker thread's malloc
 * arena keeps what libnftables freed: measured at 1,000 services, every full apply left ~70 MB
 * more resident (three applies: +210 MB); freeing the context and trimming brings it back.
 */
export const RECYCLE_FROM_BYTES = 256 * 1024;

/**
 * Library calls run one at a time, process-wide: a context must never be used by two calls at
 * once, and nothing says libnftables' few globals are safe across threads either.
 */
const serial = serialQueue();

/** libnftables through one context, calls queued one at a time. */
export interface Libnftables extends Nft {
  readonly backend: "libnftables";
  /** Frees the context; later calls fail. */
  close(): void;
}

/** Loads libnftables (EGRESSD_LIBNFTABLES or libnftables.so.1); throws when it cannot. */
export function libnftables(library: string = libraryName()): Libnftables {
  const b = bind(library);
  let ctx = b.context();
  let closed = false;

  /** Runs one command text; resolves with the output buffer or throws the error buffer. */
  const cmd = (what: string, text: string, dryRun = false) =>
    serial(async () => {
      if (closed) throw new Error("libnftables context used after close()");
      // A NUL-terminated buffer is passed as it is (a JS string would be copied into koffi's
      // small per-call heap); it stays referenced until the call returns.
      const buf = Buffer.from(text + "\0");
      if (dryRun) b.dryRun(ctx, true);
      let rc: number;
      try {
        rc = await new Promise<number>((resolve, reject) =>
          b.run.async(ctx, buf, (e: unknown, r: unknown) =>
            e ? reject(e as Error) : resolve(r as number),
          ),
        );
      } finally {
        if (dryRun) b.dryRun(ctx, false);
      }
      // Reading a buffer also empties it for the next command.
      const out = String(b.out(ctx) ?? "");
      const err = String(b.err(ctx) ?? "").trim();
      if (buf.length >= RECYCLE_FROM_BYTES || out.length >= RECYCLE_FROM_BYTES) {
        try {
          const fresh = b.context();
          b.free(ctx);
          ctx = fresh;
          b.trim?.();
        } catch {
          // No new context (out of memory): keep using the old one.
        }
      }
      if (rc !== 0) {
        throw nftFailed("libnftables", err || `nft_run_cmd_from_buffer returned ${rc}`, {
          command: `libnftables: ${what}`,
          exitCode: rc,
        });
      }
      return out;
    });

  const batchCmd = (batch: Batch, check: boolean) => {
    validateBatch(batch);
    const what = `${check ? "check" : "apply"} batch of ${batch.nftables.length} commands`;
    return cmd(what, JSON.stringify(batch), check).then(() => undefined);
  };

  return {
    backend: "libnftables",
    detail: `libnftables (${library}, in-process through koffi ${b.koffi})`,
    apply: (batch) => batchCmd(batch, false),
    check: (batch) => batchCmd(batch, true),
    async listTable(table) {
      const text = `list table inet ${table}`;
      try {
        return JSON.parse(await cmd(text, text)) as unknown;
      } catch (err) {
        if (noSuchTable(err)) return null;
        throw err;
      }
    },
    async listSet(table, set) {
      const text = `list set inet ${table} ${set}`;
      try {
        return JSON.parse(await cmd(text, text)) as unknown;
      } catch (err) {
        if (noSuchTable(err)) return null;
        throw err;
      }
    },
    async listCounters(table) {
      const text = `list counters table inet ${table}`;
      try {
        return parseCounters(await cmd(text, text));
      } catch (err) {
        if (noSuchTable(err)) return new Map();
        throw err;
      }
    },
    close() {
      if (closed) return;
      closed = true;
      void serial(async () => b.free(ctx));
    },
  };
}
