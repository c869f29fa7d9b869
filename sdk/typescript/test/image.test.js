import assert from "node:assert/strict";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

import {
  Image, ImageDefinitionError, isImage, shlexJoin, shlexQuote, toDocument,
} from "../src/index.js";

const HERE = fileURLToPath(import.meta.url);

test("builders never mutate", () => {
  const base = new Image({ name: "a" }).run("echo base");
  const one = base.run("echo one");
  const two = base.env("X", "1");
  assert.equal(base.operations.length, 1);
  assert.deepEqual(one.operations.at(-1), { op: "RUN", args: ["echo one"] });
  assert.deepEqual(two.operations.at(-1), { op: "ENV", args: ["X", "1"] });
  assert.ok(Object.isFrozen(base));
  assert.throws(() => { base.extra = 1; }, TypeError);
});

test("an empty call adds no operation", () => {
  const img = new Image();
  for (const same of [img.run([]), img.run(""), img.run(["  ", ""]), img.copy([], "/x"),
    img.add([], "/x"), img.expose(), img.volume(), img.pipInstall(), img.aptInstall([]),
    img.pipInstall([], { pre: true })]) {
    assert.equal(same, img);
  }
});

test("toJSON is the schema's image object, for every operation", () => {
  const img = new Image({ name: "all", tag: "v1", baseImage: "ubuntu-minimal" })
    .arg("VERSION", "1.0")
    .arg("DEBUG")
    .shell(["/bin/bash", "-c"])
    .run(["a", "b"], { env: { A: "1", N: 3 }, user: "root", workdir: "/src", network: "none",
      mounts: ["type=cache,target=/c", { type: "secret", id: "t" }], force: true })
    .copy(["x", "y"], "/d/", { chown: "1:1", chmod: 0o644, from: "tools", link: true,
      parents: true, exclude: ["*.tmp"], force: false })
    .add("https://e.x/a.tgz", "/a/", { checksum: "sha256:00", keepGitDir: true, chmod: "u+x" })
    .env("APP_ENV", "prod")
    .workdir("/srv")
    .user(1000)
    .label("k", 42)
    .expose(8080, "53/udp")
    .volume("/data")
    .stopsignal("SIGTERM")
    .healthcheck("curl -f localhost", { interval: 30, timeout: 5, startPeriod: 1,
      startInterval: 0.5, retries: 3 })
    .healthcheck(null)
    .healthcheck(["/check", "-q"])
    .entrypoint(["python3", "-m", "app"])
    .cmd("serve");
  assert.deepEqual(JSON.parse(JSON.stringify(img)), {
    type: "image", name: "all", tag: "v1", base_image: "ubuntu-minimal",
    operations: [
      { op: "ARG", args: ["VERSION", "1.0"] },
      { op: "ARG", args: ["DEBUG"] },
      { op: "SHELL", args: ["/bin/bash", "-c"] },
      { op: "RUN", args: ["a", "b"], options: { env: { A: "1", N: 3 }, user: "root",
        workdir: "/src", network: "none",
        mounts: ["type=cache,target=/c", { type: "secret", id: "t" }], force: true } },
      { op: "COPY", args: [["x", "y"], "/d/"], options: { chown: "1:1", chmod: "644",
        from: "tools", link: true, parents: true, exclude: ["*.tmp"], force: false } },
      { op: "ADD", args: ["https://e.x/a.tgz", "/a/"], options: { checksum: "sha256:00",
        chmod: "u+x", keep_git_dir: true } },
      { op: "ENV", args: ["APP_ENV", "prod"] },
      { op: "WORKDIR", args: ["/srv"] },
      { op: "USER", args: [1000] },
      { op: "LABEL", args: ["k", 42] },
      { op: "EXPOSE", args: [8080, "53/udp"] },
      { op: "VOLUME", args: ["/data"] },
      { op: "STOPSIGNAL", args: ["SIGTERM"] },
      { op: "HEALTHCHECK", args: ["curl -f localhost"], options: { shell: true, interval: 30,
        timeout: 5, start_period: 1, start_interval: 0.5, retries: 3 } },
      { op: "HEALTHCHECK", args: [] },
      { op: "HEALTHCHECK", args: ["/check", "-q"] },
      { op: "ENTRYPOINT", args: ["python3", "-m", "app"] },
      { op: "CMD", args: ["serve"], options: { shell: true } },
    ],
  });
});

