// @tlimage/sdk: sandbox image definitions for tlimage, in TypeScript or JavaScript.
//
//   import { Image } from "@tlimage/sdk";
//   export default new Image({ name: "data-tools" })
//     .run("pip install pandas pyarrow jupyter")
//     .env("APP_ENV", "prod");
//
// Mirrors the Python DSL (`tlimage.Image`): same methods (camelCase), same options, same
// lowering of the helpers (pipInstall/aptInstall produce the same RUN command text), so one
// image written in either language has the same IR digest. Builders never mutate: each call
// returns a new Image. An empty call (run([]), expose()) adds no operation.
//
// `toJSON()` is the image object of the JSON image document (schema_version 1, the schema
// `tl sbx image schema` prints). Values are checked here only for shape (types, option names);
// the full rules (names, ports, modes) are checked by tlimage, which points its errors at the
// line that made the call: each operation records its call site.

const BRAND = Symbol.for("tlimage.Image");
const EXTEND = Symbol("extend");
const SDK_DIR = new URL(".", import.meta.url).href;

export const SCHEMA_VERSION = 1;
export const DEFAULT_BASE_IMAGE = "debian-minimal";

const RUN_OPTIONS = ["env", "force", "mounts", "network", "user", "workdir"];
const COPY_OPTIONS = ["chmod", "chown", "exclude", "force", "from", "link", "parents"];
const ADD_OPTIONS = ["checksum", "chmod", "chown", "exclude", "force", "keepGitDir", "link"];
const HEALTHCHECK_OPTIONS = ["interval", "retries", "startInterval", "startPeriod", "timeout"];
const PIP_OPTIONS = ["extraIndexUrl", "force", "indexUrl", "pre"];
const APT_OPTIONS = ["force"];

/** A definition error, thrown at the call that caused it; `source` is that call's place. */
export class ImageDefinitionError extends TypeError {
  constructor(message, source) {
    super(message);
    this.name = "ImageDefinitionError";
    this.source = source;
  }
}

export class Image {
  #name;
  #tag;
  #baseImage;
  #ops;
  #source;

  /**
   * @param {{name?: string, tag?: string, baseImage?: string}} [init]
   */
  constructor(init = {}, ...internal) {
    if (init === EXTEND) {
      // A new image: `from`'s operations and one more (see #with).
      const [from, entry] = internal;
      this.#name = from.#name;
      this.#tag = from.#tag;
      this.#baseImage = from.#baseImage;
      this.#source = from.#source;
      this.#ops = Object.freeze([...from.#ops, Object.freeze(entry)]);
      Object.freeze(this);
      return;
    }
    const source = callSite();
    if (init === null || typeof init !== "object" || Array.isArray(init)) {
      throw new ImageDefinitionError(
        "Image(): expects an object like {name, tag, baseImage}", source);
    }
    only(init, ["baseImage", "name", "tag"], "Image", source, "field");
    const { name = "default", tag = "latest", baseImage = DEFAULT_BASE_IMAGE } = init;
    str(name, "Image", "name", source);
    str(tag, "Image", "tag", source);
    str(baseImage, "Image", "baseImage", source);
    this.#name = name;
    this.#tag = tag;
    this.#baseImage = baseImage;
    this.#ops = Object.freeze([]);
    this.#source = source;
    Object.freeze(this);
  }

  get [BRAND]() {
    return true;
  }

  get name() {
    return this.#name;
  }

  get tag() {
    return this.#tag;
  }

  get baseImage() {
    return this.#baseImage;
  }

  /** The operations so far, as in the JSON document (without sources). */
  get operations() {
    return this.#ops.map(({ source: _source, ...op }) => structuredClone(op));
  }

