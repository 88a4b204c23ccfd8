/**
 * The one error type users see. `code` is stable (ERR_EGRESS_...), `message`
 * names the offending value and where it came from, `hint` says what to do.
 * `exitCode` follows SPEC §4: 2 usage/validation, 3 the system refused, 4 internal.
 */
export interface Problem {
  /** Where the problem is: a file, a JSON path, an argument. */
  where: string;
  /** What was wrong and what was expected. */
  text: string;
}

export type ExitCode = 0 | 1 | 2 | 3 | 4;

export class EgressError extends Error {
  readonly code: string;
  readonly hint: string | undefined;
  readonly exitCode: ExitCode;
  readonly problems: readonly Problem[];
  readonly details: Record<string, unknown> | undefined;

  constructor(
    code: string,
    message: string,
    opts: {
      hint?: string;
      exitCode?: ExitCode;
      problems?: readonly Problem[];
      details?: Record<string, unknown>;
      cause?: unknown;
    } = {},
  ) {
    super(message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.name = "EgressError";
    this.code = code;
    this.hint = opts.hint;
    this.exitCode = opts.exitCode ?? 2;
    this.problems = opts.problems ?? [];
    this.details = opts.details;
  }

  /** Structured form for `--json` output and daemon logs. */
  toJSON(): Record<string, unknown> {
    return {
      code: this.code,
      message: this.message,
      ...(this.hint ? { hint: this.hint } : {}),
      ...(this.problems.length ? { problems: this.problems } : {}),
      ...(this.details ? { details: this.details } : {}),
    };
  }
}

/** A validation error (exit 2) that lists every problem found. */
export function invalid(
  code: string,
  message: string,
  problems: readonly Problem[],
  hint?: string,
): EgressError {
  return new EgressError(code, message, { problems, exitCode: 2, ...(hint ? { hint } : {}) });
}
