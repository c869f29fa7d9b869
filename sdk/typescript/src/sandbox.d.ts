// Types of @tlimage/sdk/sandbox (src/sandbox.js): a client for `tl sbx serve`.

export interface ClientOptions {
  /** http://127.0.0.1:PORT or unix:/path (default: $TLIMAGE_API_URL, else http://127.0.0.1:8765). */
  url?: string;
  socketPath?: string;
  /** Bearer token (default: $TLIMAGE_API_TOKEN). */
  token?: string;
}

export declare class ApiError extends Error {
  readonly status: number;
  readonly hint: string | undefined;
}

export declare class Client {
  constructor(options?: ClientOptions);
  request(method: string, path: string, options?: {
    query?: Record<string, string | number | boolean | undefined>;
    json?: unknown;
    body?: Uint8Array | string;
  }): Promise<any>;
}

export type Status = "Pending" | "Running" | "Snapshotting" | "Suspending" | "Suspended" | "Terminated";

export interface SandboxInfo {
  sandbox_id: string;
  namespace: string;
  status: Status;
  image: string;
  resources: { cpus: number; memory_mb: number };
  secret_names: string[];
  timeout_secs: number | null;
  entrypoint: string[] | null;
  created_at: string;
  terminated_at: string | null;
  name: string | null;
  backend: string;
  [more: string]: unknown;
}

export interface CreateOptions extends ClientOptions {
  image: string;
  name?: string;
  backend?: "auto" | "microvm" | "namespace";
  cpus?: number;
  memoryMb?: number;
  timeoutSecs?: number;
  entrypoint?: string[];
  env?: Record<string, string>;
  workdir?: string;
  user?: string;
  network?: boolean;
  /** What the sandbox may reach (enforced outside it): "allow" internet (the default) or
   * "deny" it ("none": loopback only); `block` and `allow` hold CIDRs, addresses or host
   * names, and block wins over allow. */
  networkPolicy?: NetworkPolicy;
  secretNames?: string[];
  client?: Client;
}

export interface NetworkPolicy {
  mode?: "allow" | "deny" | "none";
  block?: string[];
  allow?: string[];
}

export interface ExecOptions {
  env?: Record<string, string>;
  workdir?: string;
  user?: string;
  timeoutSecs?: number;
  stdin?: string;
}

export interface ExecResult {
  exitCode: number;
  stdout: string;
  stderr: string;
  durationSecs: number;
}

export type ExecEvent =
  | { event: "stdout" | "stderr"; data: { data: string; base64?: string } }
  | { event: "exit"; data: { exit_code: number; duration_secs: number } }
  | { event: "error"; data: { error: string; status: number } };

export interface FileInfo {
  name: string;
  path: string;
  type: "file" | "dir" | "symlink" | "fifo" | "socket" | "char" | "block";
  size: number;
  /** Octal permission bits, e.g. "0644". */
  mode: string;
  uid: number;
  gid: number;
  mtime: number;
  link_target: string | null;
}

export interface Files {
  read(path: string): Promise<Uint8Array>;
  readText(path: string): Promise<string>;
  write(path: string, data: string | Uint8Array, options?: { mode?: number }): Promise<FileInfo>;
  list(path?: string): Promise<FileInfo[]>;
  stat(path: string): Promise<FileInfo>;
  mkdir(path: string, options?: { parents?: boolean }): Promise<FileInfo>;
  remove(path: string, options?: { recursive?: boolean }): Promise<{ path: string }>;
}

export interface ProcessStatus {
  id: number;
  name: string | null;
  cmd: string[];
  state: "starting" | "running" | "exited" | "failed";
  /** The process id inside the sandbox. */
  pid: number | null;
  exit_code: number | null;
  error: string | null;
  started_at: string;
  ended_at: string | null;
}

export declare class Process {
  readonly sandbox: Sandbox;
  readonly id: number;
  last: ProcessStatus;
  readonly pid: number | null;
  status(): Promise<ProcessStatus>;
  signal(signal?: string): Promise<ProcessStatus>;
  /** Waits at most timeoutSecs (default 30, at most 600) and returns the status. */
  wait(options?: { timeoutSecs?: number }): Promise<ProcessStatus>;
  output(stream?: "stdout" | "stderr"): Promise<string>;
  follow(options?: { stream?: "stdout" | "stderr" }): AsyncGenerator<ExecEvent | { event: "exit"; data: { exit_code: number | null; state: string } }>;
}

export declare class Sandbox {
  readonly client: Client;
  readonly id: string;
  readonly files: Files;
  /** The info of the last call that returned it. */
  last: SandboxInfo;
  static create(options: CreateOptions): Promise<Sandbox>;
  static get(ref: string, options?: ClientOptions & { client?: Client }): Promise<Sandbox>;
  static list(options?: ClientOptions & { client?: Client; all?: boolean }): Promise<Sandbox[]>;
  static secretNames(options?: ClientOptions & { client?: Client }): Promise<string[]>;
  info(): Promise<SandboxInfo>;
  exec(cmd: string[], options?: ExecOptions): Promise<ExecResult>;
  stream(cmd: string[], options?: ExecOptions): AsyncGenerator<ExecEvent>;
  spawn(cmd: string[], options?: Omit<ExecOptions, "stdin" | "timeoutSecs"> & { name?: string }): Promise<Process>;
  processes(): Promise<Process[]>;
  process(pid: number | string): Promise<Process>;
  snapshot(options?: { register?: string }): Promise<{ image: string; image_id: string; layers: number; size: number }>;
  /** With memory (microVM, named sandboxes) the clone's processes continue from this one's; of
   * a sandbox created with secrets only with withSecrets (its memory holds their values). */
  clone(options?: { name?: string; register?: string; memory?: boolean; withSecrets?: boolean }): Promise<Sandbox>;
  suspend(): Promise<{ seconds: number; memory_snapshot: boolean; note: string | null }>;
  resume(): Promise<{ seconds: number }>;
  terminate(): Promise<SandboxInfo>;
}
