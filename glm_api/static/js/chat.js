// The chat view: conversations (kept in this browser), streaming answers from
// /v1/chat/completions, Stop, regenerate, edit-and-resend, copy, the settings panel and presets.
import * as api from './api.js';
import * as store from './store.js';
import { renderInto } from './markdown.js';
import { $, el, showBanner, hideBanner, copyText, flash, download } from './ui.js';

const BUILTIN_PRESETS = [
  { name: 'Default', system: '', sampling: {} },
  { name: 'Precise', system: '', sampling: { temperature: 0.2, top_p: 0.9 } },
  { name: 'Creative', system: '', sampling: { temperature: 1.0, top_p: 0.95 } },
  {
    name: 'JSON answers',
    system: 'Answer with one JSON object and nothing else.',
    sampling: { temperature: 0.2, json_mode: true },
  },
];
const NUMBER_FIELDS = ['temperature', 'top_p', 'repetition_penalty'];
const INTEGER_FIELDS = ['max_tokens', 'seed'];

let conversations = [];
let current = null; // the conversation on screen (null: a new one, created by the first message)
let streaming = null; // { controller, conversation, message, body }
let settings = {};
let frame = 0;

export function initChat() {
  conversations = store.loadConversations();
  settings = store.loadSettings();
  const currentId = store.loadCurrentId();
  current = conversations.find((c) => c.id === currentId) || null;
  sortConversations();

  restoreSettingsPanel();
  renderPresets();
  renderAll();

  const prompt = $('#prompt');
  prompt.addEventListener('keydown', (event) => {
    // Enter sends, Shift+Enter adds a line; never while an input method is composing (CJK).
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
      event.preventDefault();
      send();
    } else if (event.key === 'Escape' && streaming) {
      stop();
    }
  });
  $('#send').addEventListener('click', send);
  $('#stop').addEventListener('click', stop);
  $('#new-chat').addEventListener('click', () => {
    current = null;
    store.saveCurrentId(null);
    renderAll();
    prompt.focus();
  });
  $('#export-chat').addEventListener('click', () => exportConversations(current ? [current] : []));
  $('#export-all').addEventListener('click', () => exportConversations(conversations));
  $('#import-chat').addEventListener('click', () => $('#import-file').click());
  $('#import-file').addEventListener('change', importFile);
  $('#system-prompt').addEventListener('input', () => {
    if (current) {
      current.system = $('#system-prompt').value;
      persist();
    }
    settings.system = $('#system-prompt').value;
    store.saveSettings(settings);
  });
  for (const id of [...NUMBER_FIELDS, ...INTEGER_FIELDS, 'stop-seqs', 'json-schema', 'json-mode', 'chat-model']) {
    $(`#${id}`).addEventListener('change', saveSettingsPanel);
  }
  $('#preset').addEventListener('change', () => applyPreset($('#preset').value));
  $('#save-preset').addEventListener('click', savePreset);
  $('#delete-preset').addEventListener('click', deletePreset);
}

/** The chat models from /v1/models fill the picker (the saved choice kept when still loaded). */
export function setChatModels(cards) {
  const select = $('#chat-model');
  const names = cards.filter((c) => c.kind === 'chat').map((c) => c.id);
  select.replaceChildren(...names.map((name) => el('option', { value: name }, name)));
  if (names.includes(settings.model)) select.value = settings.model;
  select.disabled = names.length === 0;
  $('#send').disabled = names.length === 0;
  $('#prompt').placeholder = names.length
    ? 'Message (Enter sends, Shift+Enter adds a line)'
    : 'No chat model is loaded on this server';
}

/** The current conversation as /v1 messages (system prompt first), for the token view. */
export function conversationMessages() {
  const system = current ? current.system : $('#system-prompt').value;
  const messages = [];
  if (system.trim()) messages.push({ role: 'system', content: system });
  for (const m of current ? current.messages : []) {
    if (m.error && !m.content) continue;
    messages.push({ role: m.role, content: m.content });
  }
  return messages;
}

export function chatModel() {
  return $('#chat-model').value || null;
}

// ------------------------------------------------------------------------------------------
// Sending, streaming, stopping

