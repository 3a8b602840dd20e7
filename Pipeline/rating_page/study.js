// The study page's behaviour: who the rater is, the current trial, answers by click or key.
// The server keeps every answer and the position (GET /api/state); the page holds no state of its
// own beyond the rater id, so a reload or another browser continues at the first unanswered trial.
"use strict";

const RATER_KEY = "sddg-rater";
let study = null;      // GET /api/study
let current = null;    // the state of the trial on screen
let shownAt = 0;       // when the trial's images finished loading (response time)
let busy = false;      // an answer is on its way: ignore further input

const $ = (id) => document.getElementById(id);

function setState(name) {
  document.body.dataset.state = name;
  for (const id of ["start", "trial", "done"]) $(id).hidden = id !== name;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function raterFromUrl() {
  return new URLSearchParams(window.location.search).get("rater");
}

function rememberRater(rater) {
  const url = new URL(window.location.href);
  url.searchParams.set("rater", rater);
  window.history.replaceState(null, "", url);
  try { window.localStorage.setItem(RATER_KEY, rater); } catch (e) { /* private mode: the URL keeps it */ }
  $("rater-name").textContent = rater;
  $("rater-note").hidden = false;
}

async function getJson(url, options) {
  const response = await fetch(url, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(body.error || `${response.status} ${response.statusText}`);
    error.state = body.state;
    throw error;
  }
  return body;
}

function updateProgress(state) {
  const share = state.total ? state.answered / state.total : 0;
  $("progress-wrap").hidden = false;
  $("progress-fill").style.width = `${(100 * share).toFixed(1)}%`;
  $("progress").setAttribute("aria-valuenow", String(Math.round(100 * share)));
  $("progress-text").textContent = `${state.answered} / ${state.total}`;
}

function render(state) {
  current = state;
  updateProgress(state);
  if (state.done) {
    $("done-count").textContent = String(state.total);
    setState("done");
    return;
  }
  busy = true;  // until the images are on screen: no blind answers
  document.body.classList.add("busy");
  const trial = state.trial;
  const size = study.shown_size;
  $("class-label").textContent = trial.label_name === String(trial.label)
    ? trial.label_name : `${trial.label_name} (${trial.label})`;
  const images = $("images");
  images.replaceChildren();
  let pending = trial.images.length;
  const loaded = () => { pending -= 1; if (pending === 0) { shownAt = performance.now(); busy = false; document.body.classList.remove("busy"); } };
  trial.images.forEach((src, slot) => {
    const img = new Image(size, size);
    img.alt = trial.kind === "choice" ? (slot === 0 ? "left image" : "right image") : "image";
    img.addEventListener("load", loaded);
    img.addEventListener("error", loaded);
    img.src = src;
    if (trial.kind === "choice") {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "choice";
      button.id = slot === 0 ? "left" : "right";
      button.append(img, Object.assign(document.createElement("span"),
        { innerHTML: slot === 0 ? "<kbd>&larr;</kbd> or <kbd>F</kbd>" : "<kbd>&rarr;</kbd> or <kbd>J</kbd>" }));
      button.addEventListener("click", () => answer({ choice: slot === 0 ? "left" : "right" }));
      images.append(button);
    } else {
      const frame = document.createElement("div");
      frame.className = "single";
      frame.id = "single";
      frame.append(img);
      images.append(frame);
    }
  });
  const choice = trial.kind === "choice";
  $("question").textContent = choice ? "Which image is real?" : "How real does this image look?";
  $("rating-buttons").hidden = choice;
  $("keys").innerHTML = choice
    ? "Click the real image, or press <kbd>&larr;</kbd>/<kbd>F</kbd> (left) or <kbd>&rarr;</kbd>/<kbd>J</kbd> (right)."
    : "Click a score or press <kbd>1</kbd> to <kbd>5</kbd>.";
  $("trial").dataset.position = String(trial.position);
  $("trial").dataset.kind = trial.kind;
  setState("trial");
}

async function answer(given) {
  if (busy || !current || current.done) return;
  busy = true;
  document.body.classList.add("busy");
  if (given.choice) $(given.choice).classList.add("picked");
  const body = { rater: current.rater, position: current.trial.position, ms: Math.round(performance.now() - shownAt), ...given };
  try {
    const state = await getJson("/api/answer", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    showError("");
    render(state);
  } catch (error) {
    showError(`Your answer was not saved: ${error.message}`);
    busy = false;
    document.body.classList.remove("busy");
    if (error.state) render(error.state);
  }
}

document.addEventListener("keydown", (event) => {
  if (!current || current.done || event.altKey || event.ctrlKey || event.metaKey) return;
  if (document.body.dataset.state !== "trial") return;
  const key = event.key.length === 1 ? event.key.toLowerCase() : event.key;
  if (current.trial.kind === "choice") {
    if (key === "ArrowLeft" || key === "f") { event.preventDefault(); answer({ choice: "left" }); }
    else if (key === "ArrowRight" || key === "j") { event.preventDefault(); answer({ choice: "right" }); }
  } else if (["1", "2", "3", "4", "5"].includes(key)) {
    event.preventDefault();
    answer({ score: Number(key) });
  }
});

for (const button of document.querySelectorAll("#rating-buttons button")) {
  button.addEventListener("click", () => answer({ score: Number(button.dataset.score) }));
}

async function begin(rater) {
  rememberRater(rater);
  try {
    render(await getJson(`/api/state?rater=${encodeURIComponent(rater)}`));
  } catch (error) {
    showError(error.message);
    setState("start");
  }
}

$("start-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const rater = $("rater-id").value.trim();
  if (rater) begin(rater);
});

$("switch-rater").addEventListener("click", (event) => {
  event.preventDefault();
  try { window.localStorage.removeItem(RATER_KEY); } catch (e) { /* nothing stored */ }
  window.location.href = "/";
});

async function main() {
  try {
    study = await getJson("/api/study");
  } catch (error) {
    showError(`The study server did not answer: ${error.message}`);
    return;
  }
  $("dataset-name").textContent = study.dataset;
  $("scale-note").textContent =
    `Images are shown ${study.scale}\u00d7 their native ${study.image_size}\u00d7${study.image_size} pixels ` +
    `(${study.shown_size}\u00d7${study.shown_size} on screen), enlarged with nearest neighbour: ` +
    `each square block is one pixel of the image.`;
  let rater = raterFromUrl();
  if (!rater) {
    try { rater = window.localStorage.getItem(RATER_KEY); } catch (e) { rater = null; }
  }
  if (rater) begin(rater);
  else setState("start");
}

main();
