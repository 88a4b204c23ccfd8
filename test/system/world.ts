/** The fake internet every outbound system test uses: documentation-range hosts inside the namespace. */
import type { Listen, Records } from "../helpers/sandbox.ts";

export const API4 = ["192.0.2.10", "192.0.2.11"];
export const API6 = "2001:db8::10";
export const OTHER = "198.51.100.20";
export const DB = "203.0.113.5";
export const V6HOST = "2001:db8:1::20";
export const CIDR_HOST = "198.51.100.70";
export const METADATA = "169.254.169.254";

export const SVC_UID = 2001;
export const AUDIT_UID = 2002;
export const UNMANAGED_UID = 3001;

const tcp = (host: string, ...ports: number[]): Listen[] =>
  ports.map((port) => ({ proto: "tcp" as const, host, port }));

export const WORLD = {
  addresses: [...API4, API6, OTHER, DB, V6HOST, CIDR_HOST, METADATA],
  listen: [
    ...API4.flatMap((h) => tcp(h, 443, 8080)),
    ...tcp(API6, 443, 8080),
    ...tcp(OTHER, 443),
    ...tcp(DB, 5432),
    { proto: "udp" as const, host: DB, port: 5353 },
    { proto: "udp" as const, host: DB, port: 5354 },
    ...tcp(V6HOST, 443, 444),
    ...tcp(CIDR_HOST, 8443, 8444),
    ...tcp(METADATA, 80),
  ],
  records: {
    "api.example.test": { A: API4, AAAA: [API6], ttl: 60 },
    "www.example.test": { CNAME: "edge.cdn.example.test", ttl: 60 },
    "edge.cdn.example.test": { A: [API4[0] as string], ttl: 60 },
    "metadata.example.test": { A: [METADATA], ttl: 60 },
    "other.example.test": { A: [OTHER], ttl: 60 },
  } satisfies Records,
  config: { resolvers: ["127.0.0.1:53"] },
};
