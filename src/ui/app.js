// Slipway's dashboard. Plain JavaScript, no build step: it reads and acts
// only through the public API (/api/v1) with the token the user pasted,
// kept in this tab's sessionStorage and sent in an Authorization header.
// API data is inserted as text (textContent, attributes), never as HTML.
'use strict';

const TOKEN_KEY = 'slipway.token';
const SVGNS = 'http://www.w3.org/2000/svg';
/** Every API call gives up after this long (a stream: after this long without a byte). */
const CALL_TIMEOUT_MS = 15000;
const STREAM_SILENCE_MS = 45000;

let me = null;          // GET /api/v1/whoami, or null: not signed in
let view = null;        // the current page's lifetime
let signInNote = '';    // why the sign-in page is shown (a refused token)

// ---- small helpers ---------------------------------------------------

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  setAttrs(e, attrs);
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function svg(tag, attrs) {
  const e = document.createElementNS(SVGNS, tag);
  setAttrs(e, attrs);
  return e;
}

function setAttrs(e, attrs) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k === 'className' ? 'class' : k, v === true ? '' : String(v));
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function fmtTime(ms) {
  if (!ms) return '';
  const d = new Date(ms);
  const p = (n) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}

function fmtDur(ms) {
  if (ms === null || ms === undefined) return '';
  if (ms < 1000) return `${ms} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${Math.round(s - m * 60)} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

function shortDigest(d) {
  if (!d) return '';
  const hex = d.replace(/^sha256:/, '');
  return 'sha256:' + hex.slice(0, 12);
}

function badge(state) {
  const words = { rolled_back: 'rolled back', timed_out: 'timed out' };
  return el('span', { class: `badge s-${state}` }, words[state] || state);
}

const TERMINAL = new Set(['succeeded', 'failed', 'rolled_back', 'cancelled', 'superseded']);
const JOB_SIGN = { pending: '·', ready: '…', running: '▶', succeeded: '✓', failed: '✗', rolled_back: '↶', skipped: '–', cancelled: '■' };

function depLink(id) {
  return el('a', { href: `#/deployments/${id}`, 'data-key': `deployment/${id}` }, `#${id}`);
}

function what(d) {
  if (d.service) return `${d.service} ${d.version || ''}`.trim();
  return d.kind === 'run' ? 'jobs' : d.kind;
}

/** A message in the status line (read out by screen readers). */
function say(text, error) {
  const box = document.getElementById('status');
  box.replaceChildren(el('div', { class: error ? 'msg error' : 'msg ok', id: 'status-msg' }, text));
}

// ---- the API -----------------------------------------------------------

class ApiError extends Error {
  constructor(status, kind, message, problems) {
    super(message);
    this.status = status;
    this.kind = kind;
    this.problems = problems || [];
  }
}

function authHeaders(extra) {
  const h = Object.assign({}, extra);
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) h.Authorization = 'Bearer ' + token;
  return h;
}

async function api(method, path, body) {
  const headers = authHeaders({ Accept: 'application/json' });
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const ctl = new AbortController();
  const timer = setTimeout(() => ctl.abort(), CALL_TIMEOUT_MS);
  let res, text;
  try {
    res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), signal: ctl.signal, cache: 'no-store', credentials: 'omit' });
    text = await res.text();
  } catch (e) {
    throw new ApiError(0, 'unreachable', e.name === 'AbortError' ? `Slipway did not answer within ${CALL_TIMEOUT_MS / 1000} s` : `Slipway cannot be reached: ${e.message}`);
  } finally {
    clearTimeout(timer);
  }
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
  if (!res.ok) {
    const err = (data && data.error) || { kind: 'http', message: `HTTP ${res.status}` };
    if (res.status === 401 && me) {
      // The token was revoked while the page was open.
      sessionStorage.removeItem(TOKEN_KEY);
      me = null;
      signInNote = `Signed out: ${err.message}`;
      setTimeout(route, 0);
    }
    throw new ApiError(res.status, err.kind, err.message, err.problems);
  }
  return data;
}

// ---- roles: the API's rules, so buttons show only what it would allow ---

function allows(role, need) {
  switch (role) {
    case 'admin': return true;
    case 'deployer': return need === 'read' || need === 'deploy';
    case 'approver': return need === 'read' || need === 'approve';
    case 'viewer': return need === 'read';
    default: return false;
  }
}

function may(need, env) {
  if (!me) return false;
  // An open API (no token yet) allows everything but approving.
  if (me.open) return need !== 'approve';
  return allows(me.roles['*'], need) || (env !== undefined && allows(me.roles[env], need));
}

/** Approve: an approver there, and never the one who asked for it. */
function mayApprove(hold) {
  return hold.approval_required && !hold.approved_by && may('approve', hold.deployment.environment) && hold.requested_by !== me.actor;
}

// ---- acting: confirm, call, say what the API answered ------------------

