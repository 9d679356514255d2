// The playground: views (tabs), drawers at phone width, the API-key dialog, models from /v1/models.
import * as api from './api.js';
import { initChat, setChatModels } from './chat.js';
import { initEmbeddings, setEmbeddingModels } from './embeddings.js';
import { initRerank, setRerankModels } from './rerank.js';
import { initTokens, setTokenModels } from './tokens.js';
import { $, $$, showBanner, hideBanner } from './ui.js';

const VIEWS = ['chat', 'embeddings', 'rerank', 'tokens'];

function showView(name) {
  if (!VIEWS.includes(name)) name = 'chat';
  for (const view of VIEWS) {
    $(`#view-${view}`).hidden = view !== name;
    $(`#tab-${view}`).setAttribute('aria-selected', String(view === name));
  }
  document.body.dataset.view = name;
  closeDrawers();
  if (location.hash !== `#${name}`) history.replaceState(null, '', `#${name}`);
}

// ------------------------------------------------------------------------------------------
// Drawers (conversations, settings) at phone width

function toggleDrawer(name) {
  const open = !document.body.classList.contains(`show-${name}`);
  closeDrawers();
  if (open) {
    document.body.classList.add(`show-${name}`);
    $('#scrim').hidden = false;
    $(`#toggle-${name}`).setAttribute('aria-expanded', 'true');
  }
}

function closeDrawers() {
  document.body.classList.remove('show-sidebar', 'show-settings');
  $('#scrim').hidden = true;
  for (const name of ['sidebar', 'settings']) $(`#toggle-${name}`).setAttribute('aria-expanded', 'false');
}

// ------------------------------------------------------------------------------------------
// API key

let keyWaiters = [];

function openKeyDialog(message) {
  const dialog = $('#key-dialog');
  $('#key-message').textContent = message || 'Sent as "Authorization: Bearer <key>" with this page\'s requests.';
  $('#key-input').value = api.getKey();
  $('#key-remember').checked = api.keyRemembered();
  if (!dialog.open) dialog.showModal();
  $('#key-input').focus();
}

function closeKeyDialog(gotKey) {
  const dialog = $('#key-dialog');
  if (dialog.open) dialog.close();
  const waiters = keyWaiters;
  keyWaiters = [];
  for (const resolve of waiters) resolve(gotKey);
}

/** A 401 waits here until the user gives a key (true) or gives up (false). */
function askForKey(reason) {
  return new Promise((resolve) => {
    keyWaiters.push(resolve);
    openKeyDialog(reason);
  });
}

function initKeyDialog() {
  api.onKeyRequired(askForKey);
  $('#open-key').addEventListener('click', () => openKeyDialog());
  $('#key-save').addEventListener('click', () => {
    const key = $('#key-input').value.trim();
    api.setKey(key, $('#key-remember').checked);
    closeKeyDialog(Boolean(key));
    loadModels();
  });
  $('#key-input').addEventListener('keydown', (event) => {
    if (event.key === 'Enter') {
      event.preventDefault();
      $('#key-save').click();
    }
  });
  $('#key-forget').addEventListener('click', () => {
    api.setKey('', false);
    $('#key-input').value = '';
    closeKeyDialog(false);
  });
  $('#key-cancel').addEventListener('click', () => closeKeyDialog(false));
  $('#key-dialog').addEventListener('cancel', () => closeKeyDialog(false)); // Escape
}

// ------------------------------------------------------------------------------------------
// Models

let loading = null;
let retryTimer = 0;

async function loadModels() {
  if (loading) return loading;
  clearTimeout(retryTimer);
  const status = $('#server-status');
  loading = (async () => {
    try {
      const list = await api.getJSON('v1/models');
      const cards = list.data || [];
      setChatModels(cards);
      setEmbeddingModels(cards);
      setRerankModels(cards);
      setTokenModels(cards);
      const chat = cards.find((c) => c.kind === 'chat');
      status.textContent = chat ? chat.id : 'embeddings only';
      status.dataset.state = 'ready';
      hideBanner();
    } catch (err) {
      if (err.status === 503) {
        status.textContent = 'loading models…';
        status.dataset.state = 'loading';
        retryTimer = setTimeout(loadModels, 2000);
      } else {
        status.textContent = 'not connected';
        status.dataset.state = 'error';
        showBanner(`Could not list the models: ${err.message}`);
      }
    } finally {
      loading = null;
    }
  })();
  return loading;
}

// ------------------------------------------------------------------------------------------

function init() {
  for (const tab of $$('[role="tab"]')) tab.addEventListener('click', () => showView(tab.dataset.view));
  $('#toggle-sidebar').addEventListener('click', () => {
    if (document.body.dataset.view !== 'chat') showView('chat');
    toggleDrawer('sidebar');
  });
  $('#toggle-settings').addEventListener('click', () => {
    if (document.body.dataset.view !== 'chat') showView('chat');
    toggleDrawer('settings');
  });
  $('#scrim').addEventListener('click', closeDrawers);
  for (const button of $$('.close-drawer')) button.addEventListener('click', closeDrawers);
  $('#banner-close').addEventListener('click', hideBanner);
  initKeyDialog();
  initChat();
  initEmbeddings();
  initRerank();
  initTokens();
  showView(location.hash.slice(1));
  window.addEventListener('hashchange', () => showView(location.hash.slice(1)));
  loadModels();
  document.body.dataset.ready = 'true';
}

init();
