// A client for the tlimage sandbox HTTP API (`tl sbx serve`; OpenAPI at /openapi.json).
//
//   import { Sandbox } from "@tlimage/sdk/sandbox";
//   const sb = await Sandbox.create({ image: "data-tools", secretNames: ["API_KEY"] });
//   const r = await sb.exec(["python3", "-c", "print(1)"]);
//   for await (const ev of sb.stream(["sh", "-c", "echo hi"])) console.log(ev.event, ev.data);
//   await sb.files.write("/srv/a.txt", "hello");
//   await sb.terminate();
//
// The connection comes from the options ({ url | socketPath, token }) or the environment
// (TLIMAGE_API_URL: http://127.0.0.1:PORT or unix:/path; TLIMAGE_API_TOKEN).

import http from "node:http";

const DEFAULT_URL = "http://127.0.0.1:8765";

export class ApiError extends Error {
  constructor(status, message, hint) {
    super(hint ? `${message} (hint: ${hint})` : message);
    this.name = "ApiError";
    this.status = status;
    this.hint = hint;
  }
}

export class Client {
  constructor(options = {}) {
    const url = options.url ?? process.env.TLIMAGE_API_URL ?? DEFAULT_URL;
    if (options.socketPath || url.startsWith("unix:")) {
      this.socketPath = options.socketPath ?? url.slice("unix:".length);
      this.base = new URL("http://localhost");
    } else {
      this.base = new URL(url);
    }
    this.token = options.token ?? process.env.TLIMAGE_API_TOKEN;
    if (!this.token) {
      throw new TypeError("no API token: pass { token } or set TLIMAGE_API_TOKEN " +
        "(the api-token file in the tlimage state folder)");
    }
  }

  #open(method, path, { query, json, body, accept } = {}) {
    const target = new URL(path, this.base);
    for (const [k, v] of Object.entries(query ?? {})) {
      if (v !== undefined) target.searchParams.set(k, String(v));
    }
    const headers = { Authorization: `Bearer ${this.token}` };
    let payload = body;
    if (json !== undefined) {
      payload = Buffer.from(JSON.stringify(json));
      headers["Content-Type"] = "application/json";
    } else if (typeof payload === "string") {
      payload = Buffer.from(payload);
    }
    if (payload !== undefined) headers["Content-Length"] = String(payload.length);
    if (accept) headers.Accept = accept;
    const where = this.socketPath
      ? { socketPath: this.socketPath }
      : { hostname: target.hostname.replace(/^\[|\]$/g, ""), port: target.port };
    return new Promise((resolve, reject) => {
      const req = http.request({ ...where, method, path: target.pathname + target.search, headers },
        resolve);
      req.on("error", reject);
      req.end(payload);
    });
  }

  async request(method, path, options = {}) {
    const res = await this.#open(method, path, options);
    const chunks = [];
    for await (const c of res) chunks.push(c);
    const raw = Buffer.concat(chunks);
    const isJson = (res.headers["content-type"] ?? "").startsWith("application/json");
    const data = isJson ? JSON.parse(raw.toString("utf8")) : raw;
    if (res.statusCode >= 400) {
      throw new ApiError(res.statusCode, isJson ? data.error : raw.toString("utf8"),
        isJson ? data.hint : undefined);
    }
    return data;
  }

  async *events(method, path, options = {}) {
    const res = await this.#open(method, path, { ...options, accept: "text/event-stream" });
    if (res.statusCode >= 400) {
      const chunks = [];
      for await (const c of res) chunks.push(c);
      const data = JSON.parse(Buffer.concat(chunks).toString("utf8"));
      throw new ApiError(res.statusCode, data.error, data.hint);
    }
    res.setEncoding("utf8");
    let buf = "";
    for await (const chunk of res) {
      buf += chunk;
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        let event = "message";
        let data = "";
        for (const line of block.split("\n")) {
          if (line.startsWith("event: ")) event = line.slice(7);
          else if (line.startsWith("data: ")) data += line.slice(6);
        }
        yield { event, data: data ? JSON.parse(data) : {} };
      }
    }
  }
}

function sandboxBody(o) {
  const body = {
    image: o.image, name: o.name, backend: o.backend, cpus: o.cpus, memory_mb: o.memoryMb,
    timeout_secs: o.timeoutSecs, entrypoint: o.entrypoint, env: o.env, workdir: o.workdir,
    user: o.user, network: o.network, network_policy: o.networkPolicy,
    secret_names: o.secretNames,
  };
  return Object.fromEntries(Object.entries(body).filter(([, v]) => v !== undefined));
}

function execBody(cmd, o = {}) {
  if (!Array.isArray(cmd) || cmd.length === 0) throw new TypeError("cmd must be a non-empty array");
  const body = { cmd, env: o.env, workdir: o.workdir, user: o.user, timeout_secs: o.timeoutSecs,
    stdin: o.stdin };
  return Object.fromEntries(Object.entries(body).filter(([, v]) => v !== undefined));
}