function confirmAction(title, text, verb, danger) {
  const d = document.getElementById('confirm');
  document.getElementById('confirm-title').textContent = title;
  document.getElementById('confirm-text').textContent = text;
  const yes = document.getElementById('confirm-yes');
  yes.textContent = verb;
  yes.className = danger ? 'danger' : 'primary';
  return new Promise((resolve) => {
    const no = document.getElementById('confirm-no');
    const done = (ok) => (ev) => {
      ev.preventDefault();
      yes.onclick = null;
      no.onclick = null;
      d.onclose = null;
      d.close();
      resolve(ok);
    };
    yes.onclick = done(true);
    no.onclick = done(false);
    d.onclose = () => resolve(false);
    d.showModal();
    no.focus();
  });
}

async function act({ verb, title, text, method, path, body, danger, done }) {
  if (!(await confirmAction(title, text, verb, danger))) return;
  try {
    const r = await api(method, path, body);
    say(done(r));
    if (view) view.refresh();
  } catch (e) {
    say(`${verb} refused: ${e.message}`, true);
  }
}

function approveButton(hold) {
  const d = hold.deployment;
  return el('button', {
    class: 'primary',
    'data-key': `approve/${d.id}`,
    'aria-label': `Approve deployment ${d.id} (${what(d)} in ${d.environment})`,
    onclick: () => act({
      verb: 'Approve', method: 'POST', path: `/api/v1/deployments/${d.id}/approve`,
      title: `Approve deployment #${d.id}?`,
      text: `${what(d)} in ${d.environment}, asked for by ${hold.requested_by || 'an unknown caller'}. It starts once its other gates pass.`,
      done: (r) => `Deployment #${d.id} approved by ${r.approved_by}` + (r.waiting_for ? `; still ${r.waiting_for}` : '; it starts now'),
    }),
  }, 'Approve');
}

function cancelButton(d) {
  return el('button', {
    class: 'danger',
    'data-key': `cancel/${d.id}`,
    'aria-label': `Cancel deployment ${d.id} (${what(d)} in ${d.environment})`,
    onclick: () => act({
      verb: 'Cancel deployment', method: 'POST', path: `/api/v1/deployments/${d.id}/cancel`, danger: true,
      title: `Cancel deployment #${d.id}?`,
      text: `${what(d)} in ${d.environment}: running jobs are stopped, pending ones never start.`,
      done: (r) => `Deployment #${r.id} is ${r.state === 'cancelled' ? 'cancelled' : 'being cancelled'}`,
    }),
  }, 'Cancel');
}

function rollbackButton(s) {
  return el('button', {
    'data-key': `rollback/${s.environment}/${s.service}`,
    'aria-label': `Roll back ${s.service} in ${s.environment}`,
    onclick: () => act({
      verb: 'Roll back', method: 'POST', path: `/api/v1/services/${encodeURIComponent(s.environment)}/${encodeURIComponent(s.service)}/rollback`, danger: true,
      title: `Roll back ${s.service} in ${s.environment}?`,
      text: `It runs ${s.version} now; it goes back to the version it ran before${s.previous_version ? ` (${s.previous_version})` : ''}. Only its rollout runs; migrations go forward only.`,
      done: (r) => `Rollback of ${s.service} in ${s.environment}: deployment #${r.deployment_id}`,
    }),
  }, 'Roll back');
}

function promoteButton(s, from) {
  return el('button', {
    'data-key': `promote/${s.environment}/${s.service}`,
    'aria-label': `Promote ${s.service} from ${from} to ${s.environment}`,
    onclick: () => act({
      verb: 'Promote', method: 'POST', path: `/api/v1/services/${encodeURIComponent(s.environment)}/${encodeURIComponent(s.service)}/promote`, body: { from },
      title: `Promote ${s.service} from ${from} to ${s.environment}?`,
      text: `The version ${s.service} runs in ${from} is deployed to ${s.environment}${s.version ? ` (where it runs ${s.version})` : ''}, through ${s.environment}'s gates.`,
      done: (r) => `Promotion of ${s.service} to ${s.environment}: deployment #${r.deployment_id}` + (r.duplicate ? ' (already asked for)' : ''),
    }),
  }, `Promote from ${from}`);
}

// ---- pages ---------------------------------------------------------------

/** A page's life: its timers and streams end when another page opens. */
function lifetime() {
  return {
    alive: true,
    aborts: [],
    wake: null,
    /** An abort controller that ends with the page (at once if it has). */
    track(ctl) { if (this.alive) this.aborts.push(ctl); else ctl.abort(); return ctl; },
    refresh() { if (this.wake) this.wake(); },
    stop() { this.alive = false; this.aborts.forEach((a) => a.abort()); this.refresh(); },
  };
}

/** Run `fn` now and every `ms` while the page lives (or when asked to refresh). */
async function every(life, ms, fn) {
  while (life.alive) {
    try {
      await fn();
    } catch (e) {
      if (!life.alive) return;
      if (e.status !== 401) say(e.message, true);
    }
    if (!life.alive) return;
    await new Promise((r) => { life.wake = r; setTimeout(r, ms); });
  }
}

/** What each box shows now (the JSON of its data). */
const shownData = new WeakMap();

/** Replace a box's content only when the data changed, keeping focus. */
function renderInto(box, data, build) {
  // A running deployment's duration grows on every poll; the tables show
  // when it started instead, so it is no change.
  const key = JSON.stringify(data, (k, v) => (k === 'duration_ms' ? undefined : v));
  if (shownData.get(box) === key) return;
  const focused = document.activeElement && box.contains(document.activeElement) ? document.activeElement.getAttribute('data-key') : null;
  box.replaceChildren(...[].concat(build()));
  shownData.set(box, key);
  if (focused) {
    const again = box.querySelector(`[data-key="${CSS.escape(focused)}"]`);
    if (again) again.focus();
  }
}

