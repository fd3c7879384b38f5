// Where things sit in a TOML document: Bun.TOML.parse gives values without positions, so error
// messages find the line of each key ("server.listen", "export.1.name") and of each table header
// ("export.1") by scanning the text, and the line of a syntax error by parsing growing prefixes.

/** Key path -> 1-based line. Array tables are numbered from 0: "export.0", "export.0.name". */
export type KeyLines = ReadonlyMap<string, number>;

/**
 * Scan `text` for table headers and `key = value` lines (values may span lines: arrays, inline
 * tables, multi-line strings). Keys inside inline tables are not recorded; their table's key is.
 */
export function keyLines(text: string): KeyLines {
  const out = new Map<string, number>();
  const arrays = new Map<string, number>(); // array-table path -> index of its last element
  const lines = text.split(/\r?\n/);
  let table = "";
  let cont: ValueState | null = null;
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i]!;
    if (cont !== null) {
      cont = scanValue(line, 0, cont);
      if (cont.depth === 0 && cont.multi === null) cont = null;
      continue;
    }
    const s = line.trimStart();
    if (s === "" || s.startsWith("#")) continue;
    if (s.startsWith("[")) {
      const isArray = s.startsWith("[[");
      const key = parseKey(s, isArray ? 2 : 1);
      if (key === null) continue;
      const path = resolvePath(key.parts, arrays);
      if (isArray) {
        const n = (arrays.get(path) ?? -1) + 1;
        arrays.set(path, n);
        table = `${path}.${n}`;
      } else {
        table = path;
      }
      if (!out.has(table)) out.set(table, i + 1);
      continue;
    }
    const key = parseKey(s, 0);
    if (key === null) continue;
    const eq = s.indexOf("=", key.end);
    if (eq < 0) continue;
    const full = table === "" ? key.parts.join(".") : `${table}.${key.parts.join(".")}`;
    if (!out.has(full)) out.set(full, i + 1);
    const st = scanValue(s, eq + 1, { depth: 0, multi: null });
    if (st.depth > 0 || st.multi !== null) cont = st;
  }
  return out;
}

/** A dotted table path with array tables resolved to their current element ("export.sub" -> "export.2.sub"). */
function resolvePath(parts: string[], arrays: Map<string, number>): string {
  let p = "";
  for (let k = 0; k < parts.length; k++) {
    p = p === "" ? parts[k]! : `${p}.${parts[k]}`;
    const n = arrays.get(p);
    if (n !== undefined && k < parts.length - 1) p = `${p}.${n}`;
  }
  return p;
}

/** Parse a (dotted, possibly quoted) key starting at `from`; `end` is just past it. */
function parseKey(s: string, from: number): { parts: string[]; end: number } | null {
  const parts: string[] = [];
  let i = from;
  for (;;) {
    while (s[i] === " " || s[i] === "\t") i++;
    const c = s[i];
    if (c === '"' || c === "'") {
      let j = i + 1;
      let v = "";
      while (j < s.length && s[j] !== c) {
        if (c === '"' && s[j] === "\\" && j + 1 < s.length) { v += s[j + 1]; j += 2; continue; }
        v += s[j++];
      }
      if (j >= s.length) return null;
      parts.push(v);
      i = j + 1;
    } else {
      const m = /^[A-Za-z0-9_-]+/.exec(s.slice(i));
      if (!m) return null;
      parts.push(m[0]);
      i += m[0].length;
    }
    while (s[i] === " " || s[i] === "\t") i++;
    if (s[i] !== ".") return { parts, end: i };
    i++;
  }
}

interface ValueState {
  /** Open [ and { brackets. */
  depth: number;
  /** Inside a multi-line string opened with this delimiter. */
  multi: '"""' | "'''" | null;
}

/** Scan a value from `from` to the end of the line, tracking strings, brackets and comments. */
function scanValue(s: string, from: number, st: ValueState): ValueState {
  let { depth, multi } = st;
  let i = from;
  while (i < s.length) {
    if (multi !== null) {
      const j = s.indexOf(multi, i);
      if (j < 0) return { depth, multi };
      if (multi === '"""' && isEscaped(s, j)) { i = j + 1; continue; }
      i = j + 3;
      while (s[i] === multi[0]) i++; // up to two quotes may end the string's content
      multi = null;
      continue;
    }
    const c = s[i]!;
    if (c === "#") break;
    if (s.startsWith('"""', i) || s.startsWith("'''", i)) { multi = s.slice(i, i + 3) as '"""' | "'''"; i += 3; continue; }
    if (c === '"' || c === "'") {
      let j = i + 1;
      while (j < s.length && s[j] !== c) j += c === '"' && s[j] === "\\" ? 2 : 1;
      i = j + 1;
      continue;
    }
    if (c === "[" || c === "{") depth++;
    else if ((c === "]" || c === "}") && depth > 0) depth--;
    i++;
  }
  return { depth, multi };
}

function isEscaped(s: string, j: number): boolean {
  let n = 0;
  while (j - 1 - n >= 0 && s[j - 1 - n] === "\\") n++;
  return n % 2 === 1;
}

/**
 * The line of a syntax error: the one after the longest prefix of whole lines that still parses
 * (a prefix that ends inside a multi-line value fails too, so the search starts from the end).
 */
export function syntaxErrorLine(text: string, parse: (t: string) => unknown): number {
  const lines = text.split(/\r?\n/);
  for (let k = lines.length - 1; k >= 0; k--) {
    try {
      parse(lines.slice(0, k).join("\n"));
      return k + 1;
    } catch { /* the error is at or before line k */ }
  }
  return 1;
}
