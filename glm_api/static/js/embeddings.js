// The embeddings view: one /v1/embeddings request for the lines (and the query), then the
// cosine-similarity matrix as a heatmap with its numbers, and the lines ranked by the query.
import * as api from './api.js';
import { $, el, showBanner, hideBanner } from './ui.js';

export function initEmbeddings() {
  $('#embed').addEventListener('click', run);
  $('#embedding-query').addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.isComposing) run();
  });
}

export function setEmbeddingModels(cards) {
  const select = $('#embedding-model');
  const before = select.value;
  const names = cards.filter((c) => c.kind === 'embedding');
  select.replaceChildren(...names.map((c) => el('option', { value: c.id }, c.dimensions ? `${c.id} (${c.dimensions}-d)` : c.id)));
  if (names.some((c) => c.id === before)) select.value = before;
  select.disabled = names.length === 0;
  $('#embed').disabled = names.length === 0;
}

export function cosine(a, b) {
  let dot = 0;
  let na = 0;
  let nb = 0;
  for (let i = 0; i < a.length; i++) {
    dot += a[i] * b[i];
    na += a[i] * a[i];
    nb += b[i] * b[i];
  }
  return na && nb ? dot / Math.sqrt(na * nb) : 0;
}

async function run() {
  const lines = $('#embedding-lines').value.split('\n').map((s) => s.trim()).filter((s) => s.length);
  const query = $('#embedding-query').value.trim();
  const result = $('#embedding-result');
  if (!lines.length) {
    showBanner('Write at least one line to embed.', 'info');
    return;
  }
  const model = $('#embedding-model').value || undefined;
  const button = $('#embed');
  button.disabled = true;
  result.setAttribute('aria-busy', 'true');
  try {
    const input = query ? [...lines, query] : lines;
    const response = await api.postJSON('v1/embeddings', { model, input, encoding_format: 'float' });
    const vectors = response.data.slice().sort((a, b) => a.index - b.index).map((d) => d.embedding);
    hideBanner();
    render(result, response, lines, query, vectors);
  } catch (err) {
    showBanner(`Embeddings failed: ${err.message}`);
  } finally {
    button.disabled = false;
    result.removeAttribute('aria-busy');
  }
}

function render(result, response, lines, query, vectors) {
  const dims = vectors.length ? vectors[0].length : 0;
  const summary = el('p', { class: 'summary' },
    el('span', { dataset: { stat: 'model' } }, response.model), ' · ',
    el('span', { dataset: { stat: 'dimensions' } }, `${dims} dimensions`), ' · ',
    el('span', { dataset: { stat: 'tokens' } }, `${response.usage.total_tokens} tokens`), ' · ',
    `${lines.length} line${lines.length === 1 ? '' : 's'}`);

  const head = el('tr', {}, el('th', { scope: 'col' }, ''), ...lines.map((line, j) => el('th', { scope: 'col', title: line }, String(j + 1))));
  const rows = lines.map((line, i) => el('tr', {},
    el('th', { scope: 'row', class: 'line-label', title: line }, `${i + 1}. ${line}`),
    ...lines.map((_, j) => heatCell(cosine(vectors[i], vectors[j]), i, j))));
  const table = el('table', { class: 'heatmap', id: 'similarity-matrix' }, el('thead', {}, head), el('tbody', {}, rows));
  const parts = [summary, el('h3', {}, 'Cosine similarity'), el('div', { class: 'table-scroll' }, table)];

  if (query) {
    const q = vectors[lines.length];
    const ranked = lines.map((line, i) => ({ line, i, score: cosine(q, vectors[i]) })).sort((a, b) => b.score - a.score);
    const list = el('ol', { class: 'ranking', id: 'ranking' }, ranked.map((r) => {
      const bar = el('span', { class: 'bar' });
      bar.style.setProperty('--v', Math.max(0, r.score).toFixed(4));
      return el('li', { dataset: { index: r.i, value: r.score } },
        el('span', { class: 'score' }, r.score.toFixed(3)), bar, el('span', { class: 'text' }, r.line));
    }));
    parts.push(el('h3', {}, 'Ranked by the query: ', el('q', {}, query)), list);
  }
  result.replaceChildren(...parts);
}

function heatCell(value, i, j) {
  const cell = el('td', { class: 'cell', title: `${i + 1} · ${j + 1}: ${value.toFixed(6)}`, dataset: { row: i, col: j, value } },
    value.toFixed(3));
  cell.style.setProperty('--v', Math.max(0, Math.min(1, value)).toFixed(4));
  if (value > 0.6) cell.classList.add('hot');
  return cell;
}
