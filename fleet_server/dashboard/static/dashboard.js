// edgefleet dashboard: the only script. Pages work without it; it adds confirmations before
// destructive actions and an opt-in auto-refresh. No inline script anywhere (the CSP forbids it).
"use strict";

document.addEventListener("submit", (event) => {
  const button = event.submitter;
  const question = button && button.getAttribute("data-confirm");
  if (question && !window.confirm(question)) {
    event.preventDefault();
  }
});

document.addEventListener("DOMContentLoaded", () => {
  const box = document.querySelector("input[data-autorefresh]");
  if (!box) {
    return;
  }
  const key = "edgefleet.autorefresh";
  const seconds = Number(box.getAttribute("data-autorefresh")) || 10;
  let timer = null;
  const arm = () => {
    window.clearTimeout(timer);
    if (box.checked) {
      timer = window.setTimeout(() => window.location.reload(), seconds * 1000);
    }
  };
  box.checked = window.localStorage.getItem(key) === "on";
  box.addEventListener("change", () => {
    window.localStorage.setItem(key, box.checked ? "on" : "off");
    arm();
  });
  arm();
});
