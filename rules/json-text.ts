/** Parses JSON files strictly, and says where a syntax error is: line, column and what was expected (pure). */
import { parse, printParseErrorCode, type ParseError } from "jsonc-parser";
import { invalid } from "./errors.ts";

const EXPECTED: Record<string, string> = {
  InvalidSymbol: "unexpected text",
  InvalidNumberFormat: "not a number",
  PropertyNameExpected: 'expected a key in double quotes (or a "}" with no comma before it)',
  ValueExpected: "expected a value (a string, number, object, array, true, false or null)",
  ColonExpected: 'expected ":" after the key',
  CommaExpected: 'expected "," between entries',
  CloseBraceExpected: 'expected "}" (or a "," and another key)',
  CloseBracketExpected: 'expected "]" (or a "," and another value)',
  EndOfFileExpected: "unexpected text after the end of the document",
  InvalidCommentToken: "comments are not allowed in JSON",
  UnexpectedEndOfComment: "comments are not allowed in JSON",
  UnexpectedEndOfString: "a string is not closed",
  UnexpectedEndOfNumber: "a number is cut short",
  InvalidUnicode: "an invalid \\u escape",
  InvalidEscapeCharacter: "an invalid escape (\\ followed by a character JSON does not allow)",
  InvalidCharacter: "a control character inside a string",
};

/** 1-based line and column of a character offset. */
export function lineColumn(text: string, offset: number): { line: number; column: number } {
  const before = text.slice(0, offset);
  const lines = before.split("\n");
  return { line: lines.length, column: (lines[lines.length - 1]?.length ?? 0) + 1 };
}

/** The first syntax error in `text`, described with its line and column, or null. */
export function jsonSyntaxError(text: string): string | null {
  const errors: ParseError[] = [];
  parse(text, errors, {
    disallowComments: true,
    allowTrailingComma: false,
    allowEmptyContent: false,
  });
  const first = errors[0];
  if (!first) return null;
  const { line, column } = lineColumn(text, first.offset);
  const found = text.slice(first.offset, first.offset + Math.min(first.length, 20));
  const what = EXPECTED[printParseErrorCode(first.error)] ?? "a syntax error";
  const at = first.offset >= text.length ? "the end of the file" : `line ${line}, column ${column}`;
  return `not valid JSON at ${at}: ${what}${found.trim() ? ` (found ${JSON.stringify(found)})` : ""}`;
}

/** JSON.parse, with a validation error naming the file, line and column when the text is not JSON. */
export function parseJsonText(text: string, file: string): unknown {
  try {
    return JSON.parse(text) as unknown;
  } catch (err) {
    const why = jsonSyntaxError(text) ?? `not valid JSON: ${(err as Error).message}`;
    throw invalid(
      "ERR_EGRESS_JSON",
      `${file} is not valid JSON`,
      [{ where: file, text: why }],
      "fix the JSON syntax at the place shown; JSON has no comments and no comma after the last entry",
    );
  }
}