/** Name each cell by its column, for narrow screens where rows stack. */
function labelCells(headers, rows) {
  for (const tr of rows.flat()) {
    [...tr.children].forEach((td, i) => { if (headers[i]) td.setAttribute('data-label', headers[i]); });
  }
  return rows;
}

function table(headers, rows, caption) {
  labelCells(headers, rows);
  return el('div', { class: 'table-wrap' },
    el('table', {},
      caption ? el('caption', { class: 'muted' }, caption) : null,
      el('thead', {}, el('tr', {}, headers.map((h) => el('th', { scope: 'col' }, h)))),
      el('tbody', {}, rows)));
}

async function overviewPage(main, life) {
  main.append(el('h1', {}, 'Overview'));
  const box = el('div', { id: 'overview' });
  main.append(box);
  await every(life, 3000, async () => {
    const [envs, services, holds, recent] = await Promise.all([
      api('GET', '/api/v1/environments'), api('GET', '/api/v1/services'), api('GET', '/api/v1/approvals'), api('GET', '/api/v1/deployments?limit=10'),
    ]);
    renderInto(box, [envs, services, holds, recent, me], () => overview(envs, services, holds, recent));
  });
}

function overview(envs, services, holds, recent) {
  const out = [];
  out.push(el('h2', {}, 'Waiting at a gate'));
  if (holds.length === 0) out.push(el('p', { class: 'muted' }, 'Nothing waits.'));
  else {
    out.push(table(['Deployment', 'What', 'Environment', 'Waits for', 'Asked for by', ''], holds.map((h) => {
      const d = h.deployment;
      const waits = [];
      if (h.approval_required) waits.push(h.approved_by ? `approved by ${h.approved_by}` : 'an approval');
      if (h.not_before && h.not_before > Date.now()) waits.push(`soak until ${fmtTime(h.not_before)}`);
      if (h.window) waits.push('a deploy window');
      const buttons = [];
      if (mayApprove(h)) buttons.push(approveButton(h));
      else if (h.approval_required && !h.approved_by && me && h.requested_by === me.actor) buttons.push(el('span', { class: 'muted' }, 'You asked for it: another approver approves it.'));
      else if (h.approval_required && !h.approved_by && me && me.open) buttons.push(el('span', { class: 'muted' }, 'Approving needs a token.'));
      if (may('deploy', d.environment)) buttons.push(cancelButton(d));
      return el('tr', { 'data-deployment': d.id },
        el('td', {}, depLink(d.id), ' ', badge(d.state)),
        el('td', {}, what(d), h.source_environment ? el('div', { class: 'muted' }, `promoted from ${h.source_environment}`) : null),
        el('td', {}, d.environment),
        el('td', {}, h.waiting_for || waits.join('; ')),
        el('td', {}, h.requested_by || ''),
        el('td', {}, el('div', { class: 'actions' }, buttons)));
    })));
  }
  const names = envs.map((e) => e.name);
  for (const s of services) if (!names.includes(s.environment)) names.push(s.environment);
  for (const name of names) {
    const env = envs.find((e) => e.name === name) || { name, windows: [] };
    const here = services.filter((s) => s.environment === name);
    const section = el('section', { class: 'card', 'aria-labelledby': `env-${name}` });
    section.append(el('h2', { id: `env-${name}` }, `Environment ${name}`));
    const gates = [];
    if (env.approval) gates.push('needs an approval');
    if (env.soak_secs) gates.push(`soak ${fmtDur(env.soak_secs * 1000)}`);
    if (env.windows && env.windows.length) gates.push(`windows ${env.windows.join(', ')}`);
    if (env.promote_from) gates.push(`promoted from ${env.promote_from}`);
    if (env.git) gates.push(`config from ${env.git}`);
    if (env.revision) gates.push(`commit ${env.revision.commit.slice(0, 10)}`);
    if (gates.length) section.append(el('div', { class: 'gates' }, gates.map((g) => el('span', {}, g))));
    if (env.rejected) {
      section.append(el('div', { class: 'card rejected' },
        el('h3', {}, `Rejected commit ${env.rejected.commit.slice(0, 10)}`),
        el('p', { class: 'muted' }, `${fmtTime(env.rejected.at)}: the environment keeps running the last accepted commit.`),
        el('pre', {}, env.rejected.errors || 'no report')));
    }
    if (env.fetch_error) section.append(el('p', { class: 'badge s-failed' }, `fetching its config failed at ${fmtTime(env.fetch_failed_at)}: ${env.fetch_error}`));
    // What runs where this environment promotes from, but not here yet:
    // a row with the Promote button alone.
    const fresh = env.promote_from
      ? services.filter((s) => s.environment === env.promote_from && !here.some((h) => h.service === s.service))
        .map((s) => ({ environment: name, service: s.service, version: null, instances: [], restarts: 0, fresh: true }))
      : [];
    if (here.length + fresh.length === 0) section.append(el('p', { class: 'muted' }, 'No service has been deployed here yet.'));
    else {
      section.append(table(['Service', 'Version', 'Instances', 'Last deployment', ''], here.concat(fresh).map((s) => {
        if (s.fresh) {
          return el('tr', { 'data-service': `${s.environment}/${s.service}` },
            el('td', {}, s.service), el('td', { class: 'muted' }, 'not deployed here yet'), el('td', {}, '—'), el('td', {}, ''),
            el('td', {}, el('div', { class: 'actions' }, may('deploy', name) ? promoteButton(s, env.promote_from) : null)));
        }
        const running = s.instances.filter((i) => i.running).length;
        const last = s.last_deployment;
        const buttons = [el('a', { href: `#/why/${encodeURIComponent(s.environment)}/${encodeURIComponent(s.service)}`, 'data-key': `why/${s.environment}/${s.service}`, 'aria-label': `Why ${s.service} runs ${s.version} in ${s.environment}` }, 'Why?')];
        if (may('deploy', s.environment)) {
          if (s.previous_version) buttons.push(rollbackButton(s));
          if (env.promote_from) buttons.push(promoteButton(s, env.promote_from));
        }
        return el('tr', { 'data-service': `${s.environment}/${s.service}` },
          el('td', {}, s.service),
          el('td', {}, el('strong', {}, s.version), s.digest ? el('div', { class: 'mono muted' }, shortDigest(s.digest)) : null, s.runs ? el('div', { class: 'mono muted' }, `runs ${s.runs}`) : null),
          el('td', {}, s.instances.length ? `${running}/${s.instances.length} running` : (s.listen ? 'none on this node' : '—'),
            s.instances.map((i) => el('div', { class: 'mono muted' }, `${i.address} ${i.running ? 'up' : 'down'}`)),
            s.restarts ? el('div', { class: 'muted' }, `${s.restarts} restarts`) : null),
          el('td', {}, last ? [depLink(last.id), ' ', badge(last.state), last.reason ? el('div', { class: 'muted' }, last.reason) : null] : ''),
          el('td', {}, el('div', { class: 'actions' }, buttons)));
      })));
    }
    out.push(section);
  }
  out.push(el('h2', {}, 'Recent deployments'));
  out.push(deploymentTable(recent));
  return out;
}

