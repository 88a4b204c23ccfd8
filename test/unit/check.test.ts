import { suite } from "uvu";
import * as assert from "uvu/assert";
import { checkOwners, checkTexts } from "../../rules/check.ts";

const test = suite("egressctl check: every problem of every file, and across files");

const svc = (name: string, extra: object = {}) => ({
  file: `/etc/egressd/services.d/${name}.json`,
  kind: "service" as const,
  expectedName: name,
  text: JSON.stringify({ name, user: 2001, ...extra }),
});

test("each file is judged on its own; one broken file does not hide another", () => {
  const r = checkTexts([
    svc("svc-a", { mode: "paranoid" }),
    { ...svc("svc-b"), text: "{" },
    svc("svc-c", { user: 2003 }),
    { file: "/etc/egressd/egressd.json", kind: "config", text: '{"table": "9"}' },
  ]);
  assert.equal(
    r.problems.map((p) => [p.file.split("/").pop(), p.path]),
    [
      ["svc-a.json", "$.mode"],
      ["svc-b.json", null],
      ["egressd.json", "$.table"],
    ],
  );
  assert.equal(
    r.files.map((f) => f.valid),
    [false, false, true, false],
  );
});

test("a file whose name differs from its service is a problem; two files of one service are too", () => {
  const r = checkTexts([
    { ...svc("svc-a"), expectedName: "svc-b" },
    { ...svc("svc-c"), file: "/tmp/x" },
    { ...svc("svc-c", { user: 2004 }), file: "/tmp/y" },
  ]);
  assert.equal(
    r.problems.map((p) => `${p.file}: ${p.path}`),
    ["/etc/egressd/services.d/svc-a.json: $.name", "/tmp/y: $.name"],
  );
});

test("overlapping inbound ports are blamed on the file that declares the second", () => {
  const r = checkTexts([
    svc("svc-a", { inbound: [{ ports: "8000-8100" }] }),
    svc("svc-b", { user: 2002, inbound: [{ ports: "8080" }] }),
  ]);
  assert.equal(r.problems, [
    {
      file: "/etc/egressd/services.d/svc-b.json",
      path: "$.inbound",
      text: "inbound 8080/tcp overlaps 8000-8100/tcp of service svc-a: a port belongs to one service",
    },
  ]);
});

test("owners: a name that is uid 0 and a shared uid are problems, an unknown name a warning", () => {
  const services = checkTexts([
    svc("svc-a", { user: "toor" }),
    svc("svc-b", { user: "web" }),
    svc("svc-c", { user: 2001 }),
    svc("svc-d", { user: "ghost" }),
  ]).services;
  const r = checkOwners(services, {
    users: new Map<string | number, number>([
      ["toor", 0],
      ["web", 2001],
    ]),
    groups: new Map(),
  });
  assert.equal(
    r.problems.map((p) => `${p.file.split("/").pop()}: ${p.text.slice(0, 40)}`),
    [
      'svc-a.json: "toor" is uid 0: root can remove any fir',
      "svc-c.json: uid 2001 is already the user of service ",
    ],
  );
  assert.equal(
    r.warnings.map((w) => w.text),
    ['user "ghost" does not exist on this host: egressd refuses the policy until it does'],
  );
});

test.run();
