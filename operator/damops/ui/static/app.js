// damops dashboard: confirmations for actions, and the throughput chart.
"use strict";

// Every form that changes something asks first (data-confirm holds the question).
document.addEventListener("submit", function (event) {
  var question = event.target.getAttribute("data-confirm");
  if (question && !window.confirm(question)) {
    event.preventDefault();
  }
});

// Finished operations per minute over the last hour, refreshed every 5 s.
function throughputChart(el) {
  var chart = null;
  function draw(data) {
    var series = [data.minutes, data.succeeded, data.failed, data.cancelled];
    if (chart) {
      chart.setData(series);
      return;
    }
    chart = new uPlot({
      width: Math.max(el.clientWidth, 320),
      height: 200,
      series: [
        {},
        { label: "succeeded", stroke: "#2e7d32", fill: "rgba(46,125,50,0.12)" },
        { label: "failed", stroke: "#c62828" },
        { label: "cancelled", stroke: "#757575" },
      ],
      axes: [{}, { label: "per minute" }],
    }, series, el);
    el.setAttribute("data-ready", "1");
  }
  function load() {
    fetch(el.getAttribute("data-src"), { headers: { Accept: "application/json" } })
      .then(function (r) { return r.ok ? r.json() : Promise.reject(r.status); })
      .then(draw)
      .catch(function (e) { el.setAttribute("data-error", String(e)); });
  }
  load();
  // A hidden tab does not poll: the chart reads every operation finished in the last hour.
  setInterval(function () { if (!document.hidden) { load(); } }, 5000);
}

document.addEventListener("DOMContentLoaded", function () {
  var el = document.getElementById("throughput");
  if (el && window.uPlot) {
    throughputChart(el);
  }
});
