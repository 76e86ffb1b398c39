// The page of `res2net serve`: send the chosen image to /predict, show the top-5 and the CAM.
// Class names come from the model's files: they are set as text, never as HTML.
"use strict";

const drop = document.getElementById("drop");
const input = document.getElementById("file");
const statusLine = document.getElementById("status");
const errorBox = document.getElementById("error");
const result = document.getElementById("result");
const preview = document.getElementById("preview");
const cam = document.getElementById("cam");
const SMALL = 224; // images narrower than this are shown enlarged, pixel by pixel

fetch("/health")
  .then((r) => r.json())
  .then((h) => {
    document.getElementById("model").textContent = `${h.model}: ${h.classes} classes`;
  })
  .catch(() => {
    document.getElementById("model").textContent = "the server did not answer";
  });

for (const img of [preview, cam]) {
  img.addEventListener("load", () => img.classList.toggle("small", img.naturalWidth < SMALL));
}

function clearResult() {
  result.hidden = true;
  document.getElementById("top").replaceChildren();
  for (const img of [preview, cam]) {
    if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
    img.removeAttribute("src");
  }
  errorBox.hidden = true;
  errorBox.textContent = "";
}

function showError(message) {
  clearResult();
  statusLine.textContent = "";
  errorBox.textContent = message;
  errorBox.hidden = false;
}

function showTop(top) {
  const list = document.getElementById("top");
  for (const entry of top) {
    const row = document.createElement("li");
    row.className = "class-row";
    const label = document.createElement("div");
    label.className = "label";
    const name = document.createElement("span");
    name.className = "class-name";
    name.textContent = entry.class;
    const prob = document.createElement("span");
    prob.textContent = `${(entry.prob * 100).toFixed(1)}%`;
    label.append(name, prob);
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.style.width = `${Math.max(0.5, entry.prob * 100)}%`;
    row.append(label, bar);
    list.append(row);
  }
}

async function classify(file) {
  clearResult();
  statusLine.textContent = `classifying ${file.name}...`;
  let answer;
  try {
    const response = await fetch("/predict?topk=5&cam=1", {
      method: "POST",
      headers: { "Content-Type": file.type || "application/octet-stream" },
      body: file,
    });
    answer = await response.json();
    if (!response.ok) {
      showError(`${file.name}: ${answer.error || `error ${response.status}`}`);
      return;
    }
  } catch (err) {
    showError(`${file.name}: the request failed (${err})`);
    return;
  }
  showTop(answer.top);
  preview.src = URL.createObjectURL(file);
  cam.src = `data:image/png;base64,${answer.cam_png}`;
  result.hidden = false;
  statusLine.textContent = `${file.name}: ${answer.top[0].class}`;
}

input.addEventListener("change", () => {
  if (input.files.length) classify(input.files[0]);
  input.value = ""; // choosing the same file again classifies it again
});
drop.addEventListener("dragover", (e) => {
  e.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) classify(e.dataTransfer.files[0]);
});
