// Charter's web console: a client of the control plane's public admin API, nothing more.
// Plain JavaScript with no build step and no library, compiled into charter-cp, so it works
// offline. Values from the API reach the page only as text nodes, never parsed as HTML: a host
// name or label a data plane reported cannot become markup.
'use strict';

// The admin token is kept in sessionStorage: it lasts while this tab is open (a reload
// keeps the operator signed in) and is gone when the tab closes; unlike localStorage it is
// not written for later sessions nor shared with other tabs, and unlike a cookie the
// browser never attaches it by itself, so another site cannot make a request that carries it.
const TOKEN_KEY = 'charter.adminToken';
const PAGES = ['license', 'licenses', 'data-planes', 'usage'];
const PAGE_SIZE = 20;
const REFRESH_MS = 10000;
const DAY = 86400;
// DESIGN.md's phases: expiring from 90 days before the expiration date, grace for 30 days after.
const EXPIRING_DAYS = 90;
const GRACE_DAYS = 30;

const state = {
  tokenRequired: false,
  access: null,
  page: null,
  status: null,
  licenseOffsets: [null],
  licensePage: 0,
  licensePages: {},
  timer: null,
};

const $ = (id) => document.getElementById(id);

/** An element with attributes and children (strings become text nodes). */
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === 'class') node.className = value;
    else if (name.startsWith('on')) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? '' : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

const SVG = 'http://www.w3.org/2000/svg';
function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
  for (const child of children) node.append(child instanceof Node ? child : String(child));
  return node;
}

function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
  return node;
}

function setText(id, text) {
  $(id).textContent = text || '';
}

/** An error of the admin API, carrying its own message (Kong's validation code included). */
class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

/** Calls the admin API with the token, if there is one; JSON in, JSON out. */
async function api(method, path, body) {
  const headers = { Accept: 'application/json' };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers['Kong-Admin-Token'] = token;
  const init = { method, headers, cache: 'no-store', credentials: 'omit' };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, `The control plane did not answer (${e.message}).`);
  }
  const text = await response.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch (_) {
      data = null;
    }
  }
  if (!response.ok) {
    let message = (data && data.message) || `${response.status} ${response.statusText}`;
    if (data && data.detail) message += ` (${data.detail})`;
    const error = new ApiError(response.status, message, data);
    if (response.status === 401 && state.access) {
      // The token was removed from the token file while the console was open.
      signedOut('The control plane no longer accepts this token: sign in again.');
    }
    throw error;
  }
  return data;
}

// ---------------------------------------------------------------- dates and statuses

function today() {
  // The control plane's own day when it said (status `days_left` against the expiration
  // date), else this browser's UTC day.
  if (state.status && state.status.today) return state.status.today;
  return Math.floor(Date.now() / 1000 / DAY);
}

/** Days since 1970-01-01 of a `YYYY-MM-DD` date (UTC), or null. */
function dayNumber(date) {
  const match = /^(\d{4})-(\d{2})-(\d{2})$/.exec(date || '');
  if (!match) return null;
  return Math.floor(Date.UTC(+match[1], +match[2] - 1, +match[3]) / 1000 / DAY);
}

function dateOfDay(day) {
  return new Date(day * DAY * 1000).toISOString().slice(0, 10);
}

/** A license's status on a day, by its expiration date (DESIGN.md's table). */
function statusOn(expirationDay, day) {
  const left = expirationDay - day;
  if (left > EXPIRING_DAYS) return 'valid';
  if (left >= 0) return 'expiring';
  if (-left <= GRACE_DAYS) return 'grace';
  return 'expired';
}

function badge(status) {
  return el('span', { class: `badge badge-${status.replace(/[^a-z_]/g, '')}` }, status.replace(/_/g, ' '));
}

function formatTime(seconds) {
  if (seconds === null || seconds === undefined) return '—';
  return new Date(seconds * 1000).toISOString().replace('T', ' ').slice(0, 16) + ' UTC';
}

