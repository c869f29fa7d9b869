// Types of @tlimage/sdk (src/index.js). The JSON shapes follow the tlimage image schema,
// schema_version 1 (`tl sbx image schema`).

export declare const SCHEMA_VERSION: 1;
export declare const DEFAULT_BASE_IMAGE: "debian-minimal";

/** Where an image or operation was defined. */
export interface SourceLocation {
  readonly file: string;
  readonly line: number;
  readonly column: number;
}

export declare class ImageDefinitionError extends TypeError {
  readonly source: SourceLocation | undefined;
}

export interface ImageInit {
  /** Letters, digits, '.', '_' and '-'; default "default". */
  name?: string;
  /** Default "latest". */
  tag?: string;
  /** A seed base (debian-minimal, ubuntu-minimal), a registered image or scratch; `@digest` pins it. */
  baseImage?: string;
}

/** A RUN mount: "type=cache,target=/root/.cache" or an object. */
export type Mount =
  | string
  | {
      type?: "bind" | "cache" | "secret" | "ssh" | "tmpfs";
      target?: string;
      dst?: string;
      destination?: string;
      [option: string]: string | number | boolean | undefined;
    };

export interface RunOptions {
  /** Environment for this step only. */
  env?: Readonly<Record<string, string | number>>;
  user?: string;
  workdir?: string;
  network?: "default" | "none" | "host";
  mounts?: readonly Mount[];
  /** Rebuild this step even when it is cached. */
  force?: boolean;
}

export interface CopyOptions {
  chown?: string;
  /** "755", "u+x", or a number (0o755). */
  chmod?: string | number;
  /** A registered image to copy from. */
  from?: string;
  link?: boolean;
  parents?: boolean;
  exclude?: string | readonly string[];
  force?: boolean;
}

export interface AddOptions {
  chown?: string;
  chmod?: string | number;
  checksum?: string;
  keepGitDir?: boolean;
  link?: boolean;
  exclude?: string | readonly string[];
  force?: boolean;
}

/** Durations in seconds. */
export interface HealthcheckOptions {
  interval?: number;
  timeout?: number;
  startPeriod?: number;
  startInterval?: number;
  retries?: number;
}

export interface PipInstallOptions {
  indexUrl?: string;
  extraIndexUrl?: string;
  pre?: boolean;
  force?: boolean;
}

export interface AptInstallOptions {
  force?: boolean;
}

export type OperationName =
  | "RUN" | "COPY" | "ADD" | "ENV" | "WORKDIR" | "USER" | "ENTRYPOINT" | "CMD" | "LABEL"
  | "ARG" | "EXPOSE" | "SHELL" | "STOPSIGNAL" | "HEALTHCHECK" | "VOLUME";

/** One operation of the JSON document. */
export interface OperationJSON {
  op: OperationName;
  args: unknown[];
  options?: Record<string, unknown>;
  source?: SourceLocation;
}

/** One image of the JSON document. */
export interface ImageJSON {
  type: "image";
  name: string;
  tag: string;
  base_image: string;
  source?: SourceLocation;
  operations: OperationJSON[];
}

export interface DocumentJSON {
  schema_version: 1;
  images: ImageJSON[];
}

/** An image definition. Immutable: every method returns a new Image. */
export declare class Image {
  constructor(init?: ImageInit);
  readonly name: string;
  readonly tag: string;
  readonly baseImage: string;
  /** The operations so far, as in the JSON document. */
  readonly operations: OperationJSON[];

  /** Shell commands; several run in order in one step (`a && b`). */
  run(commands: string | readonly string[], options?: RunOptions): Image;
  copy(src: string | readonly string[], dest: string, options?: CopyOptions): Image;
  add(src: string | readonly string[], dest: string, options?: AddOptions): Image;
  env(key: string, value: string | number): Image;
  workdir(directory: string): Image;
  user(user: string | number): Image;
  /** An array is the exec form (argv); a string runs through the shell. */
  entrypoint(command: string | readonly string[]): Image;
  /** An array is the exec form (argv); a string runs through the shell. */
  cmd(command: string | readonly string[]): Image;
  label(key: string, value: string | number): Image;
  expose(...ports: Array<number | string>): Image;
  arg(name: string, defaultValue?: string | number): Image;
  shell(argv: readonly [string, ...string[]]): Image;
  stopsignal(signal: string | number): Image;
  /** `null` disables the base image's healthcheck. */
  healthcheck(command: string | readonly string[] | null, options?: HealthcheckOptions): Image;
  volume(...paths: string[]): Image;
  pipInstall(...packages: Array<string | readonly string[]>): Image;
  pipInstall(packages: string | readonly string[], options: PipInstallOptions): Image;
  pipInstall(...args: [...Array<string | readonly string[]>, PipInstallOptions]): Image;
  aptInstall(...packages: Array<string | readonly string[]>): Image;
  aptInstall(...args: [...Array<string | readonly string[]>, AptInstallOptions]): Image;

  /** The image object of the JSON document; `sources` adds each call site. */
  toObject(how?: { sources?: boolean }): ImageJSON;
  toJSON(): ImageJSON;
  toString(): string;
}

/** True for an Image of this SDK or of another copy of it. */
export declare function isImage(value: unknown): value is Image;
export declare function toDocument(images: readonly Image[], how?: { sources?: boolean }): DocumentJSON;
/** Python's shlex.quote / shlex.join. */
export declare function shlexQuote(s: string): string;
export declare function shlexJoin(argv: readonly string[]): string;