async function send() {
  if (streaming) return;
  const prompt = $('#prompt');
  const text = prompt.value;
  if (!text.trim()) return;
  if (!chatModel()) {
    showBanner('No chat model is loaded on this server.');
    return;
  }
  if (!current) {
    current = store.newConversation($('#system-prompt').value);
    conversations.unshift(current);
    store.saveCurrentId(current.id);
  }
  current.messages.push({ role: 'user', content: text });
  if (!current.title) current.title = titleOf(text);
  prompt.value = '';
  persist();
  await generate(current);
}

function titleOf(text) {
  const line = text.trim().split('\n')[0];
  return line.length > 48 ? `${line.slice(0, 47)}…` : line;
}

function buildRequest(conversation) {
  const messages = [];
  if (conversation.system.trim()) messages.push({ role: 'system', content: conversation.system });
  for (const m of conversation.messages) {
    if (m.error && !m.content) continue; // a failed turn with nothing in it is not part of the chat
    messages.push({ role: m.role, content: m.content });
  }
  return {
    model: chatModel(),
    messages,
    stream: true,
    stream_options: { include_usage: true },
    ...samplingParams(),
  };
}

function samplingParams() {
  const out = {};
  for (const name of NUMBER_FIELDS) {
    const raw = $(`#${name}`).value.trim();
    if (raw === '') continue;
    const value = Number(raw);
    if (!Number.isFinite(value)) throw new Error(`${name} must be a number.`);
    out[name] = value;
  }
  for (const name of INTEGER_FIELDS) {
    const raw = $(`#${name}`).value.trim();
    if (raw === '') continue;
    const value = Number(raw);
    if (!Number.isInteger(value)) throw new Error(`${name} must be a whole number.`);
    out[name] = value;
  }
  const stops = $('#stop-seqs').value.split('\n').filter((s) => s.length > 0);
  if (stops.length) out.stop = stops;
  const schemaText = $('#json-schema').value.trim();
  if (schemaText) {
    let schema;
    try {
      schema = JSON.parse(schemaText);
    } catch (err) {
      throw new Error(`The JSON Schema is not valid JSON (${err.message}).`);
    }
    out.response_format = { type: 'json_schema', json_schema: { name: 'playground', schema, strict: true } };
  } else if ($('#json-mode').checked) {
    out.response_format = { type: 'json_object' };
  }
  return out;
}

