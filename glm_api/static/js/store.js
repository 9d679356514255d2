// What the playground keeps in this browser (localStorage): conversations, settings, presets.
// Nothing here is sent anywhere except as the messages of the user's own requests.

const CONVERSATIONS = 'glm-playground.conversations.v1';
const CURRENT = 'glm-playground.current.v1';
const SETTINGS = 'glm-playground.settings.v1';
const PRESETS = 'glm-playground.presets.v1';

export const EXPORT_FORMAT = 'glm-api-playground';
export const EXPORT_VERSION = 1;
const ROLES = new Set(['system', 'user', 'assistant']);

function read(name, fallback) {
  try {
    const raw = localStorage.getItem(name);
    return raw === null ? fallback : JSON.parse(raw);
  } catch {
    return fallback;
  }
}

function write(name, value) {
  try {
    localStorage.setItem(name, JSON.stringify(value));
  } catch (err) {
    throw new Error(`Could not save in this browser's storage (${err.message}).`);
  }
}

/** A random id; crypto.randomUUID needs a secure context, getRandomValues does not. */
export function newId() {
  const bytes = crypto.getRandomValues(new Uint8Array(12));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

export function loadConversations() {
  const list = read(CONVERSATIONS, []);
  if (!Array.isArray(list)) return [];
  return list.flatMap((item) => {
    try {
      return [normalise(item, { keepId: true })];
    } catch {
      return [];
    }
  });
}

export function saveConversations(list) {
  write(CONVERSATIONS, list);
}

export function loadCurrentId() {
  return localStorage.getItem(CURRENT);
}

export function saveCurrentId(id) {
  if (id) localStorage.setItem(CURRENT, id);
  else localStorage.removeItem(CURRENT);
}

export function loadSettings() {
  const value = read(SETTINGS, {});
  return value && typeof value === 'object' ? value : {};
}

export function saveSettings(settings) {
  write(SETTINGS, settings);
}

export function loadPresets() {
  const value = read(PRESETS, []);
  return Array.isArray(value) ? value.filter((p) => p && typeof p.name === 'string') : [];
}

export function savePresets(presets) {
  write(PRESETS, presets);
}

export function newConversation(system = '') {
  const now = Date.now();
  return { id: newId(), title: '', createdAt: now, updatedAt: now, system, messages: [] };
}

/** A conversation from storage or an import, checked field by field (throws a readable Error). */
export function normalise(item, { keepId }) {
  if (!item || typeof item !== 'object') throw new Error('a conversation must be an object');
  if (!Array.isArray(item.messages)) throw new Error('a conversation needs a "messages" list');
  const messages = item.messages.map((m, i) => {
    if (!m || typeof m !== 'object' || !ROLES.has(m.role) || typeof m.content !== 'string') {
      throw new Error(`messages[${i}] needs a role (user, assistant or system) and a text content`);
    }
    const out = { role: m.role, content: m.content };
    if (m.stats && typeof m.stats === 'object') out.stats = cleanStats(m.stats);
    if (m.stopped === true) out.stopped = true;
    if (typeof m.error === 'string') out.error = m.error;
    return out;
  });
  // An exported system message at the start becomes the conversation's system prompt.
  let system = typeof item.system === 'string' ? item.system : '';
  if (messages.length && messages[0].role === 'system') system = messages.shift().content;
  const now = Date.now();
  return {
    id: keepId && typeof item.id === 'string' && item.id ? item.id : newId(),
    title: typeof item.title === 'string' ? item.title : '',
    createdAt: Number.isFinite(item.createdAt) ? item.createdAt : now,
    updatedAt: Number.isFinite(item.updatedAt) ? item.updatedAt : now,
    system,
    messages: messages.filter((m) => m.role !== 'system'),
  };
}

function cleanStats(stats) {
  const out = {};
  for (const [k, v] of Object.entries(stats)) {
    if (typeof v === 'number' || typeof v === 'string') out[k] = v;
  }
  return out;
}

export function exportPayload(conversations) {
  return {
    format: EXPORT_FORMAT,
    version: EXPORT_VERSION,
    exported_at: new Date().toISOString(),
    conversations,
  };
}

/** Conversations from an exported file: our export, a list of conversations, or one conversation. */
export function parseImport(text) {
  let data;
  try {
    data = JSON.parse(text);
  } catch (err) {
    throw new Error(`The file is not JSON (${err.message}).`);
  }
  let items;
  if (data && data.format === EXPORT_FORMAT) items = data.conversations;
  else if (Array.isArray(data) && data.length && data.every((m) => m && typeof m.role === 'string')) {
    items = [{ messages: data }]; // a bare OpenAI-style messages list
  } else if (Array.isArray(data)) items = data;
  else items = [data];
  if (!Array.isArray(items) || items.length === 0) throw new Error('The file holds no conversations.');
  return items.map((item, i) => {
    try {
      const conversation = normalise(item, { keepId: true });
      if (!conversation.title) {
        const first = conversation.messages.find((m) => m.role === 'user');
        conversation.title = first ? first.content.trim().split('\n')[0].slice(0, 48) : 'Imported chat';
      }
      return conversation;
    } catch (err) {
      throw new Error(`Conversation ${i + 1} in the file: ${err.message}.`);
    }
  });
}