function deploymentTable(list) {
  if (list.length === 0) return el('p', { class: 'muted' }, 'None yet.');
  return table(['Deployment', 'What', 'Environment', 'State', 'Created', 'Took'], list.map((d) => el('tr', { 'data-deployment': d.id },
    el('td', {}, depLink(d.id)),
    el('td', {}, what(d)),
    el('td', {}, d.environment),
    el('td', {}, badge(d.state), d.reason ? el('div', { class: 'muted' }, d.reason) : null),
    el('td', {}, fmtTime(d.created_at)),
    el('td', {}, TERMINAL.has(d.state) ? fmtDur(d.duration_ms) : d.started_at ? `running since ${fmtTime(d.started_at).slice(11)}` : ''))));
}

async function deploymentsPage(main, life, query) {
  main.append(el('h1', {}, 'Deployments'));
  const state = query.get('state') || '';
  const select = el('select', { id: 'state-filter', onchange: () => { location.hash = select.value ? `#/deployments?state=${select.value}` : '#/deployments'; } },
    el('option', { value: '' }, 'any'),
    ['waiting', 'queued', 'running', 'succeeded', 'failed', 'rolled_back', 'cancelled', 'superseded'].map((s) => el('option', { value: s, selected: s === state }, s)));
  main.append(el('div', { class: 'actions' }, el('label', {}, 'State', select)));
  const box = el('div');
  main.append(box);
  await every(life, 3000, async () => {
    const list = await api('GET', `/api/v1/deployments?limit=100${state ? `&state=${encodeURIComponent(state)}` : ''}`);
    renderInto(box, list, () => deploymentTable(list));
  });
}

// The graph: waves as columns, `needs` as edges, the critical path marked.
const COL = 220, ROW = 34, NODE_W = 190, NODE_H = 24, PAD = 12;