async function generate(conversation) {
  let body;
  try {
    body = buildRequest(conversation);
  } catch (err) {
    showBanner(err.message);
    return;
  }
  const message = { role: 'assistant', content: '' };
  conversation.messages.push(message);
  const controller = new AbortController();
  streaming = { controller, conversation, message, body: null };
  hideBanner();
  setBusy(true);
  renderMessages();

  const started = performance.now();
  let first = null;
  let usage = null;
  let finish = null;
  try {
    const response = await api.request('v1/chat/completions', { method: 'POST', body, signal: controller.signal });
    for await (const event of api.events(response)) {
      if (event.error) throw new api.ApiError(event.error.message || 'The stream failed.');
      if (event.usage) usage = event.usage;
      const choice = event.choices && event.choices[0];
      if (!choice) continue;
      const delta = choice.delta && choice.delta.content;
      if (delta) {
        if (first === null) first = performance.now();
        message.content += delta;
        scheduleRender();
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
  } catch (err) {
    if (err.name === 'AbortError') message.stopped = true;
    else message.error = err.message || String(err);
  }
  const ended = performance.now();
  message.stats = statsOf(started, first, ended, usage, finish, body.model);
  cancelAnimationFrame(frame);
  frame = 0;
  streaming = null;
  conversation.updatedAt = Date.now();
  setBusy(false);
  persist();
  renderAll();
}

function statsOf(started, first, ended, usage, finish, model) {
  const stats = { model };
  if (first !== null) stats.ttft_ms = Math.round(first - started);
  if (usage) {
    stats.prompt_tokens = usage.prompt_tokens;
    stats.completion_tokens = usage.completion_tokens;
    stats.cached_tokens = (usage.prompt_tokens_details && usage.prompt_tokens_details.cached_tokens) || 0;
    // Decode speed: the tokens after the first, over the time after the first.
    if (first !== null && usage.completion_tokens > 1 && ended > first) {
      stats.tokens_per_s = Math.round(((usage.completion_tokens - 1) / ((ended - first) / 1000)) * 10) / 10;
    }
  }
  if (finish) stats.finish_reason = finish;
  return stats;
}

function scheduleRender() {
  if (frame) return;
  frame = requestAnimationFrame(() => {
    frame = 0;
    if (!streaming || !streaming.body) return;
    const box = $('#messages');
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
    renderInto(streaming.body, streaming.message.content);
    if (atBottom) box.scrollTop = box.scrollHeight;
  });
}

function stop() {
  if (streaming) streaming.controller.abort();
}

function regenerate() {
  if (streaming || !current) return;
  const last = current.messages[current.messages.length - 1];
  if (last && last.role === 'assistant') current.messages.pop();
  if (!current.messages.length) return;
  generate(current);
}

function setBusy(busy) {
  $('#send').hidden = busy;
  $('#stop').hidden = !busy;
  document.body.classList.toggle('busy', busy);
}

// ------------------------------------------------------------------------------------------
// Rendering

function renderAll() {
  renderList();
  renderMessages();
  $('#system-prompt').value = current ? current.system : settings.system || '';
}

function sortConversations() {
  conversations.sort((a, b) => b.updatedAt - a.updatedAt);
}

function renderList() {
  sortConversations();
  const list = $('#conversation-list');
  list.replaceChildren(...conversations.map((c) => {
    const item = el('li', { class: c === current ? 'active' : '', dataset: { id: c.id } });
    const open = el('button', { type: 'button', class: 'conversation-title', title: c.title || 'New chat' }, c.title || 'New chat');
    open.addEventListener('click', () => select(c));
    const rename = el('button', { type: 'button', class: 'icon small rename', 'aria-label': 'Rename', title: 'Rename' }, '✎');
    rename.addEventListener('click', () => startRename(item, c));
    const remove = el('button', { type: 'button', class: 'icon small delete', 'aria-label': 'Delete', title: 'Delete' }, '✕');
    remove.addEventListener('click', () => confirmDelete(remove, c));
    item.append(open, rename, remove);
    return item;
  }));
}

function select(conversation) {
  current = conversation;
  store.saveCurrentId(conversation.id);
  document.body.classList.remove('show-sidebar');
  renderAll();
}

function startRename(item, conversation) {
  const input = el('input', { type: 'text', class: 'rename-input', 'aria-label': 'New name' });
  input.value = conversation.title;
  let done = false;
  const finish = (save) => {
    if (done) return;
    done = true;
    if (save && input.value.trim()) {
      conversation.title = input.value.trim();
      persist();
    }
    renderList();
  };
  input.addEventListener('keydown', (event) => {
    if (event.key === 'Enter') finish(true);
    else if (event.key === 'Escape') finish(false);
  });
  input.addEventListener('blur', () => finish(true));
  item.replaceChildren(input);
  input.focus();
  input.select();
}

function confirmDelete(button, conversation) {
  if (button.dataset.confirm !== 'yes') {
    button.dataset.confirm = 'yes';
    button.textContent = 'Delete?';
    button.classList.add('danger');
    setTimeout(() => {
      if (button.isConnected) renderList();
    }, 4000);
    return;
  }
  if (streaming && streaming.conversation === conversation) stop();
  conversations = conversations.filter((c) => c !== conversation);
  if (current === conversation) {
    current = null;
    store.saveCurrentId(null);
  }
  persist();
  renderAll();
}

function renderMessages() {
  const box = $('#messages');
  const messages = current ? current.messages : [];
  if (!messages.length) {
    box.replaceChildren(el('div', { id: 'empty-chat', class: 'empty' },
      'Ask the chat model something. Enter sends, Shift+Enter adds a line.'));
    return;
  }
  box.replaceChildren(...messages.map((m, i) => messageNode(current, m, i)));
  box.scrollTop = box.scrollHeight;
}

function messageNode(conversation, message, index) {
  const isStreaming = streaming && streaming.message === message;
  const body = el('div', { class: `message-body${message.role === 'assistant' ? ' markdown' : ''}` });
  if (message.role === 'assistant') {
    renderInto(body, message.content);
    if (!isStreaming) addCodeCopyButtons(body);
  } else {
    body.textContent = message.content;
  }
  const article = el('article', { class: `message ${message.role}`, dataset: { index } });
  const actions = el('div', { class: 'actions' });
  const copy = el('button', { type: 'button', class: 'small copy' }, 'Copy');
  copy.addEventListener('click', async () => flash(copy, (await copyText(message.content)) ? 'Copied' : 'Copy failed'));
  actions.append(copy);
  if (message.role === 'user') {
    const edit = el('button', { type: 'button', class: 'small edit', disabled: Boolean(streaming) }, 'Edit');
    edit.addEventListener('click', () => startEdit(article, body, conversation, index));
    actions.append(edit);
  }
  if (message.role === 'assistant' && index === conversation.messages.length - 1 && !isStreaming) {
    const again = el('button', { type: 'button', class: 'small regenerate', disabled: Boolean(streaming) }, 'Regenerate');
    again.addEventListener('click', regenerate);
    actions.append(again);
  }
  const role = message.role === 'user' ? 'You' : 'Assistant';
  article.append(el('div', { class: 'message-head' }, el('span', { class: 'role' }, role), actions), body);
  if (isStreaming) {
    streaming.body = body;
    article.classList.add('streaming');
  }
  const stats = statsNode(message);
  if (stats) article.append(stats);
  if (message.error) article.append(el('div', { class: 'message-error', role: 'alert' }, message.error));
  return article;
}

function statsNode(message) {
  const s = message.stats;
  if (!s && !message.stopped) return null;
  const parts = [];
  const stat = (name, label) => el('span', { class: 'stat', dataset: { stat: name } }, label);
  if (s && s.ttft_ms !== undefined) parts.push(stat('ttft', `first token ${(s.ttft_ms / 1000).toFixed(2)} s`));
  if (s && s.tokens_per_s !== undefined) parts.push(stat('tokens_per_s', `${s.tokens_per_s.toFixed(1)} tok/s`));
  if (s && s.prompt_tokens !== undefined) parts.push(stat('prompt_tokens', `prompt ${s.prompt_tokens}`));
  if (s && s.completion_tokens !== undefined) parts.push(stat('completion_tokens', `completion ${s.completion_tokens}`));
  if (s && s.cached_tokens !== undefined) parts.push(stat('cached_tokens', `cached ${s.cached_tokens}`));
  if (s && s.finish_reason) parts.push(stat('finish_reason', `finish: ${s.finish_reason}`));
  if (message.stopped) parts.push(stat('stopped', 'stopped'));
  return parts.length ? el('div', { class: 'stats' }, parts) : null;
}

function addCodeCopyButtons(body) {
  for (const pre of body.querySelectorAll('pre')) {
    const button = el('button', { type: 'button', class: 'small code-copy' }, 'Copy');
    button.addEventListener('click', async () => flash(button, (await copyText(pre.querySelector('code')?.textContent ?? pre.textContent)) ? 'Copied' : 'Copy failed'));
    pre.prepend(button);
  }
}

function startEdit(article, body, conversation, index) {
  if (streaming) return;
  const area = el('textarea', { class: 'edit-area', rows: 3, 'aria-label': 'Edit message' });
  area.value = conversation.messages[index].content;
  const save = el('button', { type: 'button', class: 'primary small save-edit' }, 'Save & send');
  const cancel = el('button', { type: 'button', class: 'small cancel-edit' }, 'Cancel');
  const resend = () => {
    const text = area.value;
    if (!text.trim() || streaming) return;
    conversation.messages[index] = { role: 'user', content: text };
    conversation.messages.length = index + 1; // later turns answered the old text
    persist();
    generate(conversation);
  };
  save.addEventListener('click', resend);
  cancel.addEventListener('click', renderMessages);
  area.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
      event.preventDefault();
      resend();
    } else if (event.key === 'Escape') renderMessages();
  });
  body.replaceChildren(area, el('div', { class: 'row end' }, cancel, save));
  area.focus();
}