function ago(seconds) {
  if (!seconds) return 'never';
  const delta = Math.max(0, Math.round(Date.now() / 1000 - seconds));
  if (delta < 60) return `${delta} s ago`;
  if (delta < 3600) return `${Math.floor(delta / 60)} min ago`;
  if (delta < DAY) return `${Math.floor(delta / 3600)} h ago`;
  return `${Math.floor(delta / DAY)} days ago`;
}

function plural(n, one, many) {
  return `${n} ${n === 1 ? one : many}`;
}

// ---------------------------------------------------------------- sign-in

function hideAll() {
  $('loading').hidden = true;
  $('login').hidden = true;
  for (const page of PAGES) $(`page-${page}`).hidden = true;
}

function signedOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  state.access = null;
  // Nothing of the last session stays on the pages for the next token to see.
  for (const id of ['add-error', 'add-done', 'licenses-error', 'license-error', 'dp-error', 'usage-error', 'usage-dp-error']) setText(id, '');
  $('add-text').value = '';
  $('add-file').value = '';
  state.licensePage = 0;
  state.licenseOffsets = [null];
  stopRefresh();
  hideAll();
  $('nav').hidden = true;
  $('session').hidden = true;
  $('login').hidden = false;
  setText('login-error', message);
  $('token').value = '';
  $('token').focus();
}

/** Asks the control plane whether it wants a token and what ours may do. */
async function probe() {
  const me = await api('GET', '/auth/self');
  state.tokenRequired = me.token_required;
  state.access = me.access;
}

async function start() {
  bindEvents();
  try {
    await probe();
  } catch (e) {
    if (e.status === 401) {
      const had = sessionStorage.getItem(TOKEN_KEY);
      signedOut(had ? 'The saved token is no longer accepted: sign in again.' : '');
      return;
    }
    hideAll();
    setText('fatal', `Cannot reach the admin API: ${e.message}`);
    return;
  }
  signedIn();
}

function signedIn() {
  hideAll();
  setText('fatal', '');
  $('nav').hidden = false;
  $('session').hidden = false;
  $('sign-out').hidden = !state.tokenRequired;
  const note = state.tokenRequired
    ? `Signed in with a ${state.access} token`
    : 'No admin token configured (loopback only)';
  setText('access-note', note);
  const readOnly = state.access !== 'write';
  $('write-note').hidden = !readOnly;
  for (const id of ['add-text', 'add-file', 'add-button']) $(id).disabled = readOnly;
  route();
}

async function login(event) {
  event.preventDefault();
  const token = $('token').value.trim();
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  setText('login-error', '');
  try {
    await probe();
  } catch (e) {
    sessionStorage.removeItem(TOKEN_KEY);
    setText('login-error', e.status === 401 ? `That token is not accepted: ${e.message}` : e.message);
    $('token').focus();
    return;
  }
  signedIn();
}

// ---------------------------------------------------------------- navigation

