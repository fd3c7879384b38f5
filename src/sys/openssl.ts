// The system OpenSSL 3 (libssl.so.3, libcrypto.so.3) through bun:ffi, for TLS-PSK (Bun's BoringSSL
// has none): the symbols tls-engine.ts needs, their constants, the error queue as text. Loaded
// like libc.ts (require, so Node never sees bun:ffi); `ossl` is null where the library is missing.
type Ffi = typeof import("bun:ffi");
let ffi: Ffi | null = null;
try {
  ffi = require("bun:ffi") as Ffi;
} catch {
  ffi = null;
}

export const TLS1_2_VERSION = 0x0303;
export const TLS1_3_VERSION = 0x0304;
export const SSL_FILETYPE_PEM = 1;
export const SSL_VERIFY_NONE = 0;
export const SSL_VERIFY_PEER = 0x01;
export const SSL_VERIFY_FAIL_IF_NO_PEER_CERT = 0x02;
export const SSL_ERROR_SSL = 1;
export const SSL_ERROR_WANT_READ = 2;
export const SSL_ERROR_WANT_WRITE = 3;
export const SSL_ERROR_SYSCALL = 5;
export const SSL_ERROR_ZERO_RETURN = 6;
export const SSL_CTRL_SET_TLSEXT_HOSTNAME = 55;
export const SSL_CTRL_SET_DH_AUTO = 118;
export const SSL_CTRL_SET_MIN_PROTO_VERSION = 123;
export const SSL_OP_NO_TICKET = 1 << 14;
export const SSL_OP_CIPHER_SERVER_PREFERENCE = 1 << 22;
export const SSL_OP_NO_RENEGOTIATION = 2 ** 30;
export const X509_FILETYPE_PEM = 1;
export const X509_V_FLAG_CRL_CHECK = 0x4;
export const NID_commonName = 13;

