/**
 * Which way to the kernel: libnftables in-process when it loads, else the `nft` program.
 * EGRESSD_NFT=<program> forces the program (tests point it at a wrapper that counts calls);
 * EGRESSD_LIBNFTABLES=<path> names the library to load instead of libnftables.so.1.
 */
import { libnftables, libraryName } from "./libnftables.ffi.ts";
import type { Nft } from "./nft.ts";

export type { Nft, NftBackend } from "./nft.ts";

/** The `nft` program's adapter; its module (and execa) loads on the first call. */
function program(bin: string, detail: string): Nft {
  let real: Promise<Nft> | null = null;
  const get = () => (real ??= import("./nft.exec.ts").then((m) => m.execNft(bin, detail)));
  return {
    backend: "nft",
    detail,
    apply: async (batch) => (await get()).apply(batch),
    check: async (batch) => (await get()).check(batch),
    listTable: async (table) => (await get()).listTable(table),
    listSet: async (table, set) => (await get()).listSet(table, set),
    listCounters: async (table) => (await get()).listCounters(table),
  };
}

/** Chooses the backend now: libnftables unless EGRESSD_NFT is set or the library will not load. */
export function chooseNft(env: NodeJS.ProcessEnv = process.env): Nft {
  if (env.EGRESSD_NFT) {
    return program(env.EGRESSD_NFT, `nft program (${env.EGRESSD_NFT}, forced by EGRESSD_NFT)`);
  }
  const library = libraryName(env);
  try {
    return libnftables(library);
  } catch (err) {
    const why = (err as Error).message.split("\n")[0] ?? "";
    return program("nft", `nft program (libnftables not loaded from ${library}: ${why})`);
  }
}

let chosen: Nft | null = null;

/**
 * The process's nftables adapter. The choice (and the loading of libnftables) happens on first
 * use, so commands that never touch nftables do not pay for it; every caller shares one context.
 */
export function defaultNft(): Nft {
  const get = () => (chosen ??= chooseNft());
  return {
    get backend() {
      return get().backend;
    },
    get detail() {
      return get().detail;
    },
    apply: (batch) => get().apply(batch),
    check: (batch) => get().check(batch),
    listTable: (table) => get().listTable(table),
    listSet: (table, set) => get().listSet(table, set),
    listCounters: (table) => get().listCounters(table),
  };
}
