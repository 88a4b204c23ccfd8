/**
 * Which way to the kernel: libnftables in-process when it loads, else the `nft` program.
 * EGRESSD_NFT=<program> forces the program (tests point it at a wrapper that counts calls);
 * EGRESSD_LIBNFTABLES=<path> names the library to load instead of libnftables.so.1.
 */
import { execNft, nftBinary } from "./nft.exec.ts";
import { libnftables, libraryName } from "./libnftables.ffi.ts";
import type { Nft } from "./nft.ts";

export type { Nft, NftBackend } from "./nft.ts";

/** Chooses the backend now: libnftables unless EGRESSD_NFT is set or the library will not load. */
export function chooseNft(env: NodeJS.ProcessEnv = process.env): Nft {
  if (env.EGRESSD_NFT)
    return execNft(env.EGRESSD_NFT, `nft program (${env.EGRESSD_NFT}, forced by EGRESSD_NFT)`);
  const library = libraryName(env);
  try {
    return libnftables(library);
  } catch (err) {
    const why = (err as Error).message.split("\n")[0] ?? "";
    return execNft(nftBinary(), `nft program (libnftables not loaded from ${library}: ${why})`);
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
    listCounters: (table) => get().listCounters(table),
  };
}
