// The search page: plain JS against the JSON API (see ernievil2/serve/app.py); no external code.
"use strict";

const TEXT = {
  zh: {
    title: "ERNIE-ViL 2.0 图文搜索", placeholder: "输入描述，例如：左边有一个红色的圆形",
    mode_images: "搜图片", mode_captions: "搜描述", top: "前", search: "搜索",
    upload: "上传图片", image_search: "以图搜图", classify: "零样本分类",
    classes_title: "零样本分类", other: "English",
    info: (n, c) => `索引：${n} 张图片 · ${c} 个类别`,
    searching: "搜索中…", classifying: "分类中…",
    found: (n, q) => `“${q}”的前 ${n} 个结果`, none: "没有结果",
    score: "相似度",
  },
  en: {
    title: "ERNIE-ViL 2.0 image-text search", placeholder: "Describe an image, e.g. a red circle on the left",
    mode_images: "Images", mode_captions: "Captions", top: "Top", search: "Search",
    upload: "Upload an image", image_search: "Search by image", classify: "Zero-shot classify",
    classes_title: "Zero-shot classification", other: "中文",
    info: (n, c) => `index: ${n} images · ${c} classes`,
    searching: "Searching…", classifying: "Classifying…",
    found: (n, q) => `top ${n} for “${q}”`, none: "no results",
    score: "score",
  },
};

let lang = "zh";
let info = null;
const $ = (id) => document.getElementById(id);

function t(key, ...args) {
  const v = TEXT[lang][key];
  return typeof v === "function" ? v(...args) : v;
}

function applyLanguage() {
  document.documentElement.lang = lang;
  document.querySelectorAll("[data-t]").forEach((el) => { el.textContent = t(el.dataset.t); });
  document.querySelectorAll("[data-t-placeholder]").forEach((el) => { el.placeholder = t(el.dataset.tPlaceholder); });
  $("lang-toggle").textContent = t("other");
  document.title = t("title");
  if (info) $("info").textContent = t("info", info.images, info.classes.length);
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function api(url, options) {
  const response = await fetch(url, options);
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function renderHits(result, label) {
  const grid = $("grid");
  grid.replaceChildren();
  for (const hit of result.hits) {
    const card = document.createElement("figure");
    card.className = "hit";
    card.dataset.rank = hit.rank;
    card.dataset.row = hit.row;
    card.dataset.imageId = hit.image_id;
    const img = document.createElement("img");
    img.src = hit.thumbnail;
    img.alt = hit.caption || hit.image_id;
    img.loading = "lazy";
    const caption = document.createElement("figcaption");
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = `#${hit.rank} · ${t("score")} ${hit.score.toFixed(3)}`;
    const text = document.createElement("div");
    text.className = "caption";
    text.textContent = hit.caption || "";
    const id = document.createElement("div");
    id.className = "id";
    id.textContent = hit.image_id;
    caption.append(score, text, id);
    card.append(img, caption);
    grid.append(card);
  }
  $("status").textContent = result.hits.length ? t("found", result.hits.length, label) : t("none");
}

function k() {
  return Math.max(1, Math.min(Number($("k").value) || 10, info ? info.limits.max_k : 100));
}

async function searchText(event) {
  event.preventDefault();
  const q = $("q").value.trim();
  if (!q) return;
  const endpoint = $("mode").value === "captions" ? "/api/captions" : "/api/search";
  showError("");
  $("status").textContent = t("searching");
  try {
    renderHits(await api(`${endpoint}?q=${encodeURIComponent(q)}&k=${k()}`), q);
  } catch (e) {
    $("status").textContent = "";
    showError(e.message);
  }
}

function uploadBody() {
  const form = new FormData();
  form.append("image", $("image").files[0]);
  return { method: "POST", body: form };
}

async function searchImage() {
  showError("");
  $("status").textContent = t("searching");
  try {
    renderHits(await api(`/api/search/image?k=${k()}`, uploadBody()), $("image").files[0].name);
  } catch (e) {
    $("status").textContent = "";
    showError(e.message);
  }
}

async function classify() {
  showError("");
  const before = $("status").textContent;  // the grid's line: the grid stays
  $("status").textContent = t("classifying");
  try {
    const result = await api("/api/classify?k=5", uploadBody());
    const list = $("class-list");
    list.replaceChildren();
    const best = Math.max(1e-6, ...result.classes.map((c) => c.score));
    for (const c of result.classes) {
      const item = document.createElement("li");
      item.textContent = `${c.name}  ${c.score.toFixed(3)}`;
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.style.width = `${Math.max(2, Math.round(160 * Math.max(0, c.score) / best))}px`;  // relative to the best
      item.append(bar);
      list.append(item);
    }
    $("classes").hidden = false;
    $("status").textContent = before;
  } catch (e) {
    $("status").textContent = "";
    showError(e.message);
  }
}

function imageChosen() {
  const file = $("image").files[0];
  $("image-search").disabled = !file;
  $("classify").disabled = !file || !info || !info.classes.length;
  if (file) {
    $("preview").src = URL.createObjectURL(file);
    $("preview").hidden = false;
    if (file.size > info.limits.max_upload_bytes) showError(`${file.name}: > ${info.limits.max_upload_bytes} bytes`);
  }
}

async function start() {
  const asked = new URLSearchParams(location.search).get("lang");
  $("search-form").addEventListener("submit", searchText);
  $("image").addEventListener("change", imageChosen);
  $("image-search").addEventListener("click", searchImage);
  $("classify").addEventListener("click", classify);
  $("lang-toggle").addEventListener("click", () => { lang = lang === "zh" ? "en" : "zh"; applyLanguage(); });
  try {
    info = await api("/api/info");
    lang = TEXT[asked] ? asked : info.lang;
    $("q").maxLength = info.limits.max_query_chars;
    $("k").max = info.limits.max_k;
  } catch (e) {
    showError(e.message);
  }
  applyLanguage();
  document.body.dataset.ready = "1";
}

start();
