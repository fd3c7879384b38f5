// The layering of src/, checked from the source text: no import cycle anywhere; src/protocol and
// src/inspect are pure (import only themselves, no bun/node modules), so is src/config (node:path
// aside); only src/sys loads bun:ffi; only src/server and src/client open sockets; the client stands
// apart from server and devices; the CLI holds no protocol constants. Fails with the offending file
// and import, so a broken rule names its fix.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { existsSync, readdirSync, readFileSync, statSync } from "node:fs";
import { dirname, join, relative, resolve } from "node:path";

const root = resolve(import.meta.dir, "..");
const src = join(root, "src");

function walk(dir: string, out: string[] = []): string[] {
  for (const e of readdirSync(dir)) {
    const p = join(dir, e);
    if (statSync(p).isDirectory()) walk(p, out);
    else if (p.endsWith(".ts")) out.push(p);
  }
  return out;
}

interface Import { spec: string; target: string | null; typeOnly: boolean; line: number }

/** Every import/export-from/dynamic import/require of a file, resolved to a src file when relative. */
function importsOf(file: string, text: string): Import[] {
  const out: Import[] = [];
  const code = text.replace(/\/\*[\s\S]*?\*\//g, (m) => m.replace(/[^\n]/g, " "));
  const lines = code.split("\n");
  const patterns = [
    /^\s*(import|export)\s+(type\s+)?[^'";]*?from\s+["']([^"']+)["']/,
    /^\s*import\s+["']([^"']+)["']/,
  ];
  // Static imports may span lines: join each statement first.
  for (let i = 0; i < lines.length; i++) {
    const l = lines[i]!;
    if (/^\s*(import|export)\b/.test(l) && !/["'];?\s*$/.test(l) && /\{\s*$|,\s*$/.test(l)) {
      let j = i, stmt = l;
      while (j + 1 < lines.length && !/from\s+["'][^"']+["']/.test(stmt)) stmt += " " + lines[++j]!;
      lines[i] = stmt;
      for (let k = i + 1; k <= j; k++) lines[k] = "";
    }
  }
  lines.forEach((l, idx) => {
    if (/^\s*\/\//.test(l)) return;
    let m = patterns[0]!.exec(l);
    if (m) out.push(mk(m[3]!, !!m[2], idx + 1));
    else if ((m = patterns[1]!.exec(l))) out.push(mk(m[1]!, false, idx + 1));
    for (const d of l.matchAll(/\b(?:import|require)\(\s*["']([^"']+)["']\s*\)/g)) out.push(mk(d[1]!, false, idx + 1));
  });
  return out;
  function mk(spec: string, typeOnly: boolean, line: number): Import {
    const target = spec.startsWith(".") ? resolve(dirname(file), spec) : null;
    return { spec, target, typeOnly, line };
  }
}

const files = walk(src);
const texts = new Map(files.map((f) => [f, readFileSync(f, "utf8")]));
const graph = new Map(files.map((f) => [f, importsOf(f, texts.get(f)!)]));
const rel = (f: string) => relative(root, f);
const layer = (f: string) => relative(src, f).split("/")[0]!;

test("every relative import resolves to an existing file", () => {
  const bad: string[] = [];
  for (const [f, imps] of graph) {
    for (const i of imps) if (i.target && !existsSync(i.target)) bad.push(`${rel(f)}:${i.line} imports ${i.spec}`);
  }
  assert.equal(bad, []);
});

test("no import cycle under src/ (type-only imports included)", () => {
  const state = new Map<string, 1 | 2>();
  const cycles: string[] = [];
  const stack: string[] = [];
  const visit = (f: string) => {
    state.set(f, 1);
    stack.push(f);
    for (const i of graph.get(f) ?? []) {
      if (!i.target || !texts.has(i.target)) continue;
      const s = state.get(i.target);
      if (s === 1) cycles.push([...stack.slice(stack.indexOf(i.target)), i.target].map(rel).join(" -> "));
      else if (s === undefined) visit(i.target);
    }
    stack.pop();
    state.set(f, 2);
  };
  for (const f of files) if (!state.has(f)) visit(f);
  assert.equal(cycles, [], `import cycles:\n${cycles.join("\n")}`);
});

// src/protocol (the codec) and src/inspect (image parsers over a byte source) are pure
for (const pure of ["protocol", "inspect"]) {
  test(`src/${pure} is pure: imports only itself, no bun or node modules`, () => {
    const bad: string[] = [];
    for (const [f, imps] of graph) {
      if (layer(f) !== pure) continue;
      for (const i of imps) {
        if (!i.target || layer(i.target) !== pure) bad.push(`${rel(f)}:${i.line} imports ${i.spec}`);
      }
    }
    assert.equal(bad, []);
  });
}

test("src/config is pure: imports only itself and node:path (a probe stands in for the file system)", () => {
  const bad: string[] = [];
  for (const [f, imps] of graph) {
    if (layer(f) !== "config") continue;
    for (const i of imps) {
      if (i.target ? layer(i.target) !== "config" : i.spec !== "node:path") bad.push(`${rel(f)}:${i.line} imports ${i.spec}`);
    }
  }
  assert.equal(bad, []);
});

test("src/sys sits below everything: it imports nothing from the other layers", () => {
  const bad: string[] = [];
  for (const [f, imps] of graph) {
    if (layer(f) !== "sys") continue;
    for (const i of imps) if (i.target && layer(i.target) !== "sys") bad.push(`${rel(f)}:${i.line} imports ${i.spec}`);
  }
  assert.equal(bad, []);
});

test("only src/sys loads bun:ffi", () => {
  const bad: string[] = [];
  for (const [f, imps] of graph) {
    if (layer(f) === "sys") continue;
    for (const i of imps) if (i.spec === "bun:ffi") bad.push(`${rel(f)}:${i.line}`);
  }
  assert.equal(bad, []);
});

test("only src/server and src/client open sockets", () => {
  const socketApis = /\b(Bun\.listen|Bun\.connect|Bun\.udpSocket|createServer|createConnection|upgradeTLS)\s*\(|\bnet\.connect\s*\(|from\s+["']node:(net|tls|dgram)["']/;
  const bad: string[] = [];
  for (const f of files) {
    if (["server", "client"].includes(layer(f))) continue;
    const lines = texts.get(f)!.split("\n");
    lines.forEach((l, i) => {
      if (!/^\s*\/\//.test(l) && socketApis.test(l)) bad.push(`${rel(f)}:${i + 1}: ${l.trim()}`);
    });
  }
  assert.equal(bad, []);
});

test("src/client imports nothing from src/server or src/devices", () => {
  const bad: string[] = [];
  for (const [f, imps] of graph) {
    if (layer(f) !== "client") continue;
    for (const i of imps) {
      if (i.target && ["server", "devices", "cli"].includes(layer(i.target))) bad.push(`${rel(f)}:${i.line} imports ${i.spec}`);
    }
  }
  assert.equal(bad, []);
});

test("src/devices and src/server never import the CLI; devices never import the server", () => {
  const bad: string[] = [];
  for (const [f, imps] of graph) {
    const l = layer(f);
    for (const i of imps) {
      if (!i.target) continue;
      const t = layer(i.target);
      if ((l !== "cli" && !l.endsWith(".ts") && t === "cli") || (l === "devices" && t === "server")) {
        bad.push(`${rel(f)}:${i.line} imports ${i.spec}`);
      }
    }
  }
  assert.equal(bad, []);
});

test("src/cli holds no protocol constants (no NBD_* definitions or magic numbers)", () => {
  const bad: string[] = [];
  for (const f of files) {
    if (layer(f) !== "cli") continue;
    texts.get(f)!.split("\n").forEach((l, i) => {
      if (/\b(const|let|var)\s+NBD_[A-Z0-9_]+\s*=/.test(l) || /0x(49484156454f5054|4e42444d41474943|25609513|67446698|668e33ef)/i.test(l)) {
        bad.push(`${rel(f)}:${i + 1}: ${l.trim()}`);
      }
    });
  }
  assert.equal(bad, []);
});

test("the checker sees the known edges (guards against a parser that finds nothing)", () => {
  const edges = [...graph.values()].reduce((n, imps) => n + imps.filter((i) => i.target).length, 0);
  assert.ok(edges > 50, `only ${edges} relative imports found`);
  const cli = files.find((f) => rel(f) === "src/cli.ts");
  assert.ok(cli && graph.get(cli)!.length > 0, "src/cli.ts imports something");
});

test.run();