function route() {
  if (!state.access) return;
  const wanted = location.hash.replace(/^#/, '');
  const page = PAGES.includes(wanted) ? wanted : 'license';
  const changed = state.page !== page;
  state.page = page;
  hideAll();
  $(`page-${page}`).hidden = false;
  for (const link of document.querySelectorAll('#nav a')) {
    if (link.getAttribute('href') === `#${page}`) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
  document.title = `${$(`page-${page}`).querySelector('h1').textContent} — Charter console`;
  if (changed && wanted) $(`page-${page}`).querySelector('h1').focus();
  load(page);
  startRefresh();
}

function load(page) {
  const loaders = {
    license: loadLicense,
    licenses: loadLicenses,
    'data-planes': loadDataPlanes,
    usage: loadUsage,
  };
  return loaders[page]();
}

// The pages that change by themselves (the license's days, the data planes) are read
// again every few seconds; forms and dialogs are never redrawn under the operator.
function startRefresh() {
  stopRefresh();
  if (state.page === 'license' || state.page === 'data-planes') {
    state.timer = setInterval(() => {
      if (!document.hidden && !document.querySelector('dialog[open]')) load(state.page);
    }, REFRESH_MS);
  }
}

function stopRefresh() {
  if (state.timer) clearInterval(state.timer);
  state.timer = null;
}

// ---------------------------------------------------------------- license in force

async function readStatus() {
  const status = await api('GET', '/license/status');
  const license = status.license;
  const expiration = license && dayNumber(license.license_expiration_date);
  if (license && expiration !== null && typeof license.days_left === 'number') {
    status.today = expiration - license.days_left;
  }
  state.status = status;
  return status;
}

async function loadLicense() {
  let status;
  let report;
  try {
    [status, report] = await Promise.all([readStatus(), api('GET', '/license/report')]);
  } catch (e) {
    setText('license-error', e.message);
    return;
  }
  setText('license-error', '');
  const license = status.license;
  const statusNode = $('license-status');
  statusNode.className = `badge badge-${status.status}`;
  statusNode.textContent = status.status;
  $('license-none').hidden = Boolean(license);
  const fields = clear($('license-fields'));
  const row = (name, value, id) => {
    fields.append(el('dt', {}, name), el('dd', { id }, value));
  };
  if (license) {
    const left = license.days_left;
    row('Customer', license.customer, 'license-customer');
    row('Product', license.product_subscription, 'license-product');
    row('License key (hashed, as in the usage report)', el('code', {}, report.license_key), 'license-key');
    row('Verified by key', el('code', {}, license.key_id), 'license-key-id');
    row('Expires', license.license_expiration_date, 'license-expires');
    row('Days left', left >= 0 ? String(left) : `${-left} days past expiry`, 'license-days-left');
    if (license.id) row('License id', el('code', {}, license.id), 'license-id');
    if (license.updated_at) row('Updated', formatTime(license.updated_at), 'license-updated');
    row('Source', license.source === 'static'
      ? 'static (--license-path on this node)'
      : 'stored (the admin API)', 'license-source');
    if (license.dataplanes) row('Licensed data planes', license.dataplanes, 'license-dataplanes');
    drawTimeline(license, status.today);
  } else {
    $('timeline').hidden = true;
  }
  const warnings = clear($('warnings'));
  for (const warning of status.warnings || []) warnings.append(el('li', {}, warning));
  $('warnings-none').hidden = (status.warnings || []).length > 0;
}

/**
 * Where today falls among valid → expiring (90 days) → grace (30 days) → expired. The
 * phases get fixed shares of the bar (a license of ten years would otherwise leave its last
 * 90 days a sliver); the marker moves through each phase in proportion to time.
 */
function drawTimeline(license, day) {
  const expiry = dayNumber(license.license_expiration_date);
  const created = dayNumber(license.license_creation_date);
  if (expiry === null) {
    $('timeline').hidden = true;
    return;
  }
  $('timeline').hidden = false;
  const left = expiry - day;
  const expiringFrom = expiry - EXPIRING_DAYS;
  const graceUntil = expiry + GRACE_DAYS;
  let position;
  if (left > EXPIRING_DAYS) {
    const start = created !== null && created < expiringFrom ? created : expiringFrom - 365;
    position = 40 * Math.min(1, Math.max(0, (day - start) / (expiringFrom - start)));
  } else if (left >= 0) {
    position = 40 + 30 * ((EXPIRING_DAYS - left) / EXPIRING_DAYS);
  } else if (-left <= GRACE_DAYS) {
    position = 70 + 20 * (-left / GRACE_DAYS);
  } else {
    position = 90 + 9 * Math.min(1, (-left - GRACE_DAYS) / GRACE_DAYS);
  }
  // CSSOM, not a style attribute: the Content-Security-Policy allows the former only.
  $('timeline-today').style.left = `${position}%`;
  const phase = statusOn(expiry, day);
  const legend = clear($('timeline-legend'));
  legend.append(
    el('li', { class: 'valid' }, 'valid', el('span', {}, ` until ${dateOfDay(expiringFrom - 1)}`)),
    el('li', { class: 'expiring' }, 'expiring', el('span', {}, ` from ${dateOfDay(expiringFrom)}`)),
    el('li', { class: 'grace' }, 'grace', el('span', {}, ` from ${dateOfDay(expiry + 1)}`)),
    el('li', { class: 'expired' }, 'expired', el('span', {}, ` from ${dateOfDay(graceUntil + 1)}`)),
  );
  for (const item of legend.children) {
    if (item.classList.contains(phase)) item.setAttribute('aria-current', 'step');
  }
  let where;
  if (left >= 0) where = `${plural(left, 'day', 'days')} before the license expires on ${license.license_expiration_date}`;
  else where = `${plural(-left, 'day', 'days')} after the license expired on ${license.license_expiration_date}`;
  setText('timeline-caption', `Today (${dateOfDay(day)}) is in the ${phase} phase: ${where}.`);
}

// ---------------------------------------------------------------- licenses

/** The fields of a stored record's license document, or null when it does not parse. */
function terms(record) {
  try {
    const doc = JSON.parse(record.payload);
    const payload = doc && doc.license && doc.license.payload;
    return payload && typeof payload === 'object' ? payload : null;
  } catch (_) {
    return null;
  }
}

/** Whether `record` is in force, and why (or why not). */
function inForce(record, status) {
  const license = status.license;
  if (license && license.source === 'static') {
    return { yes: false, why: 'Not in use: the static license of this node (--license-path) wins.' };
  }
  if (license && license.id === record.id) {
    return { yes: true, why: 'In force: the newest updated_at among the licenses that verify.' };
  }
  if (!license || record.updated_at > license.updated_at) {
    return { yes: false, unverified: true, why: 'Not in force: it does not verify with this control plane (trusted keys or dates).' };
  }
  if (record.updated_at === license.updated_at) {
    return { yes: false, why: 'Not in force: the one in force has the same updated_at and was written later.' };
  }
  return { yes: false, why: 'Not in force: another license was updated more recently.' };
}

async function loadLicenses() {
  const offset = state.licenseOffsets[state.licensePage];
  const path = `/licenses?size=${PAGE_SIZE}${offset ? `&offset=${encodeURIComponent(offset)}` : ''}`;
  let page;
  let status;
  try {
    [page, status] = await Promise.all([api('GET', path), readStatus()]);
  } catch (e) {
    setText('licenses-error', e.message);
    return;
  }
  setText('licenses-error', '');
  const body = clear($('licenses-body'));
  const readOnly = state.access !== 'write';
  const day = today();
  for (const record of page.data) {
    const fields = terms(record) || {};
    const force = inForce(record, status);
    const expiry = dayNumber(fields.license_expiration_date);
    const recordStatus = force.unverified ? 'not_verified' : expiry === null ? 'unreadable' : statusOn(expiry, day);
    const label = fields.customer || '(no customer)';
    body.append(el('tr', { 'data-id': record.id, class: force.yes ? 'in-force' : null },
      el('th', { scope: 'row' }, label),
      el('td', {}, fields.product_subscription || '—'),
      el('td', {}, fields.license_expiration_date || '—'),
      el('td', { class: 'status' }, badge(recordStatus)),
      el('td', { class: 'force' }, el('strong', {}, force.yes ? 'In force' : 'No'), el('br'), el('span', { class: 'why' }, force.why)),
      el('td', {}, formatTime(record.updated_at)),
      el('td', {}, el('code', {}, record.id)),
      el('td', { class: 'actions' },
        el('button', {
          type: 'button', class: 'replace', disabled: readOnly,
          'aria-label': `Replace the license of ${label}`,
          title: readOnly ? 'Needs a write token' : null,
          onclick: () => openReplace(record, label),
        }, 'Replace'),
        el('button', {
          type: 'button', class: 'delete danger', disabled: readOnly,
          'aria-label': `Delete the license of ${label}`,
          title: readOnly ? 'Needs a write token' : null,
          onclick: () => openDelete(record, label),
        }, 'Delete'))));
  }
  $('licenses-empty').hidden = page.data.length > 0 || state.licensePage > 0;
  if (page.offset) state.licenseOffsets[state.licensePage + 1] = page.offset;
  $('licenses-next').disabled = !page.offset;
  $('licenses-prev').disabled = state.licensePage === 0;
  setText('licenses-page', page.offset || state.licensePage > 0 ? `Page ${state.licensePage + 1}` : '');
}

function readFileInto(input, textarea) {
  const file = input.files && input.files[0];
  if (!file) return Promise.resolve();
  return file.text().then((text) => {
    textarea.value = text.trim();
  });
}

async function addLicense(event) {
  event.preventDefault();
  setText('add-error', '');
  setText('add-done', '');
  // A file chosen but not read yet (its `change` handler is still reading it).
  if (!$('add-text').value.trim()) await readFileInto($('add-file'), $('add-text'));
  const payload = $('add-text').value.trim();
  if (!payload) {
    setText('add-error', 'Paste a license document or choose a file first.');
    return;
  }
  let record;
  try {
    record = await api('POST', '/licenses', { payload });
  } catch (e) {
    setText('add-error', e.message);
    return;
  }
  $('add-text').value = '';
  $('add-file').value = '';
  const customer = (terms(record) || {}).customer || 'the license';
  setText('add-done', `Added ${customer} (${record.id}).`);
  state.licensePage = 0;
  state.licenseOffsets = [null];
  await loadLicenses();
}

function openDelete(record, label) {
  const dialog = $('delete-dialog');
  dialog.dataset.id = record.id;
  setText('delete-text', `${label}, license ${record.id}, will be removed from the store. If it is in force, the next newest license that verifies takes over; if none is left, the data planes become unlicensed.`);
  setText('delete-error', '');
  dialog.showModal();
  $('delete-cancel').focus();
}

async function confirmDelete(event) {
  event.preventDefault();
  const dialog = $('delete-dialog');
  try {
    await api('DELETE', `/licenses/${encodeURIComponent(dialog.dataset.id)}`);
  } catch (e) {
    setText('delete-error', e.message);
    return;
  }
  dialog.close();
  await loadLicenses();
  // The row and its button are gone: give focus to the page's heading, not to nowhere.
  $('licenses-title').focus();
}

function openReplace(record, label) {
  const dialog = $('replace-dialog');
  dialog.dataset.id = record.id;
  setText('replace-text', `The new document replaces the license of ${label} (${record.id}); its updated_at moves to now, so it is in force if it verifies.`);
  setText('replace-error', '');
  $('replace-input').value = '';
  $('replace-file').value = '';
  dialog.showModal();
  $('replace-input').focus();
}

async function confirmReplace(event) {
  event.preventDefault();
  const dialog = $('replace-dialog');
  if (!$('replace-input').value.trim()) await readFileInto($('replace-file'), $('replace-input'));
  const payload = $('replace-input').value.trim();
  if (!payload) {
    setText('replace-error', 'Paste a license document or choose a file first.');
    return;
  }
  try {
    await api('PATCH', `/licenses/${encodeURIComponent(dialog.dataset.id)}`, { payload });
  } catch (e) {
    setText('replace-error', e.message);
    return;
  }
  dialog.close();
  await loadLicenses();
  // The table was drawn again, so the button that opened the dialog is gone.
  $('licenses-title').focus();
}

// ---------------------------------------------------------------- data planes

async function loadDataPlanes() {
  let planes;
  try {
    planes = (await api('GET', '/clustering/data-planes')).data;
  } catch (e) {
    setText('dp-error', e.message);
    return;
  }
  setText('dp-error', '');
  // Out of sync first, then by host name: the rows that need an operator come first.
  planes.sort((a, b) => (a.sync_status === 'in_sync') - (b.sync_status === 'in_sync')
    || String(a.hostname).localeCompare(String(b.hostname)));
  const counts = {};
  for (const plane of planes) counts[plane.sync_status] = (counts[plane.sync_status] || 0) + 1;
  const list = clear($('dp-counts'));
  list.append(el('li', { 'data-state': 'total' }, el('strong', {}, String(planes.length)), ' total'));
  for (const [syncStatus, count] of Object.entries(counts).sort()) {
    list.append(el('li', { 'data-state': syncStatus }, el('strong', {}, String(count)), ' ', badge(syncStatus)));
  }
  const body = clear($('dp-body'));
  for (const plane of planes) {
    const labels = Object.entries(plane.labels || {}).map(([k, v]) => el('span', { class: 'label' }, `${k}=${v}`));
    body.append(el('tr', { 'data-id': plane.id, class: plane.sync_status === 'in_sync' ? null : 'attention' },
      el('th', { scope: 'row' }, plane.hostname || plane.id, el('br'), el('code', { class: 'why' }, plane.id)),
      el('td', {}, plane.version || '—'),
      el('td', { class: 'sync' }, badge(plane.sync_status || 'unknown'),
        plane.last_error ? el('span', { class: 'why' }, ` ${plane.last_error}`) : null),
      el('td', { class: 'license' }, badge(plane.license_status || 'unknown')),
      el('td', { title: formatTime(plane.last_seen) }, ago(plane.last_seen)),
      el('td', {}, plane.control_plane || '—'),
      el('td', {}, labels.length ? labels : '—'),
      el('td', {}, el('button', {
        type: 'button', class: 'show-usage',
        'aria-label': `Show the usage of ${plane.hostname || plane.id}`,
        onclick: () => {
          state.usageDp = plane.id;
          location.hash = '#usage';
        },
      }, 'Usage'))));
  }
  $('dp-empty').hidden = planes.length > 0;
}

// ---------------------------------------------------------------- usage

/** An SVG bar chart of `[{bucket, request_count}]`, drawn here: one `rect.bar` per month. */
function barChart(counters, title) {
  const width = 640;
  const height = 260;
  const margin = { top: 24, right: 12, bottom: 40, left: 12 };
  const inner = { width: width - margin.left - margin.right, height: height - margin.top - margin.bottom };
  const max = Math.max(1, ...counters.map((c) => c.request_count));
  const slot = inner.width / Math.max(1, counters.length);
  const barWidth = Math.min(64, slot * 0.7);
  const chart = svg('svg', {
    viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-label': title, class: 'bars',
  });
  chart.append(svg('line', {
    x1: margin.left, x2: width - margin.right, y1: margin.top + inner.height, y2: margin.top + inner.height, class: 'axis',
  }));
  counters.forEach((counter, i) => {
    const h = (counter.request_count / max) * inner.height;
    const x = margin.left + i * slot + (slot - barWidth) / 2;
    const y = margin.top + inner.height - h;
    const group = svg('g', { class: 'month', 'data-bucket': counter.bucket });
    group.append(
      svg('rect', { class: 'bar', x, y, width: barWidth, height: Math.max(h, 1), 'data-count': counter.request_count },
        svg('title', {}, `${counter.bucket}: ${plural(counter.request_count, 'request', 'requests')}`)),
      svg('text', { class: 'value', x: x + barWidth / 2, y: y - 6, 'text-anchor': 'middle' }, String(counter.request_count)),
      svg('text', { class: 'bucket', x: x + barWidth / 2, y: margin.top + inner.height + 20, 'text-anchor': 'middle' }, counter.bucket),
    );
    chart.append(group);
  });
  return chart;
}

function countersTable(table, counters) {
  clear(table);
  table.append(
    el('caption', { class: 'visually-hidden' }, 'Requests per month'),
    el('thead', {}, el('tr', {}, el('th', { scope: 'col' }, 'Month'), el('th', { scope: 'col' }, 'Requests'))),
    el('tbody', {}, counters.map((c) => el('tr', {}, el('th', { scope: 'row' }, c.bucket), el('td', {}, String(c.request_count))))),
  );
}

async function loadUsage() {
  let report;
  let planes;
  try {
    [report, planes] = await Promise.all([api('GET', '/license/report'), api('GET', '/clustering/data-planes')]);
  } catch (e) {
    setText('usage-error', e.message);
    return;
  }
  setText('usage-error', '');
  const fields = clear($('usage-fields'));
  const row = (name, value) => fields.append(el('dt', {}, name), el('dd', {}, value));
  const total = report.counters.reduce((sum, c) => sum + c.request_count, 0);
  row('Requests counted', String(total));
  row('Connected data planes', String(report.deployment_info ? report.deployment_info.connected_dp_count : '—'));
  row('Licensed data planes', report.licensed_dataplanes == null ? '—' : String(report.licensed_dataplanes));
  row('License key (hashed)', el('code', {}, report.license_key));
  row('Services gated', String(report.services_count));
  row('Store', report.db_version);
  row('Version', report.kong_version);
  const chart = clear($('usage-chart'));
  chart.append(barChart(report.counters, `Requests per month, ${report.counters.length} months`));
  setText('usage-caption', `Requests forwarded by every data plane's gate, per UTC month (${plural(total, 'request', 'requests')} in all).`);
  countersTable($('usage-table'), report.counters);

  const select = clear($('usage-dp'));
  for (const plane of planes.data) {
    select.append(el('option', { value: plane.id }, `${plane.hostname || plane.id} (${plane.id})`));
  }
  if (!planes.data.length) select.append(el('option', { value: '' }, 'No data plane yet'));
  if (state.usageDp) {
    select.value = state.usageDp;
    state.usageDp = null;
    await showDataPlaneUsage();
  }
}

async function showDataPlaneUsage(event) {
  if (event) event.preventDefault();
  const id = $('usage-dp').value;
  setText('usage-dp-error', '');
  if (!id) return;
  let report;
  try {
    report = await api('GET', '/license/report?by=dataplane');
  } catch (e) {
    setText('usage-dp-error', e.message);
    return;
  }
  const name = $('usage-dp').selectedOptions[0] ? $('usage-dp').selectedOptions[0].textContent : id;
  const entry = (report.dataplanes || []).find((d) => d.id === id);
  const counters = entry ? entry.counters : [];
  $('usage-dp-figure').hidden = false;
  const chart = clear($('usage-dp-chart'));
  if (counters.length) {
    chart.append(barChart(counters, `Requests per month of ${name}`));
    setText('usage-dp-caption', `Requests forwarded by ${name}, per UTC month.`);
  } else {
    setText('usage-dp-caption', `No request has been counted for ${name}.`);
  }
  countersTable($('usage-dp-table'), counters);
}

// ---------------------------------------------------------------- wiring

function bindEvents() {
  window.addEventListener('hashchange', route);
  $('login-form').addEventListener('submit', login);
  $('sign-out').addEventListener('click', () => signedOut(''));
  $('add-form').addEventListener('submit', addLicense);
  $('add-file').addEventListener('change', () => readFileInto($('add-file'), $('add-text')));
  $('licenses-next').addEventListener('click', () => {
    state.licensePage += 1;
    loadLicenses();
  });
  $('licenses-prev').addEventListener('click', () => {
    state.licensePage = Math.max(0, state.licensePage - 1);
    loadLicenses();
  });
  $('delete-form').addEventListener('submit', confirmDelete);
  $('delete-cancel').addEventListener('click', () => $('delete-dialog').close());
  $('replace-form').addEventListener('submit', confirmReplace);
  $('replace-cancel').addEventListener('click', () => $('replace-dialog').close());
  $('replace-file').addEventListener('change', () => readFileInto($('replace-file'), $('replace-input')));
  $('usage-dp-form').addEventListener('submit', showDataPlaneUsage);
}

document.addEventListener('DOMContentLoaded', start);