function drawGraph(detail, onPick) {
  const pos = new Map();
  let rows = 0;
  detail.waves.forEach((wave, w) => {
    wave.forEach((name, r) => pos.set(name, { x: PAD + w * COL, y: PAD + r * ROW }));
    rows = Math.max(rows, wave.length);
  });
  const width = PAD * 2 + Math.max(1, detail.waves.length) * COL - (COL - NODE_W);
  const height = PAD * 2 + Math.max(1, rows) * ROW - (ROW - NODE_H);
  const root = svg('svg', { class: 'graph', width, height, viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-label': `Graph of ${detail.jobs.length} jobs in ${detail.waves.length} waves; the job table below lists the same jobs` });
  const edges = svg('g', {});
  const nodes = svg('g', {});
  root.append(edges, nodes);
  const edgeEls = new Map();
  const nodeEls = new Map();
  for (const job of detail.jobs) {
    const to = pos.get(job.name);
    if (!to) continue;
    for (const need of job.needs) {
      const from = pos.get(need);
      if (!from) continue;
      const x1 = from.x + NODE_W, y1 = from.y + NODE_H / 2, x2 = to.x, y2 = to.y + NODE_H / 2, mx = (x1 + x2) / 2;
      const p = svg('path', { class: 'edge', d: `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}` });
      edges.append(p);
      edgeEls.set(`${need}\u0000${job.name}`, p);
    }
    const g = svg('g', { class: 'job', transform: `translate(${to.x},${to.y})`, 'data-job': job.name });
    const title = svg('title', {});
    const label = svg('text', { x: 8, y: 16 });
    g.append(svg('rect', { width: NODE_W, height: NODE_H, rx: 4 }), label, title);
    g.addEventListener('click', () => onPick(job.name));
    nodes.append(g);
    nodeEls.set(job.name, { g, label, title, shown: '' });
  }
  return { root, edgeEls, nodeEls, critical: [] };
}

function updateGraph(graph, detail, selected) {
  const critical = new Set(detail.critical_path);
  for (const job of detail.jobs) {
    const n = graph.nodeEls.get(job.name);
    if (!n) continue;
    const cls = `job s-${job.state}${critical.has(job.name) ? ' critical' : ''}${job.name === selected ? ' selected' : ''}`;
    const name = job.name.length > 22 ? job.name.slice(0, 21) + '…' : job.name;
    const text = `${JOB_SIGN[job.state] || ''} ${name}`;
    const tip = `${job.name}: ${job.state}${job.duration_ms !== null ? `, ${fmtDur(job.duration_ms)}` : ''}${critical.has(job.name) ? ' (critical path)' : ''}`;
    const shown = cls + text + tip;
    if (n.shown === shown) continue;
    n.g.setAttribute('class', cls);
    n.label.textContent = text;
    n.title.textContent = tip;
    n.shown = shown;
  }
  for (const key of graph.critical) graph.edgeEls.get(key)?.setAttribute('class', 'edge');
  graph.critical = [];
  for (let i = 1; i < detail.critical_path.length; i++) {
    const key = `${detail.critical_path[i - 1]}\u0000${detail.critical_path[i]}`;
    const e = graph.edgeEls.get(key);
    if (e) { e.setAttribute('class', 'edge critical'); graph.critical.push(key); }
  }
}

async function deploymentPage(main, life, id) {
  let detail = await api('GET', `/api/v1/deployments/${id}`);
  if (!life.alive) return;
  let selected = null;
  const heading = el('h1', {}, `Deployment #${id}`);
  const summary = el('div', { id: 'summary' });
  const actions = el('div', { class: 'actions', id: 'deployment-actions' });
  const pathLine = el('p', { id: 'critical-path' });
  const graph = drawGraph(detail, (name) => pick(name));
  const jobRows = new Map();
  const jobBody = el('tbody', {});
  for (const job of detail.jobs) {
    const cells = { state: el('td', {}), attempt: el('td', {}), took: el('td', {}), exit: el('td', {}), reason: el('td', {}), shown: '' };
    const tr = el('tr', { 'data-job': job.name },
      el('td', {}, el('button', { class: 'link', 'data-key': `job/${job.name}`, onclick: () => pick(job.name), 'aria-label': `Show job ${job.name}: its attempts and log` }, job.name)),
      cells.state, cells.attempt, cells.took, cells.exit, cells.reason);
    labelCells(['Job', 'State', 'Attempts', 'Took', 'Exit', 'Reason'], [tr]);
    jobRows.set(job.name, cells);
    jobBody.append(tr);
  }
  const jobPanel = el('section', { id: 'job-panel', 'aria-live': 'polite' });
  const logTitle = el('h2', { id: 'log-title' }, 'Log: every job');
  const log = el('div', { class: 'log', id: 'log', role: 'log', 'aria-labelledby': 'log-title', tabindex: '0' });
  const logNote = el('p', { class: 'muted', id: 'log-note' });
  main.append(heading, summary, actions,
    el('h2', {}, 'Graph'),
    el('div', { class: 'legend', 'aria-hidden': 'true' }, ['pending', 'running', 'succeeded', 'failed', 'rolled_back', 'skipped', 'cancelled'].map((s) => badge(s)), el('span', { class: 'crit' }, '▬ critical path')),
    el('div', { class: 'graph-wrap' }, graph.root), pathLine,
    el('h2', {}, 'Jobs'),
    el('div', { class: 'table-wrap' }, el('table', { id: 'jobs' },
      el('thead', {}, el('tr', {}, ['Job', 'State', 'Attempts', 'Took', 'Exit', 'Reason'].map((h) => el('th', { scope: 'col' }, h)))), jobBody)),
    jobPanel, logTitle, logNote, log);

  let stream = null;
  function follow(job) {
    if (stream) stream.abort();
    log.replaceChildren();
    logTitle.textContent = job ? `Log: job ${job}` : 'Log: every job';
    logNote.textContent = 'Streaming…';
    stream = life.track(new AbortController());
    streamLogs(id, job, stream.signal, (l) => appendLine(log, l), (d) => { logNote.textContent = `The deployment ended ${d.state}: the log is complete.`; }, (msg) => { logNote.textContent = msg; });
  }

  function pick(name) {
    selected = selected === name ? null : name;
    showJob();
    updateGraph(graph, detail, selected);
    follow(selected);
  }

  function showJob() {
    if (!selected) { renderInto(jobPanel, null, () => []); return; }
    const job = detail.jobs.find((j) => j.name === selected);
    const attempts = detail.attempts.filter((a) => a.job === selected);
    // Rebuilt only when what it shows changed: it is a live region.
    renderInto(jobPanel, [selected, job.state, job.needs, job.node, attempts], () => [el('h2', {}, `Job ${selected}`),
      el('p', {}, badge(job.state), job.needs.length ? ` needs ${job.needs.join(', ')}` : ' needs nothing', job.node ? `; on node ${job.node}` : ''),
      attempts.length === 0 ? el('p', { class: 'muted' }, 'No attempt has ended yet.') : table(['Attempt', 'Node', 'Outcome', 'Took', 'Exit', 'Reason'], attempts.map((a) => [
        el('tr', {}, el('td', {}, a.attempt), el('td', {}, a.node), el('td', {}, badge(a.outcome)), el('td', {}, fmtDur(a.duration_ms)), el('td', {}, a.exit_code ?? ''), el('td', {}, a.reason || '')),
        ...(a.hosts || []).map((h) => el('tr', { class: 'host' }, el('td', {}, ''), el('td', {}, `host ${h.host}`), el('td', {}, badge(h.outcome)), el('td', {}, fmtDur(h.duration_ms)), el('td', {}, h.exit_code ?? ''), el('td', {}, h.reason || ''))),
      ]))]);
  }

  async function render() {
    const d = detail.deployment;
    heading.textContent = `Deployment #${id}: ${what(d)} in ${d.environment}`;
    renderInto(summary, d, () => el('dl', { class: 'facts' },
      el('dt', {}, 'State'), el('dd', { id: 'deployment-state' }, badge(d.state), d.cancel_requested && !TERMINAL.has(d.state) ? ' (cancelling)' : ''),
      d.reason ? [el('dt', {}, 'Reason'), el('dd', {}, d.reason)] : null,
      el('dt', {}, 'Kind'), el('dd', {}, d.kind),
      el('dt', {}, 'Revision'), el('dd', { class: 'mono' }, d.revision),
      el('dt', {}, 'Created'), el('dd', {}, fmtTime(d.created_at)),
      d.started_at ? [el('dt', {}, TERMINAL.has(d.state) ? 'Took' : 'Started'), el('dd', {}, TERMINAL.has(d.state) ? fmtDur(d.duration_ms) : fmtTime(d.started_at))] : null,
      d.superseded_by ? [el('dt', {}, 'Superseded by'), el('dd', {}, depLink(d.superseded_by))] : null));
    let hold = null;
    if (d.state === 'waiting') hold = (await api('GET', '/api/v1/approvals')).find((h) => h.deployment.id === id) || null;
    if (!life.alive) return;
    renderInto(actions, [d.state, d.cancel_requested, hold, me], () => {
      const b = [];
      if (hold) {
        b.push(el('p', { class: 'muted' }, `Waiting for ${hold.waiting_for || 'its gates'}.`));
        if (mayApprove(hold)) b.push(approveButton(hold));
        else if (hold.approval_required && !hold.approved_by && hold.requested_by === me.actor) b.push(el('p', { class: 'muted' }, 'You asked for this deployment: another approver must approve it.'));
      }
      if (!TERMINAL.has(d.state) && !d.cancel_requested && may('deploy', d.environment)) b.push(cancelButton(d));
      return b;
    });
    pathLine.textContent = detail.critical_path.length
      ? `Critical path (${fmtDur(detail.critical_path_ms)}): ${detail.critical_path.join(' → ')}`
      : 'No job has run yet.';
    for (const job of detail.jobs) {
      const c = jobRows.get(job.name);
      if (!c) continue;
      const shown = [job.state, job.attempt, job.duration_ms, job.exit_code, job.reason].join('\u0000');
      if (c.shown === shown) continue;
      c.state.replaceChildren(badge(job.state));
      c.attempt.textContent = job.attempt;
      c.took.textContent = fmtDur(job.duration_ms);
      c.exit.textContent = job.exit_code ?? '';
      c.reason.textContent = job.reason || '';
      c.shown = shown;
    }
    updateGraph(graph, detail, selected);
    if (selected) showJob();
  }

  await render();
  if (!life.alive) return;
  follow(null);
  let ended = TERMINAL.has(detail.deployment.state);
  await every(life, 1000, async () => {
    if (ended) return;
    const next = await api('GET', `/api/v1/deployments/${id}`);
    if (!life.alive) return;
    detail = next;
    ended = TERMINAL.has(detail.deployment.state);
    await render();
  });
}

function appendLine(log, l) {
  const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 8;
  log.append(el('div', { class: l.stream === 'stderr' ? 'err' : null, 'data-seq': l.seq },
    el('span', { class: 'who' }, `${l.job}#${l.attempt}${l.host ? '@' + l.host : ''} `), l.line));
  // A browser tab keeps the newest lines only; `slipway logs` has them all.
  while (log.childElementCount > 5000) log.firstElementChild.remove();
  if (atEnd) log.scrollTop = log.scrollHeight;
}

/**
 * Follow a deployment's log through the API's event stream, read with
 * fetch (EventSource cannot send the token), resuming after the last line
 * seen when the connection drops.
 */
async function streamLogs(id, job, signal, onLine, onEnd, onNote) {
  let after = 0;
  while (!signal.aborted) {
    const silence = new AbortController();
    const abort = () => silence.abort();
    signal.addEventListener('abort', abort);
    let timer = setTimeout(abort, STREAM_SILENCE_MS);
    try {
      const url = `/api/v1/deployments/${id}/logs/stream?after=${after}${job ? `&job=${encodeURIComponent(job)}` : ''}`;
      const res = await fetch(url, { headers: authHeaders({ Accept: 'text/event-stream' }), signal: silence.signal, cache: 'no-store', credentials: 'omit' });
      if (!res.ok) {
        const body = await res.json().catch(() => null);
        onNote(`The log cannot be read: ${(body && body.error && body.error.message) || `HTTP ${res.status}`}`);
        if (res.status < 500) return;
      } else {
        onNote('Streaming…');
        const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
        let buf = '';
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          clearTimeout(timer);
          timer = setTimeout(abort, STREAM_SILENCE_MS);
          buf += value.replace(/\r\n?/g, '\n');
          let cut;
          while ((cut = buf.indexOf('\n\n')) >= 0) {
            const ev = parseEvent(buf.slice(0, cut));
            buf = buf.slice(cut + 2);
            let data = null;
            try { data = JSON.parse(ev.data); } catch (_) { data = null; }
            if (ev.event === 'line' && data) {
              after = data.seq;
              onLine(data);
            } else if (ev.event === 'line') {
              // Not a line this page can read: skipped (`slipway logs` has it); the id still moves on.
              if (/^\d+$/.test(ev.id || '')) after = Number(ev.id);
            } else if (ev.event === 'end') {
              onEnd(data || { state: 'over' });
              return;
            } else if (ev.event === 'error') {
              onNote(`The store could not be read (${ev.data}); retrying.`);
            }
          }
        }
      }
    } catch (e) {
      if (signal.aborted) return;
      onNote('The log stream was cut; reconnecting…');
    } finally {
      clearTimeout(timer);
      signal.removeEventListener('abort', abort);
    }
    await sleep(1000);
  }
}

function parseEvent(frame) {
  const ev = { event: 'message', data: '' };
  const data = [];
  for (const line of frame.split('\n')) {
    if (line === '' || line.startsWith(':')) continue;
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'event') ev.event = value;
    else if (field === 'data') data.push(value);
    else if (field === 'id') ev.id = value;
  }
  ev.data = data.join('\n');
  return ev;
}

