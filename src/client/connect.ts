// From a target to a client, in one direction: open the transport and negotiate (negotiate.ts),
// then build the transmission client from the plain result (client.ts). Also the two ways of
// asking about exports without entering transmission (listExports, inspectExport).
import { BASE_ALLOCATION } from "../protocol/constants.ts";
import { NbdClient } from "./client.ts";
import { NbdUsageError } from "./errors.ts";
import { Negotiation } from "./negotiate.ts";
import type { ConnectOptions, ExportInfo, ExportListing, HandshakeStyle } from "./negotiated.ts";
import { parseNbdUri, type NbdTarget } from "./uri.ts";

/** Options of {@link connect}. */
export interface ClientOptions extends ConnectOptions {
  /** Export name; overrides the one in the URI. */
  exportName?: string;
  /** Ask for structured replies (default true; needed for holes, DF and block status). */
  structuredReplies?: boolean;
  /**
   * Ask for extended headers first (NBD_OPT_EXTENDED_HEADERS; default false): 32-byte requests
   * and replies, 64-bit effect lengths for TRIM, WRITE_ZEROES, CACHE and BLOCK_STATUS, and block
   * status filtered by context. They imply structured replies; a server that refuses them gets
   * STRUCTURED_REPLY instead (unless `structuredReplies` is false). See {@link NbdClient.extended}.
   */
  extendedHeaders?: boolean;
  /**
   * Meta contexts to select (default `["base:allocation"]`). Contexts the server does not know are
   * silently not selected; check {@link NbdClient.metaContexts}.
   */
  metaContexts?: readonly string[];
}

/** Accepts a URI string (see {@link parseNbdUri}) or an already parsed target. */
export type Target = string | NbdTarget;

function resolveTarget(target: Target, exportName?: string): NbdTarget {
  const t = typeof target === "string" ? parseNbdUri(target) : { ...target };
  if (exportName !== undefined) t.exportName = exportName;
  return t;
}

/**
 * Connects to an export and completes the handshake: fixed newstyle, EXTENDED_HEADERS (if asked
 * for) or STRUCTURED_REPLY, SET_META_CONTEXT, then GO (with name, description and block-size
 * info), falling back to EXPORT_NAME for servers without GO. Oldstyle servers work too.
 *
 * @throws {NbdUsageError} bad or unsupported URI, or unreadable TLS credentials
 * @throws {NbdDisconnectedError} the connection could not be opened or dropped during the handshake
 * @throws {NbdOptionError} the server refused the export (code "ERR_UNKNOWN" when it does not exist)
 * @throws {NbdTimeoutError} the server did not answer within `connectTimeoutMs`
 */
export async function connect(target: Target, opts: ClientOptions = {}): Promise<NbdClient> {
  const t = resolveTarget(target, opts.exportName);
  const neg = await Negotiation.open(t, opts);
  try {
    if (neg.style === "newstyle-fixed") {
      const chunked = (opts.extendedHeaders === true && (await neg.extendedHeaders())) ||
        (opts.structuredReplies !== false && (await neg.structuredReply()));
      const wanted = opts.metaContexts ?? [BASE_ALLOCATION];
      if (chunked && wanted.length) await neg.setMetaContexts(t.exportName, wanted);
    }
    return new NbdClient(await neg.go(t.exportName), opts);
  } catch (e) {
    await neg.abort();
    throw e;
  }
}

/** One export as reported by {@link listExports}. */
export interface ListedExport extends ExportInfo {
  /** The description from NBD_OPT_LIST (INFO's description, if any, is in `description`). */
  listDescription: string;
  /** Every meta context the server offers for this export (LIST_META_CONTEXT with no query). */
  contexts: string[];
}

/** What a server says about itself and its exports, without entering the transmission phase. */
export interface ServerListing {
  style: HandshakeStyle;
  /** Whether the connection was encrypted (nbds://). */
  tls: boolean;
  structured: boolean;
  exports: ListedExport[];
}

/**
 * Lists every export (NBD_OPT_LIST) and asks NBD_OPT_INFO and LIST_META_CONTEXT about each, on
 * one connection that ends with NBD_OPT_ABORT. Like `nbdinfo --list`.
 */
export async function listExports(target: Target, opts: ConnectOptions = {}): Promise<ServerListing> {
  const t = resolveTarget(target);
  const neg = await Negotiation.open(t, opts);
  try {
    if (neg.style !== "newstyle-fixed") {
      throw new NbdUsageError("UNSUPPORTED", `a ${neg.style} server cannot list its exports`);
    }
    const structured = await neg.structuredReply();
    const exports: ListedExport[] = [];
    for (const l of await neg.list()) exports.push(await describe(neg, l, structured));
    return { style: neg.style, tls: neg.tls, structured, exports };
  } finally {
    await neg.abort();
  }
}

/**
 * Everything about one export (INFO and LIST_META_CONTEXT) without entering transmission; falls
 * back to a full connection for servers without NBD_OPT_INFO. Like `nbdinfo URI`.
 */
export async function inspectExport(target: Target, opts: ConnectOptions & { exportName?: string } = {}): Promise<ServerListing> {
  const t = resolveTarget(target, opts.exportName);
  const neg = await Negotiation.open(t, opts);
  let done = false;
  try {
    if (neg.style !== "newstyle-fixed") {
      const n = await neg.go(t.exportName);
      done = true;
      const c = new NbdClient(n, opts);
      await c.close();
      return { style: neg.style, tls: false, structured: false, exports: [{ ...n.info, listDescription: "", contexts: [] }] };
    }
    const structured = await neg.structuredReply();
    const e = await describe(neg, { name: t.exportName, description: "" }, structured);
    return { style: neg.style, tls: neg.tls, structured, exports: [e] };
  } finally {
    if (!done) await neg.abort();
  }
}

async function describe(neg: Negotiation, l: ExportListing, structured: boolean): Promise<ListedExport> {
  const info = await neg.info(l.name);
  const contexts = structured ? await neg.listMetaContexts(l.name).catch(() => []) : [];
  return { ...info, listDescription: l.description, contexts };
}
