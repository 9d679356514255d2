// The rerank view: one /v1/rerank request (a query, the documents one per line), then the
// documents ranked by relevance score. A cross-encoder scores in (0, 1); an embedding model,
// used when no reranker is loaded, scores by cosine similarity.
import * as api from './api.js';
import { $, el, showBanner, hideBanner } from './ui.js';

export function initRerank() {
  $('#rerank').addEventListener('click', run);
  $('#rerank-query').addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.isComposing) run();
  });
}

/** Rerankers first (the server's default), then embedding models (cosine similarity). */
export function setRerankModels(cards) {
  const select = $('#rerank-model');
  const before = select.value;
  const usable = [...cards.filter((c) => c.kind === 'rerank'), ...cards.filter((c) => c.kind === 'embedding')];
  select.replaceChildren(...usable.map((c) => el('option', { value: c.id },
    c.kind === 'rerank' ? `${c.id} (reranker)` : `${c.id} (cosine)`)));
  if (usable.some((c) => c.id === before)) select.value = before;
  select.disabled = usable.length === 0;
  $('#rerank').disabled = usable.length === 0;
}

async function run() {
  const documents = $('#rerank-documents').value.split('\n').map((s) => s.trim()).filter((s) => s.length);
  const query = $('#rerank-query').value.trim();
  const result = $('#rerank-result');
  if (!query || !documents.length) {
    showBanner('Write a query and at least one document.', 'info');
    return;
  }
  const model = $('#rerank-model').value || undefined;
  const button = $('#rerank');
  button.disabled = true;
  result.setAttribute('aria-busy', 'true');
  try {
    const response = await api.postJSON('v1/rerank', { model, query, documents, return_documents: true, truncate: true });
    hideBanner();
    render(result, response, query, documents);
  } catch (err) {
    showBanner(`Rerank failed: ${err.message}`);
  } finally {
    button.disabled = false;
    result.removeAttribute('aria-busy');
  }
}

function render(result, response, query, documents) {
  const summary = el('p', { class: 'summary' },
    el('span', { dataset: { stat: 'model' } }, response.model), ' · ',
    el('span', { dataset: { stat: 'tokens' } }, `${response.usage.total_tokens} tokens`), ' · ',
    `${documents.length} document${documents.length === 1 ? '' : 's'}`);
  const list = el('ol', { class: 'ranking', id: 'rerank-ranking' }, response.results.map((r) => {
    const bar = el('span', { class: 'bar' });
    bar.style.setProperty('--v', Math.max(0, Math.min(1, r.relevance_score)).toFixed(4));
    return el('li', { dataset: { index: r.index, value: r.relevance_score } },
      el('span', { class: 'score', title: String(r.relevance_score) }, r.relevance_score.toFixed(3)), bar,
      el('span', { class: 'text' }, `${r.index + 1}. ${documents[r.index]}`));
  }));
  result.replaceChildren(summary, el('h3', {}, 'Ranked by relevance to ', el('q', {}, query)), list);
}