  #with(op, options, source) {
    const entry = { op: op.op, args: op.args };
    if (options && Object.keys(options).length) entry.options = options;
    entry.source = source;
    return new Image(EXTEND, this, entry);
  }

  /**
   * Run shell commands; several run in order in one step (`a && b`).
   * @param {string | readonly string[]} commands
   * @param {object} [options] env, user, workdir, network, mounts, force
   */
  run(commands, options) {
    const source = callSite();
    const cmds = strList(commands, "run", "commands", source).filter((c) => c.trim());
    const opts = optionsOf(options, RUN_OPTIONS, "run", source);
    if (!cmds.length) return this;
    return this.#with({ op: "RUN", args: cmds }, opts, source);
  }

  /**
   * Copy files from the build context (the folder of the image file) into the image.
   * @param {string | readonly string[]} src
   * @param {string} dest
   * @param {object} [options] chown, chmod, from, link, parents, exclude, force
   */
  copy(src, dest, options) {
    return this.#transfer("COPY", "copy", COPY_OPTIONS, src, dest, options, callSite());
  }

  /**
   * Like copy; URLs are downloaded and local tar archives unpacked.
   * @param {string | readonly string[]} src
   * @param {string} dest
   * @param {object} [options] chown, chmod, checksum, keepGitDir, link, exclude, force
   */
  add(src, dest, options) {
    return this.#transfer("ADD", "add", ADD_OPTIONS, src, dest, options, callSite());
  }

  #transfer(op, method, allowed, src, dest, options, source) {
    const sources = strList(src, method, "src", source);
    str(dest, method, "dest", source);
    const opts = optionsOf(options, allowed, method, source);
    if (!sources.length) return this;
    if (typeof opts.chmod === "number") opts.chmod = opts.chmod.toString(8); // 0o755 -> "755"
    if ("keepGitDir" in opts) {
      opts.keep_git_dir = opts.keepGitDir;
      delete opts.keepGitDir;
    }
    const first = Array.isArray(src) ? [...sources] : sources[0];
    return this.#with({ op, args: [first, dest] }, opts, source);
  }

  /** @param {string} key @param {string | number} value */
  env(key, value) {
    const source = callSite();
    str(key, "env", "key", source);
    scalar(value, "env", "value", source);
    return this.#with({ op: "ENV", args: [key, value] }, null, source);
  }

  /** @param {string} directory */
  workdir(directory) {
    const source = callSite();
    str(directory, "workdir", "directory", source);
    return this.#with({ op: "WORKDIR", args: [directory] }, null, source);
  }

  /** @param {string | number} user name, uid, name:group or uid:gid */
  user(user) {
    const source = callSite();
    if (typeof user !== "number") str(user, "user", "user", source);
    return this.#with({ op: "USER", args: [user] }, null, source);
  }

  /** An array is the exec form (argv); a string runs through the shell. */
  entrypoint(command) {
    const source = callSite();
    return this.#with({ op: "ENTRYPOINT", ...commandOf(command, "entrypoint", source) },
      shellOption(command), source);
  }

  /** An array is the exec form (argv); a string runs through the shell. */
  cmd(command) {
    const source = callSite();
    return this.#with({ op: "CMD", ...commandOf(command, "cmd", source) },
      shellOption(command), source);
  }

  /** @param {string} key @param {string | number} value */
  label(key, value) {
    const source = callSite();
    str(key, "label", "key", source);
    scalar(value, "label", "value", source);
    return this.#with({ op: "LABEL", args: [key, value] }, null, source);
  }

  /** Ports as numbers or strings like "53/udp" or "8000-8010"; the protocol defaults to tcp. */
  expose(...ports) {
    const source = callSite();
    ports.forEach((p, i) => {
      if (typeof p !== "number" && typeof p !== "string") {
        throw new ImageDefinitionError(
          `expose(): ports[${i}] must be a number or a string, got ${typeName(p)}`, source);
      }
    });
    if (!ports.length) return this;
    return this.#with({ op: "EXPOSE", args: ports }, null, source);
  }

  /** A build argument; without a default when `defaultValue` is omitted. */
  arg(name, defaultValue) {
    const source = callSite();
    str(name, "arg", "name", source);
    if (defaultValue === undefined || defaultValue === null) {
      return this.#with({ op: "ARG", args: [name] }, null, source);
    }
    scalar(defaultValue, "arg", "defaultValue", source);
    return this.#with({ op: "ARG", args: [name, defaultValue] }, null, source);
  }

  /** The shell that shell-form commands run with, e.g. ["/bin/bash", "-c"]. */
  shell(argv) {
    const source = callSite();
    if (!Array.isArray(argv) || !argv.length) {
      throw new ImageDefinitionError(
        "shell(): takes the shell's argv as a non-empty array, e.g. [\"/bin/bash\", \"-c\"]",
        source);
    }
    return this.#with({ op: "SHELL", args: strList(argv, "shell", "argv", source) }, null, source);
  }

  /** @param {string | number} signal e.g. "SIGTERM" or 15 */
  stopsignal(signal) {
    const source = callSite();
    if (typeof signal !== "number") str(signal, "stopsignal", "signal", source);
    return this.#with({ op: "STOPSIGNAL", args: [signal] }, null, source);
  }

  /**
   * `null` disables a base image's healthcheck; durations are in seconds.
   * @param {string | readonly string[] | null} command
   * @param {object} [options] interval, timeout, startPeriod, startInterval, retries
   */
  healthcheck(command, options) {
    const source = callSite();
    const opts = optionsOf(options, HEALTHCHECK_OPTIONS, "healthcheck", source);
    const out = {};
    for (const [key, name] of [["interval", "interval"], ["timeout", "timeout"],
      ["startPeriod", "start_period"], ["startInterval", "start_interval"],
      ["retries", "retries"]]) {
      if (opts[key] === undefined) continue;
      if (typeof opts[key] !== "number") {
        throw new ImageDefinitionError(
          `healthcheck(): ${key} must be a number, got ${typeName(opts[key])}`, source);
      }
      out[name] = opts[key];
    }
    if (command === null) {
      return this.#with({ op: "HEALTHCHECK", args: [] }, out, source);
    }
    const shell = shellOption(command);
    return this.#with({ op: "HEALTHCHECK", ...commandOf(command, "healthcheck", source) },
      { ...shell, ...out }, source);
  }

  /** Mount points kept out of the image's layers. */
  volume(...paths) {
    const source = callSite();
    paths.forEach((p, i) => str(p, "volume", `paths[${i}]`, source));
    if (!paths.length) return this;
    return this.#with({ op: "VOLUME", args: paths }, null, source);
  }

  /**
   * `python3 -m pip install ...`; the same command text as the Python DSL's pip_install.
   * Packages are strings or arrays of strings; a last plain object holds the options
   * (indexUrl, extraIndexUrl, pre, force).
   */
  pipInstall(...packages) {
    const source = callSite();
    const [pkgs, opts] = packagesOf(packages, PIP_OPTIONS, "pipInstall", source);
    if (!pkgs.length) return this;
    const argv = ["python3", "-m", "pip", "install", "--no-cache-dir"];
    if (opts.pre) argv.push("--pre");
    if (opts.indexUrl) argv.push("--index-url", opts.indexUrl);
    if (opts.extraIndexUrl) argv.push("--extra-index-url", opts.extraIndexUrl);
    argv.push(...pkgs);
    return this.#with({ op: "RUN", args: [shlexJoin(argv)] }, forceOption(opts), source);
  }

  /** Debian/Ubuntu packages without recommends, cleaning the package lists afterwards. */
  aptInstall(...packages) {
    const source = callSite();
    const [pkgs, opts] = packagesOf(packages, APT_OPTIONS, "aptInstall", source);
    if (!pkgs.length) return this;
    const cmd = "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y " +
      `--no-install-recommends ${shlexJoin(pkgs)} && rm -rf /var/lib/apt/lists/*`;
    return this.#with({ op: "RUN", args: [cmd] }, forceOption(opts), source);
  }

  /**
   * The image object of a JSON image document. With `{sources: true}` each object carries
   * the `source` (file, line, column) of the call that made it.
   * @param {{sources?: boolean}} [how]
   */
  toObject(how = {}) {
    const out = {
      type: "image",
      name: this.#name,
      tag: this.#tag,
      base_image: this.#baseImage,
    };
    if (how.sources && this.#source) out.source = { ...this.#source };
    out.operations = this.#ops.map(({ source, ...op }) => {
      const entry = structuredClone(op);
      if (how.sources && source) entry.source = { ...source };
      return entry;
    });
    return out;
  }

  /** What `JSON.stringify(image)` writes: `toObject()` without sources. */
  toJSON() {
    return this.toObject();
  }

  toString() {
    return `Image(name=${JSON.stringify(this.#name)}, tag=${JSON.stringify(this.#tag)}, ` +
      `operations=${this.#ops.length})`;
  }
}