async function whyPage(main, life, env, service) {
  main.append(el('h1', {}, `Why ${service} runs what it runs in ${env}`));
  const box = el('div', { id: 'why' });
  main.append(box);
  await every(life, 5000, async () => {
    const w = await api('GET', `/api/v1/services/${encodeURIComponent(env)}/${encodeURIComponent(service)}/why`);
    renderInto(box, w, () => [
      el('dl', { class: 'facts' },
        el('dt', {}, 'Runs'), el('dd', {}, w.running || 'nothing recorded'),
        el('dt', {}, 'Newest seen'), el('dd', {}, w.newest || '—')),
      el('p', { class: 'verdict' }, w.verdict),
      el('h2', {}, 'History'),
      w.history.length ? el('ol', {}, w.history.map((h) => el('li', {}, h))) : el('p', { class: 'muted' }, 'Nothing yet.'),
    ]);
  });
}

async function auditPage(main, life, query) {
  main.append(el('h1', {}, 'Audit log'));
  const envs = await api('GET', '/api/v1/environments').catch(() => []);
  if (!life.alive) return;
  const env = query.get('environment') || '';
  const actor = query.get('actor') || '';
  const envSelect = el('select', { id: 'audit-environment', name: 'environment' }, el('option', { value: '' }, 'any'),
    envs.map((e) => el('option', { value: e.name, selected: e.name === env }, e.name)));
  const actorInput = el('input', { id: 'audit-actor', name: 'actor', value: actor, placeholder: 'token alice', autocomplete: 'off' });
  const form = el('form', { class: 'actions', onsubmit: (ev) => {
    ev.preventDefault();
    const q = new URLSearchParams();
    if (envSelect.value) q.set('environment', envSelect.value);
    if (actorInput.value.trim()) q.set('actor', actorInput.value.trim());
    const hash = `#/audit${q.toString() ? '?' + q : ''}`;
    if (location.hash === hash) view.refresh(); else location.hash = hash;
  } }, el('label', {}, 'Environment', envSelect), el('label', {}, 'Actor', actorInput), el('button', { type: 'submit' }, 'Filter'));
  const box = el('div', { id: 'audit' });
  main.append(form, box);
  const q = new URLSearchParams({ limit: '200' });
  if (env) q.set('environment', env);
  if (actor) q.set('actor', actor);
  await every(life, 5000, async () => {
    const rows = await api('GET', `/api/v1/audit?${q}`);
    renderInto(box, rows, () => rows.length === 0 ? el('p', { class: 'muted' }, 'No entry matches.') : table(['When', 'Actor', 'Environment', 'Action', 'What came of it', 'Status'], rows.map((a) => el('tr', {},
      el('td', {}, fmtTime(a.at)), el('td', {}, a.actor), el('td', {}, a.environment || ''), el('td', { class: 'mono' }, a.action), el('td', {}, a.detail), el('td', {}, a.status)))));
  });
}

