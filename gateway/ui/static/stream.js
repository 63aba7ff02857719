// The live stream (GET /v1/stream, text/event-stream) read with fetch() and a stream reader:
// EventSource cannot send the Authorization header. Reconnects with capped, jittered backoff,
// resuming with Last-Event-ID; a stream silent for longer than three heartbeats (15 s each)
// counts as lost, because a dead TCP connection may never report an error by itself.

const SILENT_MS = 45_000;
const MAX_BACKOFF_MS = 15_000;

export class AuthError extends Error {
  constructor(status, reason) {
    super(reason);
    this.status = status;
  }
}

/** Reads the error body's `reason` (ErrorBody) when there is one. */
export async function reasonOf(res) {
  try {
    const body = await res.json();
    if (body && typeof body.reason === "string") return body.reason;
  } catch { /* not JSON */ }
  return res.statusText || "no reason given";
}

export class LiveStream {
  /**
   * @param {object} o
   * @param {string} o.url            the stream URL with its query
   * @param {() => string} o.key      the API key at the moment of (re)connecting
   * @param {(name: string, data: object) => void} o.onEvent
   * @param {(state: "connecting"|"live"|"lost", detail?: object) => void} o.onState
   * @param {(err: AuthError) => void} o.onAuthError   401/403: no retry
   */
  constructor(o) {
    Object.assign(this, o);
    this.lastEventId = null;
    this.running = false;
    this.attempt = 0;
    this.controller = null;
  }

  start() {
    if (this.running) return;
    this.running = true;
    this.loop();
  }

  stop() {
    this.running = false;
    this.controller?.abort();
  }

  async loop() {
    while (this.running) {
      let error;
      try {
        await this.once();
        error = new Error("the gateway closed the stream");
      } catch (err) {
        if (err instanceof AuthError) {
          this.running = false;
          this.onAuthError(err);
          return;
        }
        error = err;
      }
      if (!this.running) return;
      this.attempt += 1;
      const delay = Math.min(MAX_BACKOFF_MS, 500 * 2 ** Math.min(this.attempt, 6)) * (0.5 + Math.random() / 2);
      this.onState("lost", { reason: error?.message || String(error), attempt: this.attempt, retryMs: delay });
      await new Promise((resolve) => setTimeout(resolve, delay));
    }
  }

  async once() {
    this.onState("connecting", { attempt: this.attempt });
    const controller = (this.controller = new AbortController());
    const headers = { Authorization: `Bearer ${this.key()}`, Accept: "text/event-stream" };
    if (this.lastEventId !== null) headers["Last-Event-ID"] = this.lastEventId;
    const res = await fetch(this.url, { headers, signal: controller.signal, cache: "no-store" });
    if (res.status === 401 || res.status === 403) throw new AuthError(res.status, await reasonOf(res));
    if (!res.ok) throw new Error(`HTTP ${res.status}: ${await reasonOf(res)}`);
    this.attempt = 0;
    this.onState("live");

    let lastByte = Date.now();
    const watchdog = setInterval(() => {
      if (Date.now() - lastByte > SILENT_MS) controller.abort(new Error("no data or heartbeat for 45 s"));
    }, 5_000);
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let event = { id: null, name: "message", data: [] };
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        lastByte = Date.now();
        buffer += value;
        let nl;
        while ((nl = buffer.indexOf("\n")) >= 0) {
          let line = buffer.slice(0, nl);
          buffer = buffer.slice(nl + 1);
          if (line.endsWith("\r")) line = line.slice(0, -1);
          if (line === "") {
            this.dispatch(event);
            event = { id: null, name: "message", data: [] };
            continue;
          }
          if (line.startsWith(":")) continue; // comment: the heartbeat
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let val = colon < 0 ? "" : line.slice(colon + 1);
          if (val.startsWith(" ")) val = val.slice(1);
          if (field === "event") event.name = val;
          else if (field === "data") event.data.push(val);
          else if (field === "id") event.id = val;
        }
      }
    } catch (err) {
      throw controller.signal.aborted && controller.signal.reason instanceof Error ? controller.signal.reason : err;
    } finally {
      clearInterval(watchdog);
    }
  }

  dispatch(event) {
    if (event.id !== null) this.lastEventId = event.id;
    if (event.data.length === 0) return;
    let data;
    try {
      data = JSON.parse(event.data.join("\n"));
    } catch (err) {
      console.error("Unreadable stream event.", event.name, err);
      return;
    }
    this.onEvent(event.name, data);
  }
}
