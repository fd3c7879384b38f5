import type { ModeReport, RunOptions } from "./run.ts";
export async function fuzzSocket(o: RunOptions): Promise<ModeReport> { return { mode: "socket", inputs: 0, seconds: 0 }; }
