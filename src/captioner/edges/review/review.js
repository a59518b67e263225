// The review page: cards built from the server's JSON. Every text from a bucket or a
// model (object names, captions, alt text, tags, who) goes in with textContent or as an
// attribute value set from script, never as markup: no innerHTML anywhere in this file.
"use strict";
(() => {
  const csrf = document.querySelector('meta[name="captioner-csrf"]').content;
  const config = JSON.parse(document.querySelector('meta[name="captioner-config"]').content);
  const grid = document.getElementById("grid");
  const progress = document.getElementById("progress");
  const more = document.getElementById("more");
  const moreButton = document.getElementById("load-more");
  const statusFilter = document.getElementById("status");
  const folderFilter = document.getElementById("folder");
  const textFilter = document.getElementById("text");
  const folderList = document.getElementById("folder-list");
  const state = { cursor: "", done: false, loading: false, shown: 0, scanned: 0, version: 0 };

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (key === "class") node.className = value;
      else if (key.startsWith("data-") || key.startsWith("aria-")) node.setAttribute(key, value);
      else node[key] = value;
    }
    node.append(...children.filter((child) => child !== null && child !== undefined));
    return node;
  }

  async function api(path, body) {
    const options = { credentials: "same-origin" };
    if (body !== undefined) {
      options.method = "POST";
      options.headers = { "Content-Type": "application/json", "X-Captioner-CSRF": csrf };
      options.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, options);
    } catch (error) {
      return { status: 0, data: { error: "the review server is not answering (stopped?)" } };
    }
    let data = {};
    try {
      data = await response.json();
    } catch (error) {
      data = { error: response.statusText };
    }
    return { status: response.status, data };
  }

  // ------------------------------------------------------------ listing

  function filters() {
    return { status: statusFilter.value, folder: folderFilter.value.trim(), text: textFilter.value.trim() };
  }

  function showProgress() {
    const end = state.done ? "end of the listing" : "more as you scroll";
    progress.textContent = `${state.shown} images shown · ${state.scanned} objects listed · ${end}`;
    more.hidden = state.done;
  }

  async function load() {
    if (state.loading || state.done) return;
    state.loading = true;
    const version = state.version;
    const params = new URLSearchParams({ ...filters(), cursor: state.cursor });
    const { status, data } = await api("/api/items?" + params);
    if (version !== state.version) return; // the filters changed meanwhile
    state.loading = false;
    if (status !== 200) {
      progress.textContent = "Listing failed: " + (data.error || status);
      return;
    }
    for (const item of data.items) grid.append(card(item));
    state.shown += data.items.length;
    state.scanned += data.scanned;
    state.cursor = data.cursor || "";
    state.done = !data.cursor;
    showProgress();
    if (!state.done && inView(more)) load(); // a filter that matches little: read on
  }

  function inView(node) {
    const box = node.getBoundingClientRect();
    return box.top < window.innerHeight && box.bottom >= 0;
  }

  function restart() {
    state.version += 1;
    Object.assign(state, { cursor: "", done: false, loading: false, shown: 0, scanned: 0 });
    grid.replaceChildren();
    progress.textContent = "Listing…";
    load();
  }

  async function suggestFolders() {
    const typed = folderFilter.value;
    const parent = typed.includes("/") ? typed.slice(0, typed.lastIndexOf("/") + 1) : "";
    const { status, data } = await api("/api/folders?" + new URLSearchParams({ folder: parent }));
    if (status !== 200) return;
    folderList.replaceChildren(...data.folders.map((folder) => el("option", { value: folder })));
  }

  let typing = null;
  function restartSoon() {
    clearTimeout(typing);
    typing = setTimeout(restart, 300);
  }

  // ------------------------------------------------------------ cards

  const LABELS = { never: "never captioned", stale: "stale", human: "by a person" };

  function card(item) {
    const node = el("article", { class: "card", tabIndex: 0, "data-name": item.name });
    node.item = item;
    render(node);
    return node;
  }

  function badges(item) {
    return el(
      "div",
      { class: "badges" },
      ...item.kinds.map((kind) => {
        const text = kind === "error" ? item.status : LABELS[kind] || kind;
        return el("span", { class: `badge ${kind}` }, text);
      }),
    );
  }

  function thumbnail(item) {
    const params = new URLSearchParams({ name: item.name, generation: item.generation });
    const img = el("img", { alt: item.alt || item.caption || "", loading: "lazy", src: "/thumb?" + params });
    img.addEventListener("error", () => img.replaceWith(el("div", { class: "missing" }, "no preview")));
    return img;
  }

  function texts(item) {
    return [
      el("p", { class: "caption" }, item.caption || "(no caption)"),
      item.alt ? el("p", { class: "alt" }, "alt: " + item.alt) : null,
      item.tags.length ? el("p", { class: "tags" }, item.tags.join(", ")) : null,
      item.by ? el("p", { class: "by" }, "by " + item.by) : null,
    ];
  }

  function render(node) {
    const item = node.item;
    const parts = [thumbnail(item), el("div", { class: "name" }, item.name), badges(item)];
    if (node.editing) parts.push(editor(node));
    else parts.push(...texts(item));
    if (node.notice) parts.push(el("p", { class: "notice", role: "alert" }, node.notice));
    if (node.again) parts.push(againPanel(node));
    if (!config.read_only && !node.editing) parts.push(buttons(node));
    node.replaceChildren(...parts.filter(Boolean));
  }

  function button(text, action, props) {
    const b = el("button", { type: "button", ...(props || {}) }, text);
    b.addEventListener("click", action);
    return b;
  }

  function approvable(item) {
    return item.status === "ok" && item.current && item.caption && !item.kinds.includes("human");
  }

  function buttons(node) {
    const item = node.item;
    return el(
      "div",
      { class: "actions" },
      button("Edit", () => startEdit(node), { class: "edit" }),
      approvable(item) ? button("Approve", () => approve(node), { class: "approve" }) : null,
      button("Caption again", () => openAgain(node), { class: "again" }),
    );
  }

  function editor(node) {
    const item = node.item;
    const draft = node.draft || { caption: item.caption || "", alt: item.alt || "", tags: item.tags.join(", ") };
    const form = el(
      "form",
      { class: "editor" },
      el("label", {}, "Caption", el("textarea", { name: "caption", rows: 3, value: draft.caption })),
      el("label", {}, "Alt text", el("input", { name: "alt", value: draft.alt })),
      el("label", {}, "Tags", el("input", { name: "tags", value: draft.tags })),
      el(
        "div",
        { class: "actions" },
        el("button", { type: "submit", class: "save" }, "Save"),
        button("Cancel", () => stopEdit(node), { class: "cancel" }),
      ),
    );
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      saveEdit(node);
    });
    return form;
  }

  function readDraft(node) {
    const form = node.querySelector("form.editor");
    if (!form) return null;
    return { caption: form.caption.value, alt: form.alt.value, tags: form.tags.value };
  }

  function startEdit(node) {
    if (config.read_only) return;
    node.editing = true;
    node.notice = "";
    render(node);
    node.querySelector("textarea").focus();
  }

  function stopEdit(node) {
    Object.assign(node, { editing: false, draft: null, again: null, notice: "" });
    render(node);
    node.focus();
  }

  async function write(node, path, extra) {
    const item = node.item;
    const draft = readDraft(node);
    const body = { name: item.name, generation: item.generation, metageneration: item.metageneration, ...extra };
    node.classList.add("busy");
    const { status, data } = await api(path, body);
    node.classList.remove("busy");
    if (status === 200) {
      Object.assign(node, { item: data.item, editing: false, draft: null, again: null, notice: "Saved." });
    } else if (status === 409) {
      // Someone changed it meanwhile: show what it holds now, keep what the person
      // typed, and let them decide (a second save is made against the new state).
      const now = data.item.caption || "(no caption)";
      Object.assign(node, { item: data.item, draft, notice: `${data.conflict} Now: “${now}”` });
    } else {
      if (data.item) node.item = data.item;
      Object.assign(node, { draft, notice: "Not saved: " + (data.error || status) });
    }
    render(node);
    const field = node.querySelector("textarea");
    (field || node).focus();
  }

  function saveEdit(node) {
    const draft = readDraft(node);
    if (draft) write(node, "/api/save", draft);
  }

  function approve(node) {
    if (!config.read_only && approvable(node.item)) write(node, "/api/save", { approve: true });
  }

  // ------------------------------------------------------------ caption again

  function openAgain(node) {
    node.again = { model: config.model, prompt: "", answer: null };
    node.notice = "";
    render(node);
    node.querySelector(".again-panel input").focus();
  }

  // With no prompt typed, the server asks what captioner would ask for this image: the
  // prompt of its rule (CAPTION_RULES), else the default. The placeholder shows which.
  function promptHint(item) {
    const rule = item.rule_now;
    if (rule === null || rule === undefined) {
      return "A rule of CAPTION_RULES excludes this image: type a prompt to caption it anyway.";
    }
    const which = rule === "default" ? "the default prompt" : `the prompt of rule “${rule}”`;
    return `Empty: ${which}, as for this image's captions: ${(config.prompts || {})[rule] || ""}`;
  }

  function asked(answer) {
    if (answer.typed) return "your prompt";
    return answer.rule === "default" ? "the default prompt" : `rule ${answer.rule}`;
  }

  async function runAgain(node, model, prompt) {
    const again = node.again;
    Object.assign(again, { model: model.value, prompt: prompt.value, answer: null });
    node.notice = "Captioning again…";
    render(node);
    const item = node.item;
    const { status, data } = await api("/api/recaption", {
      name: item.name, generation: item.generation, metageneration: item.metageneration,
      model: again.model, prompt: again.prompt,
    });
    if (status === 200 && data.blocked) {
      // Nothing to keep: a blocked answer is no caption, and never becomes a person's.
      node.notice = `Blocked: ${data.model} (${asked(data)}) gave no caption for this image ` +
        `(${data.blocked}). Nothing to keep; nothing was written.`;
    } else if (status === 200) {
      node.notice = "";
      again.answer = data;
    } else {
      node.notice = "Not captioned again: " + (data.error || status);
    }
    render(node);
  }

  function againPanel(node) {
    const again = node.again;
    const model = el("input", { name: "model", value: again.model });
    const prompt = el("textarea", {
      name: "prompt", rows: 3, value: again.prompt, placeholder: promptHint(node.item),
    });
    const run = button("Run", () => runAgain(node, model, prompt), { class: "run" });
    const panel = el("div", { class: "again-panel" }, el("label", {}, "Model", model),
      el("label", {}, "Prompt", prompt), el("div", { class: "actions" }, run,
        button("Close", () => stopEdit(node), { class: "close" })));
    if (again.answer) panel.append(sideBySide(node, again.answer));
    return panel;
  }

  function keepCurrent(node) {
    Object.assign(node, { editing: false, draft: null, again: null });
    node.notice = "Kept the current caption: nothing was written.";
    render(node);
    node.focus();
  }

  function sideBySide(node, answer) {
    const item = node.item;
    const now = answer.new;
    const column = (title, data, keep) => el("div", { class: "column" }, el("h3", {}, title),
      ...texts({ caption: data.caption, alt: data.alt, tags: data.tags || [] }), keep);
    return el("div", { class: "side-by-side" },
      column("Current", item, button("Keep current", () => keepCurrent(node), { class: "keep-current" })),
      column(`New (${answer.model}, ${asked(answer)})`, now,
        button("Keep new", () => write(node, "/api/keep", { answer: answer.answer }), { class: "keep-new" })));
  }

  // ------------------------------------------------------------ keyboard

  function cards() {
    return Array.from(grid.querySelectorAll(".card"));
  }

  function current() {
    return document.activeElement && document.activeElement.closest ? document.activeElement.closest(".card") : null;
  }

  function step(delta) {
    const all = cards();
    if (!all.length) return;
    const here = all.indexOf(current());
    const next = all[Math.max(0, Math.min(all.length - 1, here < 0 ? 0 : here + delta))];
    next.focus();
    next.scrollIntoView({ block: "nearest" });
    if (next === all[all.length - 1]) load();
  }

  document.addEventListener("keydown", (event) => {
    const node = current();
    const inField = event.target.matches("input, textarea, select");
    if (event.key === "Escape" && node && (node.editing || node.again)) {
      stopEdit(node);
      return;
    }
    if ((event.ctrlKey || event.metaKey) && (event.key === "Enter" || event.key === "s")) {
      if (node && node.editing) {
        event.preventDefault();
        saveEdit(node);
      }
      return;
    }
    if (inField || event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.key === "j" || event.key === "ArrowRight") step(1);
    else if (event.key === "k" || event.key === "ArrowLeft") step(-1);
    else if ((event.key === "e" || event.key === "Enter") && node) startEdit(node);
    else if (event.key === "a" && node) approve(node);
    else return;
    event.preventDefault();
  });

  // ------------------------------------------------------------ start

  statusFilter.addEventListener("change", restart);
  folderFilter.addEventListener("input", () => {
    suggestFolders();
    restartSoon();
  });
  textFilter.addEventListener("input", restartSoon);
  document.getElementById("filters").addEventListener("submit", (event) => {
    event.preventDefault();
    restart();
  });
  moreButton.addEventListener("click", load);
  new IntersectionObserver((entries) => {
    if (entries.some((entry) => entry.isIntersecting)) load();
  }).observe(more);
  suggestFolders();
  load();
})();
