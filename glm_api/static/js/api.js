// The playground's client of the public /v1 API: the API key, readable errors, server-sent events.

const KEY_NAME = 'glm-playground.api-key';

/** The key for this tab: sessionStorage unless the user asked to remember it (localStorage). */
export function getKey() {
  return sessionStorage.getItem(KEY_NAME) || localStorage.getItem(KEY_NAME) || '';
}

export function keyRemembered() {
  return Boolean(localStorage.getItem(KEY_NAME));
}

export function setKey(key, remember) {
  sessionStorage.removeItem(KEY_NAME);
  localStorage.removeItem(KEY_NAME);
  if (key) (remember ? localStorage : sessionStorage).setItem(KEY_NAME, key);
}

export class ApiError extends Error {
  constructor(message, { status = 0, code = null, param = null, retryAfter = null } = {}) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
    this.code = code;
    this.param = param;
    this.retryAfter = retryAfter;
  }
}

let askForKey = null;

/** ``fn(reason) -> Promise<boolean>``: called on a 401; true when the user gave a key to retry with. */
export function onKeyRequired(fn) {
  askForKey = fn;
}

/** fetch() a /v1 path with the key; a 401 asks for a key and retries; other failures throw ApiError.
 * Paths are relative ("v1/models"), so the page also works behind a proxy that serves it under a prefix. */
export async function request(path, { method = 'GET', body, signal } = {}) {
  for (let attempt = 0; ; attempt++) {
    const headers = { Accept: body === undefined ? 'application/json' : 'application/json, text/event-stream' };
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    const key = getKey();
    if (key) headers.Authorization = `Bearer ${key}`;
    let response;
    try {
      response = await fetch(path, {
        method, headers, signal, cache: 'no-store',
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (err) {
      if (err.name === 'AbortError') throw err;
      throw new ApiError(`Cannot reach the server (${err.message}).`);
    }
    if (response.ok) return response;
    const error = await errorOf(response);
    if (response.status === 401 && askForKey && attempt < 5) {
      const reason = key ? `The key was not accepted: ${error.message}` : 'This server needs an API key.';
      if (await askForKey(reason)) continue;
    }
    throw error;
  }
}

export async function getJSON(path, options) {
  return (await request(path, options)).json();
}

export async function postJSON(path, body, options = {}) {
  return (await request(path, { ...options, method: 'POST', body })).json();
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`.trim();
  let code = null;
  let param = null;
  try {
    const data = await response.json();
    if (data && data.error && typeof data.error.message === 'string') {
      ({ message } = data.error);
      code = data.error.code ?? null;
      param = data.error.param ?? null;
    }
  } catch {
    // not JSON: keep the status line
  }
  const retryAfter = response.headers.get('Retry-After');
  if (response.status === 429) {
    const when = retryAfter ? `in ${retryAfter} s` : 'in a moment';
    message = `The server is busy (${message}). Try again ${when}.`;
  } else if (response.status === 503) {
    message = `The server is not ready (${message}).`;
  } else if (param) {
    message = `${message} (${param})`;
  }
  return new ApiError(message, { status: response.status, code, param, retryAfter });
}

/** The JSON payloads of a text/event-stream response, until ``data: [DONE]``. */
export async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let newline;
      while ((newline = buffer.search(/\r\n|\r|\n/)) >= 0) {
        const width = buffer.startsWith('\r\n', newline) ? 2 : 1;
        if (width === 1 && buffer[newline] === '\r' && newline === buffer.length - 1) break; // maybe \r\n split
        const line = buffer.slice(0, newline);
        buffer = buffer.slice(newline + width);
        if (line === '') {
          if (data.length) {
            const payload = data.join('\n');
            data = [];
            if (payload === '[DONE]') return;
            yield JSON.parse(payload);
          }
        } else if (line.startsWith('data:')) {
          data.push(line.slice(line.startsWith('data: ') ? 6 : 5));
        } // comments (": ping") and other fields are ignored
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}