function signInPage(main) {
  const input = el('input', { id: 'token', type: 'password', autocomplete: 'off', required: true, spellcheck: 'false' });
  const err = el('p', { id: 'signin-error', class: 'badge s-failed', hidden: !signInNote }, signInNote);
  const form = el('form', { class: 'signin card', onsubmit: async (ev) => {
    ev.preventDefault();
    const token = input.value.trim();
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    try {
      me = await api('GET', '/api/v1/whoami');
      signInNote = '';
      say(`Signed in as ${me.actor}`);
      // Leaving the sign-in page's address routes by itself.
      if (location.hash.startsWith('#/signin')) location.hash = '#/';
      else route();
    } catch (e) {
      sessionStorage.removeItem(TOKEN_KEY);
      err.textContent = e.status === 401 ? `That token was refused: ${e.message}` : e.message;
      err.hidden = false;
      input.focus();
    }
  } },
  el('h1', {}, 'Sign in'),
  el('p', {}, 'Paste an API token (', el('code', {}, 'slipway token create'), '). It is kept in this browser tab only, until the tab closes or you sign out, and sent only to this Slipway in a request header: never in a URL or a cookie.'),
  el('label', {}, 'API token', input), err,
  el('div', { class: 'actions' }, el('button', { type: 'submit', class: 'primary' }, 'Sign in')));
  main.append(form);
  input.focus();
}

