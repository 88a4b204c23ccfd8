import { suite } from "uvu";
import * as assert from "uvu/assert";
import { dnsBypassWarnings, hostsSources } from "../../rules/nsswitch.ts";

const test = suite("name-service settings that route lookups around the DNS proxy");

test("the hosts line is read, actions in brackets and comments ignored", () => {
  assert.equal(
    hostsSources(
      "passwd: files\n# hosts: dns\nhosts: files mymachines resolve [!UNAVAIL=return] dns myhostname\n",
    ),
    ["files", "mymachines", "resolve", "dns", "myhostname"],
  );
  assert.equal(hostsSources("passwd: files\n"), []);
});

test("resolve before dns (Fedora's default) and a running nscd are warned about; Debian's default is not", () => {
  const fedora = "hosts: files myhostname resolve [!UNAVAIL=return] dns\n";
  const [w] = dnsBypassWarnings(fedora, false);
  assert.match(w ?? "", 'resolves hosts through systemd-resolved ("resolve" before "dns")');
  assert.match(w ?? "", "InaccessiblePaths=");
  assert.equal(dnsBypassWarnings("hosts: files dns\n", false), []);
  assert.equal(dnsBypassWarnings("hosts: files dns resolve\n", false), [], "after dns: a fallback");
  assert.match(dnsBypassWarnings("hosts: files dns\n", true)[0] ?? "", "nscd is running");
});

test.run();