function load(f: Ffi) {
  const T = f.FFIType;
  const P = T.ptr;
  const ssl = f.dlopen("libssl.so.3", {
    TLS_server_method: { args: [], returns: P },
    TLS_client_method: { args: [], returns: P },
    SSL_CTX_new: { args: [P], returns: P },
    SSL_CTX_free: { args: [P], returns: T.void },
    SSL_CTX_ctrl: { args: [P, T.i32, T.i64, P], returns: T.i64_fast },
    SSL_CTX_set_options: { args: [P, T.u64], returns: T.u64_fast },
    SSL_CTX_set_ciphersuites: { args: [P, P], returns: T.i32 },
    SSL_CTX_set_cipher_list: { args: [P, P], returns: T.i32 },
    SSL_CTX_use_certificate_chain_file: { args: [P, P], returns: T.i32 },
    SSL_CTX_use_PrivateKey_file: { args: [P, P, T.i32], returns: T.i32 },
    SSL_CTX_check_private_key: { args: [P], returns: T.i32 },
    SSL_CTX_load_verify_locations: { args: [P, P, P], returns: T.i32 },
    SSL_CTX_set_verify: { args: [P, T.i32, P], returns: T.void },
    SSL_CTX_get_cert_store: { args: [P], returns: P },
    SSL_CTX_set_num_tickets: { args: [P, T.u64], returns: T.i32 },
    SSL_CTX_set_psk_find_session_callback: { args: [P, T.function], returns: T.void },
    SSL_CTX_set_psk_server_callback: { args: [P, T.function], returns: T.void },
    SSL_CTX_set_psk_use_session_callback: { args: [P, T.function], returns: T.void },
    SSL_CTX_set_psk_client_callback: { args: [P, T.function], returns: T.void },
    SSL_new: { args: [P], returns: P },
    SSL_free: { args: [P], returns: T.void },
    SSL_set_bio: { args: [P, P, P], returns: T.void },
    SSL_set_accept_state: { args: [P], returns: T.void },
    SSL_set_connect_state: { args: [P], returns: T.void },
    SSL_ctrl: { args: [P, T.i32, T.i64, P], returns: T.i64_fast },
    SSL_set1_host: { args: [P, P], returns: T.i32 },
    SSL_do_handshake: { args: [P], returns: T.i32 },
    SSL_read: { args: [P, P, T.i32], returns: T.i32 },
    SSL_write: { args: [P, P, T.i32], returns: T.i32 },
    SSL_pending: { args: [P], returns: T.i32 },
    SSL_shutdown: { args: [P], returns: T.i32 },
    SSL_get_error: { args: [P, T.i32], returns: T.i32 },
    SSL_get_verify_result: { args: [P], returns: T.i64_fast },
    SSL_get1_peer_certificate: { args: [P], returns: P },
    SSL_get_current_cipher: { args: [P], returns: P },
    SSL_CIPHER_get_name: { args: [P], returns: T.cstring },
    SSL_get_version: { args: [P], returns: T.cstring },
    SSL_CIPHER_find: { args: [P, P], returns: P },
    SSL_SESSION_new: { args: [], returns: P },
    SSL_SESSION_free: { args: [P], returns: T.void },
    SSL_SESSION_set1_master_key: { args: [P, P, T.u64], returns: T.i32 },
    SSL_SESSION_set_cipher: { args: [P, P], returns: T.i32 },
    SSL_SESSION_set_protocol_version: { args: [P, T.i32], returns: T.i32 },
  }).symbols;
  const crypto = f.dlopen("libcrypto.so.3", {
    BIO_s_mem: { args: [], returns: P },
    BIO_new: { args: [P], returns: P },
    BIO_read: { args: [P, P, T.i32], returns: T.i32 },
    BIO_write: { args: [P, P, T.i32], returns: T.i32 },
    BIO_ctrl_pending: { args: [P], returns: T.u64_fast },
    BIO_new_bio_pair: { args: [P, T.u64, P, T.u64], returns: T.i32 },
    BIO_nread0: { args: [P, P], returns: T.i32 },
    BIO_nread: { args: [P, P, T.i32], returns: T.i32 },
    BIO_free: { args: [P], returns: T.i32 },
    ERR_get_error: { args: [], returns: T.u64_fast },
    ERR_error_string_n: { args: [T.u64, P, T.u64], returns: T.void },
    ERR_clear_error: { args: [], returns: T.void },
    X509_free: { args: [P], returns: T.void },
    X509_get_subject_name: { args: [P], returns: P },
    X509_NAME_get_text_by_NID: { args: [P, T.i32, P, T.i32], returns: T.i32 },
    X509_verify_cert_error_string: { args: [T.i64], returns: T.cstring },
    X509_STORE_add_lookup: { args: [P, P], returns: P },
    X509_LOOKUP_file: { args: [], returns: P },
    X509_load_cert_crl_file: { args: [P, P, T.i32], returns: T.i32 },
    X509_STORE_set_flags: { args: [P, T.u64], returns: T.i32 },
  }).symbols;
  return { ...ssl, ...crypto };
}

export type Ossl = ReturnType<typeof load>;

let lib: Ossl | null = null;
let loadError = "bun:ffi is not available (not running under Bun)";
if (ffi) {
  try {
    lib = load(ffi);
  } catch (e) {
    loadError = `cannot load the system OpenSSL 3 (libssl.so.3): ${(e as Error).message}`;
  }
}

/** The OpenSSL symbols, or null where libssl.so.3 cannot be loaded. */
export const ossl: Ossl | null = lib;
/** Why `ossl` is null (for an error message). */
export const opensslUnavailable = (): string => loadError;
/** bun:ffi helpers (present whenever `ossl` is). */
export const ffiApi: Ffi | null = ffi;

/** A NUL-terminated copy of `s` for a `const char *` argument (keep it referenced during the call). */
export function cstr(s: string): Buffer {
  return Buffer.from(`${s}\0`, "utf8");
}

const errBuf = Buffer.alloc(256);

/** Empties OpenSSL's (per-thread) error queue and returns its reasons, oldest first. */
export function takeErrors(): string[] {
  const o = lib!;
  const out: string[] = [];
  for (;;) {
    const e = o.ERR_get_error();
    if (!e) return out;
    errBuf.fill(0);
    o.ERR_error_string_n(e, ffi!.ptr(errBuf), errBuf.length);
    const text = errBuf.toString("utf8", 0, errBuf.indexOf(0));
    // "error:0A000086:SSL routines::certificate verify failed" -> "certificate verify failed"
    out.push(text.slice(text.lastIndexOf(":") + 1) || text);
  }
}

/** Throws an Error naming what failed and OpenSSL's reasons. */
export function fail(what: string): never {
  const reasons = takeErrors();
  throw new Error(`${what}${reasons.length ? `: ${reasons.join("; ")}` : ""}`);
}