/** True for an Image of this SDK or of another copy of it (a different install). */
export function isImage(value) {
  return value !== null && typeof value === "object" && value[BRAND] === true &&
    typeof value.toObject === "function";
}

/** A JSON image document of several images. */
export function toDocument(images, how = {}) {
  return {
    schema_version: SCHEMA_VERSION,
    images: images.map((img) => img.toObject(how)),
  };
}

// -- call sites -------------------------------------------------------------------------------

const FRAME = /(?:\(|at )((?:file:\/\/|\/|[A-Za-z]:\\)[^()]*?):(\d+):(\d+)\)?\s*$/;

/** The first stack frame outside this SDK: the user's call. */
function callSite() {
  const limit = Error.stackTraceLimit;
  Error.stackTraceLimit = 50;
  const stack = new Error().stack ?? "";
  Error.stackTraceLimit = limit;
  for (const line of stack.split("\n").slice(1)) {
    const m = FRAME.exec(line);
    if (!m) continue;
    let file = m[1];
    if (file.startsWith(SDK_DIR)) continue;
    if (file.startsWith("file://")) file = decodeURIComponent(new URL(file).pathname);
    else if (file.startsWith(fileURLPath(SDK_DIR))) continue;
    return Object.freeze({ file, line: Number(m[2]), column: Number(m[3]) });
  }
  return undefined;
}