function persist() {
  try {
    store.saveConversations(conversations);
  } catch (err) {
    showBanner(err.message);
  }
  renderList();
}

// ------------------------------------------------------------------------------------------
// Export / import

function exportConversations(list) {
  if (!list.length) {
    showBanner('Nothing to export yet.', 'info');
    return;
  }
  const stamp = new Date().toISOString().slice(0, 19).replace(/[:T]/g, '-');
  const name = list.length === 1 ? `chat-${stamp}.json` : `chats-${stamp}.json`;
  download(name, JSON.stringify(store.exportPayload(list), null, 2));
}

async function importFile(event) {
  const file = event.target.files && event.target.files[0];
  event.target.value = '';
  if (!file) return;
  try {
    const imported = store.parseImport(await file.text());
    for (const conversation of imported) {
      // An imported id already here: keep both, the import under a new id.
      if (conversations.some((c) => c.id === conversation.id)) conversation.id = store.newId();
      conversations.push(conversation);
    }
    current = imported[0];
    store.saveCurrentId(current.id);
    persist();
    renderAll();
    showBanner(`Imported ${imported.length} conversation${imported.length === 1 ? '' : 's'}.`, 'info');
  } catch (err) {
    showBanner(`Import failed: ${err.message}`);
  }
}

// ------------------------------------------------------------------------------------------
// Settings panel and presets

