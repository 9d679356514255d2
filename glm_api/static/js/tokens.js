// The tokens view: text, or the current conversation through the chat template, token by token
// from /v1/tokenize (alternating colours, the id on hover) with the count.
import * as api from './api.js';
import { conversationMessages, chatModel } from './chat.js';
import { $, $$, el, showBanner, hideBanner } from './ui.js';

let cards = [];

export function initTokens() {
  $('#tokenize').addEventListener('click', run);
  $('#show-ids').addEventListener('change', () => {
    $('#token-result').classList.toggle('show-ids', $('#show-ids').checked);
  });
  for (const radio of $$('input[name="token-source"]')) radio.addEventListener('change', sourceChanged);
}

export function setTokenModels(list) {
  list = list.filter((c) => c.kind !== 'rerank'); // /v1/tokenize serves chat and embedding models
  cards = list;
  const select = $('#token-model');
  const before = select.value;
  select.replaceChildren(...list.map((c) => el('option', { value: c.id }, `${c.id} (${c.kind})`)));
  if (list.some((c) => c.id === before)) select.value = before;
  sourceChanged();
}

function source() {
  return $('input[name="token-source"]:checked').value;
}

function sourceChanged() {
  const conversation = source() === 'conversation';
  $('#token-text-label').hidden = conversation;
  // The chat template belongs to the chat model: only it can count a conversation.
  for (const option of $('#token-model').options) {
    const card = cards.find((c) => c.id === option.value);
    option.disabled = conversation && card && card.kind === 'embedding';
  }
  if (conversation && chatModel()) $('#token-model').value = chatModel();
}

async function run() {
  const result = $('#token-result');
  const model = $('#token-model').value || undefined;
  let body;
  if (source() === 'conversation') {
    const messages = conversationMessages();
    if (!messages.length) {
      showBanner('The current conversation is empty: write in the chat first, or tokenize text.', 'info');
      return;
    }
    body = { model, messages };
  } else {
    body = { model, prompt: $('#token-text').value };
  }
  const button = $('#tokenize');
  button.disabled = true;
  try {
    const response = await api.postJSON('v1/tokenize', body);
    hideBanner();
    render(result, response);
  } catch (err) {
    showBanner(`Tokenize failed: ${err.message}`);
  } finally {
    button.disabled = false;
  }
}

function render(result, response) {
  const style = tokenStyle(response.token_strs);
  const chips = response.tokens.flatMap((id, i) => {
    const raw = response.token_strs[i] ?? '';
    const shown = display(raw, style);
    const chip = el('span', { class: `token t${i % 4}`, title: `id ${id} · ${JSON.stringify(raw)}`, dataset: { id, index: i } },
      el('span', { class: 'token-text' }, shown.replace(/\n/g, '↵')), el('span', { class: 'token-id' }, String(id)));
    // A token that ends a line ends the row of chips too.
    return shown.endsWith('\n') ? [chip, el('span', { class: 'token-break' })] : [chip];
  });
  result.replaceChildren(
    el('p', { class: 'summary' },
      el('strong', { id: 'token-count', dataset: { count: response.count } }, `${response.count} tokens`),
      ` · ${response.model} · context ${response.max_model_len}`),
    el('div', { class: 'tokens' }, chips),
  );
  result.classList.toggle('show-ids', $('#show-ids').checked);
}

// Token strings as tokenizers spell them -> readable text. Byte-level BPE (GPT-2, Llama 3,
// SmolLM2) maps each byte to a printable character (space -> Ġ, newline -> Ċ); SentencePiece
// writes a space as ▁ and unknown bytes as <0xNN>; WordPiece's ## pieces stay as they are.
const BYTE_OF_CHAR = (() => {
  const printable = [];
  for (let b = 33; b <= 126; b++) printable.push(b);
  for (let b = 161; b <= 172; b++) printable.push(b);
  for (let b = 174; b <= 255; b++) printable.push(b);
  const map = new Map();
  const seen = new Set(printable);
  printable.forEach((b) => map.set(String.fromCodePoint(b), b));
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (!seen.has(b)) {
      map.set(String.fromCodePoint(256 + n), b);
      n++;
    }
  }
  return map;
})();

function tokenStyle(strings) {
  if (strings.some((s) => /[\u0100-\u0143]/.test(s))) return 'byte-level';
  if (strings.some((s) => s.includes('▁'))) return 'sentencepiece';
  return 'plain';
}

const utf8 = new TextDecoder('utf-8', { fatal: true });

function display(raw, style) {
  let text = raw;
  if (style === 'byte-level' && !/^<\|.*\|>$|^<.*>$/.test(raw) && [...raw].every((ch) => BYTE_OF_CHAR.has(ch))) {
    const bytes = Uint8Array.from([...raw], (ch) => BYTE_OF_CHAR.get(ch));
    try {
      text = utf8.decode(bytes);
    } catch {
      text = Array.from(bytes, (b) => `<0x${b.toString(16).toUpperCase().padStart(2, '0')}>`).join('');
    }
  } else if (style === 'sentencepiece') {
    text = raw.replace(/▁/g, ' ');
    if (/^<0x[0-9A-Fa-f]{2}>$/.test(raw)) {
      const byte = parseInt(raw.slice(3, 5), 16);
      if (byte === 10) text = '\n';
      else if (byte === 9) text = '\t';
    }
  }
  return text.replace(/\t/g, '⇥');
}
