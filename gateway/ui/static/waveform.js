// A sweeping trace, as on a bedside monitor: samples from `waveform` events are queued and
// played out at their own rate (hz), drawn left to right with an erase gap ahead of the pen.
// Blocks arrive about once a second, so the trace runs about one block behind: playback
// starts once START_S of signal is queued and speeds up or slows down slightly to keep
// about TARGET_S queued, which hides the arrival jitter without drifting. A gap in the data
// stops the pen (nothing is invented); a backlog beyond MAX_S is skipped.

const WINDOW_S = 6;      // seconds across the canvas
const START_S = 1.2;
const TARGET_S = 1.5;
const MAX_S = 4;
const GAP_PX = 14;
const FLAGGED = "#6b7480"; // samples of a block with quality flags: drawn grey

export class Sweep {
  constructor(canvas, colour) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d");
    this.colour = colour;
    this.reset();
    new ResizeObserver(() => this.resize()).observe(canvas);
    this.resize();
  }

  reset() {
    this.queue = [];       // [{samples, flags, i}]
    this.queued = 0;       // samples in the queue
    this.hz = 0;
    this.playing = false;
    this.carry = 0;
    this.x = 0;
    this.lastY = null;
    this.lo = Infinity;
    this.hi = -Infinity;
    this.drawn = 0;
    this.canvas.dataset.samples = "0";
    this.ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
  }

  resize() {
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(1, Math.round(this.canvas.clientWidth * dpr));
    const h = Math.max(1, Math.round(this.canvas.clientHeight * dpr));
    if (w !== this.canvas.width || h !== this.canvas.height) {
      this.canvas.width = w;
      this.canvas.height = h;
      this.x = 0;
      this.lastY = null;
    }
  }

  /** A `waveform` event's data: {t0, hz, samples, flags}. */
  push(block) {
    if (!Array.isArray(block.samples) || block.samples.length === 0 || !(block.hz > 0)) return;
    if (block.hz !== this.hz) {
      this.queue = [];
      this.queued = 0;
      this.hz = block.hz;
      this.playing = false;
    }
    // Vertical scale: the range of recent blocks, widened at once and narrowed slowly.
    let lo = Infinity, hi = -Infinity;
    for (const v of block.samples) {
      if (Number.isFinite(v)) { if (v < lo) lo = v; if (v > hi) hi = v; }
    }
    if (Number.isFinite(lo)) {
      this.lo = Number.isFinite(this.lo) ? Math.min(lo, this.lo + (lo - this.lo) * 0.2) : lo;
      this.hi = Number.isFinite(this.hi) ? Math.max(hi, this.hi + (hi - this.hi) * 0.2) : hi;
    }
    this.queue.push({ samples: block.samples, flags: block.flags | 0, i: 0 });
    this.queued += block.samples.length;
    while (this.queued > MAX_S * this.hz && this.queue.length > 1) {
      const dropped = this.queue.shift();
      this.queued -= dropped.samples.length - dropped.i;
    }
  }

  /** Advance the pen by `dtMs` of playback. */
  frame(dtMs) {
    if (!this.hz) return;
    if (!this.playing) {
      if (this.queued < START_S * this.hz) return;
      this.playing = true;
    }
    const rate = Math.min(1.25, Math.max(0.8, 1 + (this.queued / this.hz - TARGET_S) * 0.25));
    this.carry += (dtMs / 1000) * this.hz * rate;
    let n = Math.floor(this.carry);
    this.carry -= n;
    const { ctx, canvas } = this;
    const w = canvas.width, h = canvas.height;
    const pxPerSample = w / (WINDOW_S * this.hz);
    const pad = h * 0.12;
    const span = this.hi - this.lo || 1;
    const dpr = window.devicePixelRatio || 1;
    ctx.lineWidth = 2 * dpr;
    ctx.lineJoin = "round";
    while (n > 0) {
      const head = this.queue[0];
      if (!head) { this.playing = false; this.carry = 0; this.lastY = null; break; }
      const v = head.samples[head.i++];
      this.queued -= 1;
      n -= 1;
      if (head.i >= head.samples.length) this.queue.shift();
      const x0 = this.x;
      let x1 = x0 + pxPerSample;
      if (x1 >= w) { this.x = 0; this.lastY = null; continue; }
      ctx.clearRect(Math.floor(x0) + 1, 0, GAP_PX * dpr, h);
      if (!Number.isFinite(v)) { this.lastY = null; this.x = x1; continue; }
      const y = h - pad - ((v - this.lo) / span) * (h - 2 * pad);
      if (this.lastY !== null) {
        ctx.strokeStyle = head.flags ? FLAGGED : this.colour;
        ctx.beginPath();
        ctx.moveTo(x0, this.lastY);
        ctx.lineTo(x1, y);
        ctx.stroke();
      }
      this.lastY = y;
      this.x = x1;
      this.drawn += 1;
    }
    this.canvas.dataset.samples = String(this.drawn);
  }
}
