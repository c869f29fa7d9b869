import assert from "node:assert/strict";
import { test } from "node:test";

import { ApiError, Client, Sandbox } from "../src/sandbox.js";

// Runs against a real `tl sbx serve` (started by tests/vm/test_http_api.py, which sets
// TLIMAGE_API_URL, TLIMAGE_API_TOKEN and TLIMAGE_TEST_IMAGE); skipped without one.
const live = process.env.TLIMAGE_API_URL && process.env.TLIMAGE_TEST_IMAGE;
const skip = live ? false : "no tl sbx serve to talk to (run tests/vm/test_http_api.py)";

test("a client needs a token", () => {
  const saved = process.env.TLIMAGE_API_TOKEN;
  delete process.env.TLIMAGE_API_TOKEN;
  try {
    assert.throws(() => new Client({ url: "http://127.0.0.1:1" }), /no API token/);
  } finally {
    if (saved !== undefined) process.env.TLIMAGE_API_TOKEN = saved;
  }
});

test("Sandbox speaks the API of a live server", { skip }, async () => {
  const image = process.env.TLIMAGE_TEST_IMAGE;
  await assert.rejects(new Client({ token: "wrong" }).request("GET", "/v1/sandboxes"),
    (e) => e instanceof ApiError && e.status === 401);
  const sb = await Sandbox.create({ image, backend: "namespace", env: { X: "1" }, timeoutSecs: 300 });
  try {
    assert.equal(sb.last.status, "Running");
    assert.deepEqual(Object.keys(sb.last).slice(0, 10), ["sandbox_id", "namespace", "status",
      "image", "resources", "secret_names", "timeout_secs", "entrypoint", "created_at", "terminated_at"]);
    const r = await sb.exec(["sh", "-c", "echo $X; cat; echo e >&2; exit 2"], { stdin: "in\n" });
    assert.deepEqual([r.exitCode, r.stdout, r.stderr], [2, "1\nin\n", "e\n"]);
    const events = [];
    for await (const ev of sb.stream(["sh", "-c", "echo a; sleep 0.2; echo b >&2"])) events.push(ev);
    assert.deepEqual(events.slice(0, 2).map((e) => [e.event, e.data.data]), [["stdout", "a\n"], ["stderr", "b\n"]]);
    assert.equal(events.at(-1).event, "exit");
    assert.equal(events.at(-1).data.exit_code, 0);

    const w = await sb.files.write("/tmp/n.txt", "from node", { mode: 0o640 });
    assert.equal(w.mode, "0640");
    assert.equal(await sb.files.readText("/tmp/n.txt"), "from node");
    await sb.files.mkdir("/tmp/d/e", { parents: true });
    const names = (await sb.files.list("/tmp")).map((e) => e.name);
    assert.ok(names.includes("n.txt") && names.includes("d"), names.join(","));
    assert.equal((await sb.files.stat("/tmp/d")).type, "dir");
    await sb.files.remove("/tmp/d", { recursive: true });
    await assert.rejects(sb.files.stat("/tmp/d"), (e) => e.status === 404);

    const p = await sb.spawn(["sh", "-c", "echo started; sleep 30"], { name: "bg" });
    assert.equal(p.last.state, "running");
    assert.ok(Number.isInteger(p.pid));
    assert.equal((await sb.process("bg")).id, p.id);
    await p.signal("KILL");
    const end = await p.wait({ timeoutSecs: 10 });
    assert.deepEqual([end.state, end.exit_code], ["exited", 137]);
    assert.equal(await p.output(), "started\n");
    assert.equal((await sb.processes()).length, 1);

    const listed = await Sandbox.list();
    assert.ok(listed.some((s) => s.id === sb.id));
    assert.equal((await Sandbox.get(sb.id)).id, sb.id);
    assert.ok(Array.isArray(await Sandbox.secretNames()));
    await assert.rejects(Sandbox.create({ image, networkPolicy: { mode: "open" } }),
      (e) => e instanceof ApiError && e.status === 400 && /network_policy\.mode/.test(e.message));
    const walled = await Sandbox.create({ image, backend: "namespace",
      networkPolicy: { mode: "deny", allow: ["127.0.0.1"], block: ["10.0.0.0/8"] } });
    assert.equal(walled.last.status, "Running");
    assert.equal((await walled.terminate()).status, "Terminated");
    const twin = await sb.clone();
    assert.equal((await twin.exec(["cat", "/tmp/n.txt"])).stdout, "from node");
    assert.equal((await twin.terminate()).status, "Terminated");
  } finally {
    const end = await sb.terminate();
    assert.equal(end.status, "Terminated");
  }
  await assert.rejects(sb.exec(["true"]), (e) => e instanceof ApiError && e.status === 409);
});