function fileURLPath(url) {
  return decodeURIComponent(new URL(url).pathname);
}

// -- checks (shape only; tlimage checks the rest) ---------------------------------------------

function typeName(v) {
  if (v === null) return "null";
  if (Array.isArray(v)) return "an array";
  return `${typeof v === "object" ? "an" : "a"} ${typeof v} ${typeof v === "string" ? JSON.stringify(v) : typeof v === "object" ? "" : String(v)}`.trimEnd();
}

function str(value, method, what, source) {
  if (typeof value !== "string") {
    throw new ImageDefinitionError(
      `${method}(): ${what} must be a string, got ${typeName(value)}`, source);
  }
}

function scalar(value, method, what, source) {
  if (typeof value !== "string" && !(typeof value === "number" && Number.isFinite(value))) {
    throw new ImageDefinitionError(
      `${method}(): ${what} must be a string or a number, got ${typeName(value)}`, source);
  }
}

function strList(value, method, what, source) {
  if (typeof value === "string") return [value];
  if (Array.isArray(value)) {
    value.forEach((v, i) => str(v, method, `${what}[${i}]`, source));
    return [...value];
  }
  throw new ImageDefinitionError(
    `${method}(): ${what} must be a string or an array of strings, got ${typeName(value)}`,
    source);
}

function only(obj, allowed, method, source, what = "option") {
  for (const key of Object.keys(obj)) {
    if (!allowed.includes(key)) {
      throw new ImageDefinitionError(
        `${method}(): unknown ${what} ${JSON.stringify(key)}; allowed: ${allowed.join(", ")}`,
        source);
    }
  }
}

function optionsOf(options, allowed, method, source) {
  if (options === undefined || options === null) return {};
  if (typeof options !== "object" || Array.isArray(options)) {
    throw new ImageDefinitionError(
      `${method}(): options must be an object, got ${typeName(options)}`, source);
  }
  only(options, allowed, method, source);
  const out = {};
  for (const [k, v] of Object.entries(options)) if (v !== undefined) out[k] = v;
  return structuredClone(out);
}

function commandOf(command, method, source) {
  if (typeof command === "string") {
    if (!command.trim()) {
      throw new ImageDefinitionError(`${method}(): the command must not be empty`, source);
    }
    return { args: [command] };
  }
  return { args: strList(command, method, "command", source) };
}

function shellOption(command) {
  return typeof command === "string" ? { shell: true } : {};
}

function forceOption(opts) {
  return opts.force ? { force: true } : null;
}

function packagesOf(args, allowed, method, source) {
  let opts = {};
  const last = args[args.length - 1];
  if (last !== null && typeof last === "object" && !Array.isArray(last)) {
    opts = optionsOf(args.pop(), allowed, method, source);
  }
  const pkgs = [];
  args.forEach((a, i) => pkgs.push(...strList(a, method, `packages[${i}]`, source)));
  return [pkgs.filter((p) => p.trim()), opts];
}

// -- shell quoting, exactly as Python's shlex.quote ------------------------------------------

const UNSAFE = /[^\w@%+=:,./-]/;

/** Python's `shlex.quote`: the helpers must produce the DSL's command text byte for byte. */
export function shlexQuote(s) {
  if (!s) return "''";
  if (!UNSAFE.test(s)) return s;
  return `'${s.replaceAll("'", "'\"'\"'")}'`;
}

export function shlexJoin(argv) {
  return argv.map(shlexQuote).join(" ");
}
