// The Prometheus text exposition, parsed strictly for the metrics tests: a line that is neither a
// HELP/TYPE comment nor a well-formed sample fails the test, as does a sample before its TYPE.
import * as assert from "uvu/assert";

export type Sample = { name: string; labels: Record<string, string>; value: number };

export function parseExposition(text: string): Sample[] {
  const samples: Sample[] = [];
  const typed = new Set<string>();
  assert.ok(text.endsWith("\n"), "ends with a newline");
  for (const line of text.slice(0, -1).split("\n")) {
    const c = /^# (HELP|TYPE) ([a-zA-Z_:][a-zA-Z0-9_:]*) (.+)$/.exec(line);
    if (c) {
      if (c[1] === "TYPE") { assert.ok(["counter", "gauge", "histogram"].includes(c[3]!), line); typed.add(c[2]!); }
      continue;
    }
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{((?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\["\\n])*",?)*)\})? (-?[0-9.e+-]+|\+Inf|NaN)$/.exec(line);
    assert.ok(m, `not a valid exposition line: ${JSON.stringify(line)}`);
    const labels: Record<string, string> = {};
    for (const l of (m![2] ?? "").matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]!] = l[2]!;
    const name = m![1]!;
    assert.ok(typed.has(name.replace(/_(bucket|sum|count)$/, "")) || typed.has(name), `sample before its TYPE: ${line}`);
    samples.push({ name, labels, value: Number(m![3]) });
  }
  return samples;
}

/** The samples named `name` whose labels include `labels`. */
export const samplesOf = (s: Sample[], name: string, labels: Record<string, string> = {}) =>
  s.filter((x) => x.name === name && Object.entries(labels).every(([k, v]) => x.labels[k] === v));
