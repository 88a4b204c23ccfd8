/** The host's own addresses, read from the kernel (getifaddrs through os.networkInterfaces). */
import { networkInterfaces } from "node:os";
import { classify } from "../rules/address-filter.ts";

/** Every address assigned to an interface of this network namespace, canonical. */
export function hostAddresses(): Set<string> {
  const out = new Set<string>();
  for (const list of Object.values(networkInterfaces())) {
    for (const i of list ?? []) {
      const c = classify(i.address.replace(/%.*$/, ""));
      if (c) out.add(c.address);
    }
  }
  return out;
}
