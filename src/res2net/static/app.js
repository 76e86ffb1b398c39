// The page of `res2net serve`: send the chosen image to /predict, show the top-5 and the CAM.
// Class names come from the model's files: they are set as text, never as HTML.
"use strict";

const drop = document.getElementById("drop");
const input = document.getElementById("file");
const statusLine = document.getElementById("status");

fetch("/health").then((r) => r.json()).then((h) => {
  document.getElementById("model").textContent = `${h.model}: ${h.classes} classes on ${h.device}`;
});

function showTop(top) {
  const list = document.getElementById("top");
  list.replaceChildren();
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
  statusLine.textContent = "classifying...";
  document.getElementById("preview").src = URL.createObjectURL(file);
  try {
    const response = await fetch("/predict?topk=5&cam=1", {
      method: "POST",
      headers: { "Content-Type": file.type || "application/octet-stream" },
      body: file,
    });
    const answer = await response.json();
    if (!response.ok) {
      statusLine.textContent = answer.error || `error ${response.status}`;
      return;
    }
    showTop(answer.top);
    document.getElementById("cam").src = `data:image/png;base64,${answer.cam_png}`;
    document.getElementById("result").hidden = false;
    statusLine.textContent = "";
  } catch (err) {
    statusLine.textContent = `request failed: ${err}`;
  }
}

input.addEventListener("change", () => { if (input.files.length) classify(input.files[0]); });
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) classify(e.dataTransfer.files[0]);
});