class Files {
  #sb;
  constructor(sb) { this.#sb = sb; }
  #path(sub = "") { return `/v1/sandboxes/${encodeURIComponent(this.#sb.id)}/files${sub}`; }
  read(path) { return this.#sb.client.request("GET", this.#path(), { query: { path } }); }
  async readText(path) { return (await this.read(path)).toString("utf8"); }
  write(path, data, { mode } = {}) {
    const m = mode === undefined ? undefined : mode.toString(8);
    return this.#sb.client.request("PUT", this.#path(), { query: { path, mode: m },
      body: typeof data === "string" ? Buffer.from(data) : Buffer.from(data) });
  }
  list(path = "/") { return this.#sb.client.request("GET", this.#path("/list"), { query: { path } }); }
  stat(path) { return this.#sb.client.request("GET", this.#path("/stat"), { query: { path } }); }
  mkdir(path, { parents = false } = {}) {
    return this.#sb.client.request("POST", this.#path("/mkdir"), { json: { path, parents } });
  }
  remove(path, { recursive = false } = {}) {
    return this.#sb.client.request("DELETE", this.#path(), { query: { path, recursive } });
  }
}

export class Process {
  constructor(sb, status) {
    this.sandbox = sb;
    this.id = status.id;
    this.last = status;
  }
  #path(sub = "") { return `/v1/sandboxes/${encodeURIComponent(this.sandbox.id)}/processes/${this.id}${sub}`; }
  get pid() { return this.last.pid; }
  async status() { return (this.last = await this.sandbox.client.request("GET", this.#path())); }
  async signal(signal = "TERM") {
    return (this.last = await this.sandbox.client.request("POST", this.#path("/signal"), { json: { signal } }));
  }
  async wait({ timeoutSecs = 30 } = {}) {
    return (this.last = await this.sandbox.client.request("POST", this.#path("/wait"),
      { query: { timeout_secs: timeoutSecs } }));
  }
  async output(stream = "stdout") {
    return (await this.sandbox.client.request("GET", this.#path("/logs"), { query: { stream } })).toString("utf8");
  }
  follow({ stream } = {}) {
    return this.sandbox.client.events("GET", this.#path("/logs"), { query: { stream } });
  }
}

export class Sandbox {
  constructor(client, info) {
    this.client = client;
    this.id = info.sandbox_id;
    this.last = info;
    this.files = new Files(this);
  }

  static #client(o) { return o?.client ?? new Client(o ?? {}); }

  static async create(options) {
    const client = Sandbox.#client(options);
    if (!options?.image) throw new TypeError("Sandbox.create needs { image }");
    const info = await client.request("POST", "/v1/sandboxes", { json: sandboxBody(options) });
    return new Sandbox(client, info);
  }

  static async get(ref, options) {
    const client = Sandbox.#client(options);
    return new Sandbox(client, await client.request("GET", `/v1/sandboxes/${encodeURIComponent(ref)}`));
  }

  static async list(options) {
    const client = Sandbox.#client(options);
    const all = await client.request("GET", "/v1/sandboxes", { query: { all: options?.all ? "true" : undefined } });
    return all.map((info) => new Sandbox(client, info));
  }

  static async secretNames(options) {
    return (await Sandbox.#client(options).request("GET", "/v1/secrets")).names;
  }

  #path(sub = "") { return `/v1/sandboxes/${encodeURIComponent(this.id)}${sub}`; }

  async info() {
    this.last = await this.client.request("GET", this.#path());
    return this.last;
  }

  async exec(cmd, options) {
    const r = await this.client.request("POST", this.#path("/exec"), { json: execBody(cmd, options) });
    return { exitCode: r.exit_code, stdout: r.stdout, stderr: r.stderr, durationSecs: r.duration_secs };
  }

  stream(cmd, options) {
    return this.client.events("POST", this.#path("/exec"), { json: execBody(cmd, options) });
  }

  async spawn(cmd, options = {}) {
    const body = { ...execBody(cmd, options), name: options.name };
    delete body.stdin;
    delete body.timeout_secs;
    if (body.name === undefined) delete body.name;
    return new Process(this, await this.client.request("POST", this.#path("/processes"), { json: body }));
  }

  async processes() {
    return (await this.client.request("GET", this.#path("/processes"))).map((st) => new Process(this, st));
  }

  async process(pid) {
    return new Process(this, await this.client.request("GET", this.#path(`/processes/${encodeURIComponent(pid)}`)));
  }

  snapshot({ register } = {}) {
    return this.client.request("POST", this.#path("/snapshot"), { json: register ? { register } : {} });
  }

  async clone({ name, register, memory, withSecrets } = {}) {
    const fields = { name, register, memory, with_secrets: withSecrets };
    const body = Object.fromEntries(Object.entries(fields).filter(([, v]) => v !== undefined));
    return new Sandbox(this.client, await this.client.request("POST", this.#path("/clone"), { json: body }));
  }

  suspend() { return this.client.request("POST", this.#path("/suspend")); }
  resume() { return this.client.request("POST", this.#path("/resume")); }

  async terminate() {
    this.last = await this.client.request("DELETE", this.#path());
    return this.last;
  }
}
