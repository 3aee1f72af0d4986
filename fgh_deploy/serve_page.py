"""The search page ``fgh serve`` answers ``GET /`` with: one self-contained HTML document.

Drop or pick an image; the page posts it to ``search`` and shows the query and its top k as
thumbnails with rank, Hamming distance and path, in the look of the HTML report
(:func:`fgh_deploy.report.report_css`: tie groups share a shaded band). No external assets;
URLs are relative, so the page works behind a proxy that serves the service under a sub-path.
Thumbnails are fetched with the bearer token when one is set, then shown from blob URLs.
"""

from __future__ import annotations

import html

from .report import report_css
from .version import __version__

THUMB_SIZE = 96

_PAGE_CSS = """
#drop { border: 2px dashed #9aa3ad; border-radius: 8px; background: #fff; padding: 18px; margin: 12px 0;
        display: flex; flex-wrap: wrap; gap: 12px 20px; align-items: center; }
#drop.over { border-color: #2f6fd6; background: #eef4ff; }
#drop label { color: #525c69; }
#drop input[type=number] { width: 5em; }
#status { color: #525c69; min-height: 1.4em; }
#status.error { color: var(--bad); }
"""

_SCRIPT = """
const $ = (id) => document.getElementById(id);
const objectUrls = [];
function setStatus(text, error) { $('status').textContent = text; $('status').className = error ? 'error' : ''; }
function authHeaders(extra) {
  const headers = Object.assign({}, extra);
  const token = $('token') ? $('token').value.trim() : '';
  if (token) headers['Authorization'] = 'Bearer ' + token;
  return headers;
}
function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;  // paths are text, never markup
  return node;
}
function figure(src, caption) {
  const fig = el('figure'), frame = el('div', 'frame'), img = el('img');
  img.alt = caption.path;
  if (src instanceof Promise) src.then((url) => { img.src = url; }, () => { frame.replaceChildren(el('div', 'missing', 'unavailable')); });
  else img.src = src;
  frame.appendChild(img);
  const cap = el('figcaption');
  cap.appendChild(el('span', 'rank', caption.rank));
  if (caption.distance !== undefined) cap.appendChild(document.createTextNode(' · d=' + caption.distance));
  cap.appendChild(el('span', 'path', caption.path));
  fig.append(frame, cap);
  return fig;
}
async function thumbnail(row) {
  const response = await fetch('images/' + row + '?size=' + THUMB_SIZE, {headers: authHeaders({})});
  if (!response.ok) throw new Error(response.statusText);
  const url = URL.createObjectURL(await response.blob());
  objectUrls.push(url);
  return url;
}
function render(file, body) {
  objectUrls.splice(0).forEach((url) => URL.revokeObjectURL(url));
  const query = body.queries[0];
  const probe = el('div', 'probe');
  const queryUrl = URL.createObjectURL(file);
  objectUrls.push(queryUrl);
  probe.appendChild(figure(queryUrl, {rank: 'query', path: query.query}));
  const hits = el('ol', 'hits');
  for (const hit of query.results) {
    const item = el('li', hit.tie_group % 2 ? 'band' : '');
    item.title = 'row ' + hit.row + ', tie group ' + hit.tie_group;
    item.appendChild(figure(thumbnail(hit.row), {rank: '#' + hit.rank, distance: hit.distance, path: hit.path}));
    hits.appendChild(item);
  }
  const article = el('article', 'query');
  article.append(probe, query.results.length ? hits : el('p', 'note', 'no hits'));
  $('results').replaceChildren(article);
  $('facts').replaceChildren(...[['index', body.index], ['database', body.ntotal + ' images · ' + body.bits + '-bit codes'],
    ['ranking', 'Hamming ' + body.tie_rule + ' (shaded bands group hits at equal distance)']]
    .flatMap(([name, value]) => [el('dt', '', name), el('dd', '', value)]));
  setStatus(query.results.length + ' hits for ' + query.query);
}
async function search(file) {
  if (!file) return;
  setStatus('searching ' + file.name + ' …');
  const params = new URLSearchParams({k: $('k').value, name: file.name});
  try {
    const response = await fetch('search?' + params, {method: 'POST', body: file,
      headers: authHeaders({'Content-Type': file.type || 'application/octet-stream'})});
    const body = await response.json().catch(() => ({detail: response.statusText}));
    if (!response.ok) {
      const detail = typeof body.detail === 'string' ? body.detail : JSON.stringify(body.detail);
      setStatus(response.status + ': ' + detail, true);
      return;
    }
    render(file, body);
  } catch (error) {
    setStatus('the server did not answer: ' + error, true);
  }
}
$('file').addEventListener('change', () => search($('file').files[0]));
const drop = $('drop');
drop.addEventListener('dragover', (event) => { event.preventDefault(); drop.classList.add('over'); });
drop.addEventListener('dragleave', () => drop.classList.remove('over'));
drop.addEventListener('drop', (event) => {
  event.preventDefault();
  drop.classList.remove('over');
  search(event.dataTransfer.files[0]);
});
"""


def page_html(*, max_k: int, token_required: bool, tie_rule: str) -> str:
    """The search page (see the module docstring).

    Args:
        max_k: the largest k the server accepts (the k field's maximum).
        token_required: show a field for the bearer token.
        tie_rule: the served index's order of hits at equal distance.
    """
    token = ('<label>token <input id="token" type="password" autocomplete="off" '
             'placeholder="bearer token"></label>') if token_required else ""
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',  # no favicon request
        "<title>fgh search</title>",
        f"<style>{report_css(THUMB_SIZE)}{_PAGE_CSS}</style></head><body>",
        "<header><h1>fgh search</h1>",
        f'<p class="note">Drop an image here or pick one: its nearest images by exact Hamming distance '
        f"({html.escape(tie_rule)}).</p><dl id=\"facts\"></dl></header>",
        '<form id="drop" onsubmit="return false">',
        '<label>image <input id="file" type="file" accept="image/*"></label>',
        f'<label>k <input id="k" type="number" min="1" max="{max_k}" value="10"></label>',
        token,
        "</form>",
        '<div id="status"></div>',
        '<section id="results"></section>',
        f"<footer>fgh {__version__} · fine-grained image hashing</footer>",
        f"<script>const THUMB_SIZE = {THUMB_SIZE};{_SCRIPT}</script>",
        "</body></html>",
        "",
    ])
