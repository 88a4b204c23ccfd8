/** The `conntrack` tool: forgetting port-53 flows, so a DNS redirect applies to flows that predate it. */
import { execa } from "execa";
import { EgressError } from "../../rules/errors.ts";

/**
 * Deletes every UDP conntrack entry to port 53. A UDP flow that existed before a service's
 * DNS was redirected keeps its old destination until its entry goes; deleting it makes the
 * next datagram a new flow, which the redirect catches. (TCP flows are short-lived DNS
 * connections and are left to end.)
 */
export async function flushDnsConntrack(): Promise<void> {
  const r = await execa("conntrack", ["-D", "-p", "udp", "--orig-port-dst", "53"], {
    reject: false,
    stdin: "ignore",
  });
  if (r.failed && (r as { code?: string }).code === "ENOENT") {
    throw new EgressError("ERR_EGRESS_CONNTRACK", "cannot run conntrack: not installed", {
      exitCode: 3,
      hint: "install it (apt-get install conntrack / dnf install conntrack-tools)",
    });
  }
  // Exit 1 with "0 flow entries have been deleted" is fine: there was nothing to forget.
  if (r.exitCode !== 0 && !/0 flow entries/.test(r.stderr)) {
    throw new EgressError("ERR_EGRESS_CONNTRACK", `conntrack failed: ${r.stderr.trim()}`, {
      exitCode: 3,
      details: { command: r.command, exitCode: r.exitCode, stderr: r.stderr },
    });
  }
}
