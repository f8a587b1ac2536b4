/**
 * The modules of the Node client and of the OpenClaw plugin import one another without a circle.
 *
 * A circle makes the load order decide which module sees the other half-initialised, and it means two
 * modules cannot be read (or changed) apart. Type-only imports count too: they are erased at run time, but
 * they still say that one module's meaning depends on the other's. The generated wire code is left out.
 */

import assert from "node:assert/strict";
import { existsSync, readFileSync, readdirSync } from "node:fs";
import { dirname, join, relative, resolve } from "node:path";
import { describe, test } from "node:test";
import { PACKAGE_DIR, ROOT } from "./support.ts";

const SOURCES = [join(PACKAGE_DIR, "src"), join(ROOT, "clients", "openclaw", "src")];

// Import and re-export statements (also multi-line and type-only ones), side-effect imports, and dynamic imports
// of a literal: every form the sources use. Anchored at a line start, so that prose about imports is not read as one
// (a line that starts like an import statement is read as one, which can only find a cycle, never hide one).
const STATIC_IMPORT = new RegExp(
  String.raw`^\s*(?:import|export)\s+(?:type\s+)?(?:[\w$]+\s*,?\s*)?(?:\*\s*as\s+[\w$]+|\{[^}]*\}|\*)?` +
    String.raw`\s*from\s*["']([^"']+)["']`,
  "gm",
);
const BARE_IMPORT = /^\s*import\s*["']([^"']+)["']/gm;
const DYNAMIC_IMPORT = /\bimport\(\s*["']([^"']+)["']\s*\)/g;

/** The specifiers `source` imports, in the order they appear. */
export function specifiers(source: string): string[] {
  const found: { at: number; name: string }[] = [];
  for (const pattern of [STATIC_IMPORT, BARE_IMPORT, DYNAMIC_IMPORT]) {
    for (const match of source.matchAll(pattern)) {
      found.push({ at: match.index, name: match[1] ?? "" });
    }
  }
  return found.sort((a, b) => a.at - b.at).map((entry) => entry.name);
}

function sourceFiles(dir: string): string[] {
  return readdirSync(dir, { recursive: true, withFileTypes: true })
    .filter((entry) => entry.isFile() && entry.name.endsWith(".ts"))
    .map((entry) => join(entry.parentPath, entry.name))
    .filter((path) => !relative(dir, path).split(/[\\/]/).includes("generated"))
    .sort();
}

/** file -> the files among `files` it imports by a relative path. */
function importGraph(files: readonly string[]): Map<string, string[]> {
  const known = new Set(files);
  const graph = new Map<string, string[]>();
  for (const file of files) {
    const targets = specifiers(readFileSync(file, "utf8"))
      .filter((name) => name.startsWith("."))
      .map((name) => resolve(dirname(file), name));
    for (const target of targets) {
      assert.ok(existsSync(target), `${relative(ROOT, file)} imports ${relative(ROOT, target)}, which does not exist`);
    }
    graph.set(file, targets.filter((target) => known.has(target)));
  }
  return graph;
}

/** One cycle per strongly connected component that has one (Tarjan's algorithm), each as a path back to its start. */
export function cycles(graph: ReadonlyMap<string, readonly string[]>): string[][] {
  const index = new Map<string, number>();
  const low = new Map<string, number>();
  const stack: string[] = [];
  const onStack = new Set<string>();
  const found: string[][] = [];
  const visit = (node: string): void => {
    index.set(node, index.size);
    low.set(node, index.get(node) ?? 0);
    stack.push(node);
    onStack.add(node);
    for (const next of graph.get(node) ?? []) {
      if (!index.has(next)) {
        visit(next);
        low.set(node, Math.min(low.get(node) ?? 0, low.get(next) ?? 0));
      } else if (onStack.has(next)) {
        low.set(node, Math.min(low.get(node) ?? 0, index.get(next) ?? 0));
      }
    }
    if (low.get(node) !== index.get(node)) {
      return;
    }
    const component = new Set<string>();
    for (let member = stack.pop(); member !== undefined; member = stack.pop()) {
      onStack.delete(member);
      component.add(member);
      if (member === node) break;
    }
    if (component.size > 1 || (graph.get(node) ?? []).includes(node)) {
      found.push(pathBack(graph, node, component));
    }
  };
  for (const node of graph.keys()) {
    if (!index.has(node)) visit(node);
  }
  return found;
}

/** The shortest path from `start` back to itself inside `component` (breadth first). */
function pathBack(
  graph: ReadonlyMap<string, readonly string[]>,
  start: string,
  component: ReadonlySet<string>,
): string[] {
  const cameFrom = new Map<string, string>();
  const queue = [start];
  for (let at = 0; at < queue.length; at++) {
    const node = queue[at] ?? start;
    for (const next of graph.get(node) ?? []) {
      if (next === start) {
        const path = [start];
        for (let step: string | undefined = node; step !== start && step !== undefined; step = cameFrom.get(step)) {
          path.splice(1, 0, step);
        }
        return [...path, start];
      }
      if (component.has(next) && !cameFrom.has(next)) {
        cameFrom.set(next, node);
        queue.push(next);
      }
    }
  }
  return [start, start];
}

describe("module imports", () => {
  test("the import reader finds every form of import the sources use", () => {
    const source = [
      'import assert from "node:assert";',
      'import * as pb from "./generated/x.ts";',
      "import {",
      "  type A,",
      "  b,",
      '} from "./a.ts";',
      'import type { C } from "./c.ts";',
      'export { d, type E } from "./d.ts";',
      'export * from "./f.ts";',
      'export type * from "./g.ts";',
      'import "./side.ts";',
      'const later = await import("./lazy.ts");',
      '// a comment that says: import it from "./not-an-import.ts"',
      'const text = "unix://not/an/import";',
    ].join("\n");
    assert.deepEqual(specifiers(source), [
      "node:assert",
      "./generated/x.ts",
      "./a.ts",
      "./c.ts",
      "./d.ts",
      "./f.ts",
      "./g.ts",
      "./side.ts",
      "./lazy.ts",
    ]);
  });

  test("the cycle finder names each cycle as a path back to its start", () => {
    const graph = new Map([
      ["a", ["b"]],
      ["b", ["c"]],
      ["c", ["a"]],
      ["d", ["d"]],
      ["e", ["a"]],
    ]);
    assert.deepEqual(cycles(graph), [
      ["a", "b", "c", "a"],
      ["d", "d"],
    ]);
  });

  test("no module of the Node client or the OpenClaw plugin imports itself through others", () => {
    const files = SOURCES.flatMap(sourceFiles);
    assert.ok(files.length > 2, `no sources found in ${SOURCES.join(", ")}`);
    const found = cycles(importGraph(files)).map((cycle) => cycle.map((file) => relative(ROOT, file)).join(" -> "));
    assert.deepEqual(found, [], `import cycles:\n${found.join("\n")}`);
  });
});