test("options passed in are copied, not shared", () => {
  const env = { A: "1" };
  const img = new Image().run("x", { env });
  env.A = "2";
  assert.deepEqual(img.operations[0].options.env, { A: "1" });
  img.operations[0].options.env.A = "3";
  assert.deepEqual(img.operations[0].options.env, { A: "1" });
});

test("helpers produce the Python DSL's command text", () => {
  // The same strings as fixtures/dsl/helpers/expected.ir.
  const img = new Image({ name: "helpers" })
    .aptInstall("git", "curl")
    .pipInstall(["pandas==2.2.*", "pyarrow"], "jupyter", { pre: true })
    .aptInstall("build-essential", { force: true });
  assert.deepEqual(img.operations, [
    { op: "RUN", args: ["apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y " +
      "--no-install-recommends git curl && rm -rf /var/lib/apt/lists/*"] },
    { op: "RUN", args: ["python3 -m pip install --no-cache-dir --pre 'pandas==2.2.*' pyarrow " +
      "jupyter"] },
    { op: "RUN", args: ["apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y " +
      "--no-install-recommends build-essential && rm -rf /var/lib/apt/lists/*"],
    options: { force: true } },
  ]);
  assert.equal(
    new Image().pipInstall("x", { indexUrl: "https://i/simple", extraIndexUrl: "https://e" })
      .operations[0].args[0],
    "python3 -m pip install --no-cache-dir --index-url https://i/simple --extra-index-url " +
    "https://e x");
});

test("shlexQuote is Python's shlex.quote", () => {
  // Expected values printed by Python's shlex.quote.
  const cases = [
    ["", "''"], ["abc", "abc"], ["a b", "'a b'"], ["it's", "'it'\"'\"'s'"],
    ["pandas==2.2.*", "'pandas==2.2.*'"], ["a@b%c+d=e:f,g.h/i-j_k", "a@b%c+d=e:f,g.h/i-j_k"],
    ["é", "'é'"], ["$HOME", "'$HOME'"], ["x>=1", "'x>=1'"], ["~", "'~'"],
  ];
  for (const [input, want] of cases) assert.equal(shlexQuote(input), want, input);
  assert.equal(shlexJoin(["echo", "a b"]), "echo 'a b'");
});

test("each operation records its call site", () => {
  const img = new Image({ name: "s" })
    .run("x")
    .env("K", "v");
  const obj = img.toObject({ sources: true });
  assert.equal(obj.source.file, HERE);
  const lines = obj.operations.map((o) => o.source.line);
  assert.equal(lines[1], lines[0] + 1);
  assert.equal(obj.source.line, lines[0] - 1);
  assert.ok(obj.operations.every((o) => o.source.column > 1));
  assert.equal(JSON.stringify(img).includes("source"), false);
});

test("wrong calls throw at the call site, naming what is allowed", () => {
  const img = new Image();
  const cases = [
    [() => img.run("x", { nework: "none" }),
      /^run\(\): unknown option "nework"; allowed: env, force, mounts, network, user, workdir/],
    [() => img.copy("a", "/b", { keepGitDir: true }), /^copy\(\): unknown option "keepGitDir"/],
    [() => img.run(42), /^run\(\): commands must be a string or an array of strings, got a number/],
    [() => img.copy("a", 1), /^copy\(\): dest must be a string/],
    [() => img.env("K", true), /^env\(\): value must be a string or a number, got a boolean/],
    [() => img.shell([]), /^shell\(\): takes the shell's argv as a non-empty array/],
    [() => img.cmd("  "), /^cmd\(\): the command must not be empty/],
    [() => img.expose(true), /^expose\(\): ports\[0\] must be a number or a string/],
    [() => img.healthcheck("x", { interval: "30s" }), /^healthcheck\(\): interval must be a number/],
    [() => new Image("name"), /^Image\(\): expects an object like \{name, tag, baseImage\}/],
    [() => new Image({ base_image: "x" }), /^Image\(\): unknown field "base_image"; allowed: baseImage, name, tag/],
  ];
  for (const [call, pattern] of cases) {
    assert.throws(call, (err) => {
      assert.ok(err instanceof ImageDefinitionError);
      assert.match(err.message, pattern);
      assert.equal(err.source.file, HERE);
      assert.ok(err.source.line > 1 && err.source.column > 1);
      return true;
    });
  }
});

test("documents and image detection", () => {
  const a = new Image({ name: "a" });
  assert.ok(isImage(a));
  assert.ok(!isImage({ toObject() {} }));
  assert.deepEqual(toDocument([a]), {
    schema_version: 1,
    images: [{ type: "image", name: "a", tag: "latest", base_image: "debian-minimal",
      operations: [] }],
  });
});