function showWho() {
  const who = document.getElementById('who');
  if (!me) { who.replaceChildren(); return; }
  const roles = Object.entries(me.roles).map(([env, role]) => `${role} in ${env === '*' ? 'every environment' : env}`).join(', ');
  const out = [];
  if (me.open) out.push(el('span', { id: 'open-note' }, 'No token exists yet: the API is open to anyone who reaches it (approvals excepted).'));
  else out.push(el('span', { id: 'me' }, `Signed in as ${me.actor}`, roles ? ` (${roles})` : ''));
  if (sessionStorage.getItem(TOKEN_KEY)) out.push(el('button', { id: 'signout', onclick: signOut }, 'Sign out'));
  else out.push(el('a', { href: '#/signin' }, 'Sign in with a token'));
  who.replaceChildren(...out);
}

async function signOut() {
  sessionStorage.removeItem(TOKEN_KEY);
  me = null;
  say('Signed out.');
  await start();
}

// ---- routing -------------------------------------------------------------

function route() {
  if (view) view.stop();
  const life = lifetime();
  view = life;
  showWho();
  // Each page writes into a container of its own: a page still finishing
  // a call when another opens writes into a detached one.
  const main = el('div', { class: 'page' });
  document.getElementById('main').replaceChildren(main);
  const hash = location.hash === '#main' ? '' : location.hash;
  const [path, q] = (hash.replace(/^#/, '') || '/').split('?');
  const query = new URLSearchParams(q || '');
  const parts = path.split('/').filter(Boolean).map((p) => { try { return decodeURIComponent(p); } catch (_) { return p; } });
  for (const a of document.querySelectorAll('.top nav a')) {
    const target = a.getAttribute('href').replace(/^#/, '');
    if ((target === '/' && parts.length === 0) || (target !== '/' && path.startsWith(target))) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  let page;
  if (!me || parts[0] === 'signin') page = () => signInPage(main);
  else if (parts.length === 0) page = () => overviewPage(main, life);
  else if (parts[0] === 'deployments' && parts.length === 1) page = () => deploymentsPage(main, life, query);
  else if (parts[0] === 'deployments' && /^\d+$/.test(parts[1] || '')) page = () => deploymentPage(main, life, Number(parts[1]));
  else if (parts[0] === 'why' && parts.length === 3) page = () => whyPage(main, life, parts[1], parts[2]);
  else if (parts[0] === 'audit') page = () => auditPage(main, life, query);
  else page = () => main.append(el('h1', {}, 'No such page'), el('p', {}, el('a', { href: '#/' }, 'Back to the overview')));
  document.title = `Slipway${parts.length ? ' · ' + parts.join(' ') : ''}`;
  Promise.resolve().then(page).catch((e) => {
    if (life.alive && e.status !== 401) main.append(el('p', { class: 'badge s-failed', id: 'page-error' }, e.message));
  });
}

async function start() {
  try {
    me = await api('GET', '/api/v1/whoami');
  } catch (e) {
    me = null;
    if (e.status === 401 && sessionStorage.getItem(TOKEN_KEY)) {
      sessionStorage.removeItem(TOKEN_KEY);
      signInNote = `Your token was refused: ${e.message}`;
    } else if (e.status !== 401) {
      signInNote = e.message;
    }
  }
  route();
}

window.addEventListener('hashchange', () => {
  if (location.hash === '#main') return;
  document.getElementById('status').replaceChildren();
  route();
});
// The skip link moves focus; it is no page of its own.
document.getElementById('skip').addEventListener('click', (ev) => { ev.preventDefault(); document.getElementById('main').focus(); });
start();
