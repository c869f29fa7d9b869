// Compiled by `tsc -p tsconfig.json` (test/types.test.js): the declarations accept the API as
// documented and reject misuse (each @ts-expect-error must be an error).
import { Image, isImage, toDocument, type DocumentJSON, type ImageJSON } from "../../src/index.js";
import { imagesOf } from "../../src/export.js";

const base = new Image({ name: "svc", tag: "v1", baseImage: "ubuntu-minimal" });
const img: Image = base
  .run("echo hi")
  .run(["a", "b"], { env: { A: "1", N: 2 }, network: "none", mounts: ["type=cache,target=/c", { type: "cache", target: "/d", sharing: "locked" }], force: true })
  .copy(["a", "b"], "/x/", { chmod: 0o755, chown: "1000:1000", exclude: ["*.tmp"], link: true, parents: true, from: "tools" })
  .add("https://example.com/x.tgz", "/x/", { checksum: "sha256:00", keepGitDir: true })
  .env("K", "v").workdir("/app").user(1000).user("app")
  .entrypoint(["python3", "-m", "app"]).cmd("serve --port 80")
  .label("k", "v").expose(80, "53/udp").arg("V").arg("W", "1")
  .shell(["/bin/bash", "-c"]).stopsignal("SIGTERM")
  .healthcheck(null).healthcheck(["/check"], { interval: 30, retries: 3 })
  .volume("/data", "/cache")
  .pipInstall("pandas", ["pyarrow"]).pipInstall(["x"], { pre: true, indexUrl: "https://i" })
  .aptInstall("git", "curl").aptInstall("gcc", { force: true });

const obj: ImageJSON = img.toObject({ sources: true });
const doc: DocumentJSON = toDocument([img]);
const found: Image[] = imagesOf({ default: img });
const ok: boolean = isImage(found[0]) && obj.type === "image" && doc.schema_version === 1;
void ok;

// @ts-expect-error: unknown option
base.run("x", { nework: "none" });
// @ts-expect-error: network is a closed set
base.run("x", { network: "bridge" });
// @ts-expect-error: keepGitDir is an ADD option
base.copy("a", "/b", { keepGitDir: true });
// @ts-expect-error: shell needs a non-empty argv
base.shell([]);
// @ts-expect-error: Image is built from an object
new Image("name");
// @ts-expect-error: env values are strings or numbers
base.env("K", true);

// The sandbox API client.
import { Sandbox, Client, ApiError } from "../../src/sandbox.js";
async function sandboxUsage(): Promise<void> {
  const sb = await Sandbox.create({ image: "x", secretNames: ["K"], memoryMb: 256,
    networkPolicy: { mode: "deny", allow: ["pypi.org", "10.0.0.0/8"] } });
  const r = await sb.exec(["true"], { env: { A: "1" } });
  const code: number = r.exitCode;
  for await (const ev of sb.stream(["ls"])) {
    if (ev.event === "exit") { const c: number = ev.data.exit_code; void c; }
  }
  const proc = await sb.spawn(["sleep", "9"], { name: "s" });
  const st: "starting" | "running" | "exited" | "failed" = (await proc.wait({ timeoutSecs: 1 })).state;
  void st;
  const f = await sb.files.stat("/");
  const kind: "file" | "dir" | "symlink" | "fifo" | "socket" | "char" | "block" = f.type;
  void code; void kind; void new Client({ url: "unix:/x", token: "t" }); void ApiError;
  // @ts-expect-error - exec takes an argv array
  await sb.exec("ls -la");
  // @ts-expect-error - create needs an image
  await Sandbox.create({ name: "n" });
  // @ts-expect-error - the network policy's mode is a closed set
  await Sandbox.create({ image: "x", networkPolicy: { mode: "block" } });
}
void sandboxUsage;
