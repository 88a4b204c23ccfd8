/**
 * koffi, the FFI binding egressd calls C libraries with (libnftables, libsystemd's sd_notify,
 * libc's flock): its native module, loaded and configured once per process.
 */
import { existsSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

/** The part of koffi's API used here. */
export interface KoffiFn {
  (...args: unknown[]): unknown;
  async(...args: unknown[]): void;
}
export interface Koffi {
  load(path: string): { func(prototype: string): KoffiFn };
  config(cfg: Record<string, number>): unknown;
  version: string;
}

let koffiModule: Koffi | null = null;

/**
 * koffi's native module: the one packaged beside the bundles (dist/koffi.node,
 * /usr/lib/egressd/koffi.node), else the koffi package (running from a checkout). Loaded and
 * configured once per process: koffi refuses a new configuration once it has made a call.
 */
export function loadKoffi(): Koffi {
  if (koffiModule) return koffiModule;
  const koffi = findKoffi();
  // libnftables keeps a 64 KiB netlink receive buffer on its stack: with a 64 KiB stack a
  // full apply fails ("cache initialization failed: Bad address") and then aborts. koffi's
  // default for worker-thread calls, 128 KiB, leaves little margin: give them what
  // synchronous calls get.
  koffi.config({ async_stack_size: 2 * 1024 * 1024, resident_async_pools: 2 });
  return (koffiModule = koffi);
}

function findKoffi(): Koffi {
  // This module is in a chunk (dist/chunks/) in egressctl, in the bundle itself in egressd.
  const here = dirname(fileURLToPath(import.meta.url));
  for (const file of [join(here, "koffi.node"), join(here, "..", "koffi.node")]) {
    if (!existsSync(file)) continue;
    const mod = { exports: {} as Koffi };
    process.dlopen(mod, file);
    return mod.exports;
  }
  return createRequire(import.meta.url)("koffi") as Koffi;
}
