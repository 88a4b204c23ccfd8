/** Types of scripts/bundles.mjs (the build's own code, plain JavaScript). */
export interface Metafile {
  outputs: Record<
    string,
    { bytes: number; entryPoint?: string; inputs: Record<string, { bytesInOutput: number }> }
  >;
}
export declare const ROOT: string;
export declare function bundles(opts: {
  version: string;
  outdir?: string;
  write?: boolean;
}): Promise<{ egressctl: Metafile; egressd: Metafile }>;
export declare function thinProblems(meta: { egressctl: Metafile; egressd: Metafile }): string[];
export declare function koffiNative(): string | null;
