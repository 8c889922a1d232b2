// Line charts over steps with the vendored uPlot: one chart per element, series added by name.
"use strict";

const COLORS = ["#3050d0", "#d04030", "#20a060", "#a040c0", "#d09020", "#208090"];

class StepChart {
  // title: shown above; names: the series (each a list of [step, value] points, steps may differ)
  constructor(el, title, names, fmt) {
    this.el = el; this.title = title; this.names = names; this.points = {}; this.plot = null;
    this.fmt = fmt || (v => v);
    names.forEach(n => { this.points[n] = []; });
  }
  clear() { Object.keys(this.points).forEach(n => { this.points[n] = []; }); this.draw(); }
  add(name, step, value) {
    if (value === null || value === undefined || !isFinite(value)) return;
    if (!(name in this.points)) { this.points[name] = []; this.names.push(name); this.rebuild = true; }
    this.points[name].push([step, value]);
  }
  set(name, points) {
    if (!(name in this.points)) { this.names.push(name); this.rebuild = true; }
    this.points[name] = points;
  }
  count() { return Object.values(this.points).reduce((a, p) => a + p.length, 0); }
  data() {
    // uPlot wants one x array: the union of every series' steps, nulls where a series has no point
    const xs = [...new Set(this.names.flatMap(n => this.points[n].map(p => p[0])))].sort((a, b) => a - b);
    const at = {}; xs.forEach((x, i) => { at[x] = i; });
    const ys = this.names.map(n => { const y = xs.map(() => null); this.points[n].forEach(p => { y[at[p[0]]] = p[1]; }); return y; });
    return [xs, ...ys];
  }
  draw() {
    const data = this.data();
    this.el.dataset.points = String(this.count());  // what the browser tests read: points drawn
    if (this.plot && !this.rebuild) { this.plot.setData(data); return; }
    if (this.plot) this.plot.destroy();
    this.rebuild = false;
    const series = [{label: "step"}].concat(this.names.map((n, i) => (
      {label: n, stroke: COLORS[i % COLORS.length], width: 2, spanGaps: true, points: {show: data[0].length < 60}})));
    this.plot = new uPlot({title: this.title, width: 500, height: 230, scales: {x: {time: false}}, series: series,
                           axes: [{label: "step"}, {size: 60, values: (u, vals) => vals.map(this.fmt)}]}, data, this.el);
  }
}
window.StepChart = StepChart;