function restoreSettingsPanel() {
  const sampling = settings.sampling || {};
  for (const name of [...NUMBER_FIELDS, ...INTEGER_FIELDS]) $(`#${name}`).value = sampling[name] ?? '';
  $('#stop-seqs').value = settings.stop || '';
  $('#json-mode').checked = Boolean(settings.json_mode);
  $('#json-schema').value = settings.json_schema || '';
}

function saveSettingsPanel() {
  const sampling = {};
  for (const name of [...NUMBER_FIELDS, ...INTEGER_FIELDS]) {
    const raw = $(`#${name}`).value.trim();
    if (raw !== '') sampling[name] = raw;
  }
  settings.sampling = sampling;
  settings.stop = $('#stop-seqs').value;
  settings.json_mode = $('#json-mode').checked;
  settings.json_schema = $('#json-schema').value;
  if ($('#chat-model').value) settings.model = $('#chat-model').value;
  store.saveSettings(settings);
}

function allPresets() {
  return [...BUILTIN_PRESETS, ...store.loadPresets()];
}

function renderPresets() {
  const select = $('#preset');
  const custom = new Set(store.loadPresets().map((p) => p.name));
  select.replaceChildren(
    el('option', { value: '' }, '(choose)'),
    ...allPresets().map((p) => el('option', { value: p.name }, custom.has(p.name) ? `${p.name} (saved)` : p.name)),
  );
  select.value = '';
}

function applyPreset(name) {
  const preset = allPresets().find((p) => p.name === name);
  if (!preset) return;
  const sampling = preset.sampling || {};
  for (const field of [...NUMBER_FIELDS, ...INTEGER_FIELDS]) $(`#${field}`).value = sampling[field] ?? '';
  $('#stop-seqs').value = (sampling.stop || []).join('\n');
  $('#json-mode').checked = Boolean(sampling.json_mode);
  $('#json-schema').value = sampling.json_schema || '';
  $('#system-prompt').value = preset.system || '';
  $('#system-prompt').dispatchEvent(new Event('input'));
  saveSettingsPanel();
}

function savePreset() {
  const name = (window.prompt('Name for this preset (system prompt and sampling):') || '').trim();
  if (!name) return;
  if (BUILTIN_PRESETS.some((p) => p.name === name)) {
    showBanner(`"${name}" is a built-in preset; choose another name.`);
    return;
  }
  const sampling = {};
  for (const field of [...NUMBER_FIELDS, ...INTEGER_FIELDS]) {
    const raw = $(`#${field}`).value.trim();
    if (raw !== '') sampling[field] = Number(raw);
  }
  const stops = $('#stop-seqs').value.split('\n').filter((s) => s.length);
  if (stops.length) sampling.stop = stops;
  if ($('#json-mode').checked) sampling.json_mode = true;
  if ($('#json-schema').value.trim()) sampling.json_schema = $('#json-schema').value;
  const presets = store.loadPresets().filter((p) => p.name !== name);
  presets.push({ name, system: $('#system-prompt').value, sampling });
  store.savePresets(presets);
  renderPresets();
  $('#preset').value = name;
}

function deletePreset() {
  const name = $('#preset').value;
  const presets = store.loadPresets();
  if (!presets.some((p) => p.name === name)) {
    showBanner('Only saved presets can be deleted.', 'info');
    return;
  }
  store.savePresets(presets.filter((p) => p.name !== name));
  renderPresets();
}
