#!/usr/bin/env node
// A Levante worker in JavaScript: serves a few js.* actions over Workers.Subscribe.
//
//   node worker.js [--engine HOST:PORT] [--capacity N] [--worker-id ID]
//                  [--heartbeat-seconds S] [--grace-seconds S]
//
// The life cycle it follows is the one docs/protocol.md describes:
//   1. open Workers.Subscribe and send hello{worker_id, actions, capacity, holding};
//   2. run each assignment and send result{task_id, result_json | error_json}, or
//      defer{task_id} when the outcome will come later through Engine.TaskComplete;
//   3. keep every outcome until the engine's ack for it arrives, resending it on each
//      new stream (the engine records an outcome once and answers a repeat with OK);
//   4. send heartbeat{task_ids} every few seconds, so that leases do not run out;
//   5. on cancel{task_id} abort the action and forget its outcome;
//   6. when the stream breaks, reconnect with backoff and say hello again;
//   7. on SIGTERM / SIGINT take no new work, deliver what is running, then close.
'use strict';

const { parseArgs } = require('node:util');
const os = require('node:os');
const crypto = require('node:crypto');
const { setTimeout: sleep } = require('node:timers/promises');
const { DEFAULT_ENGINE, metadata, statusName, workersClient } = require('./levante');

// ---------------------------------------------------------------- the actions

// What an action returns to say "the outcome will come later through TaskComplete".
const DEFER = Symbol('defer');

// Each action gets the assignment's input (a JSON object) and a context:
// { taskId, executionId, taskName, attempt, signal } (signal aborts on cancel).
const ACTIONS = {
  'js.upper': ({ text }) => String(text).toUpperCase(),

  'js.add': ({ a, b }) => {
    if (typeof a !== 'number' || typeof b !== 'number') {
      throw new TypeError(`js.add needs two numbers, got ${JSON.stringify(a)} and ${JSON.stringify(b)}`);
    }
    return a + b;
  },

  // Waits `ms` milliseconds (heartbeats keep its lease alive meanwhile), then answers.
  'js.sleep': async ({ ms = 1000, result = null }, { signal }) => {
    await sleep(ms, undefined, { signal });
    return result;
  },

  // The outcome is reported later by someone else, with Engine.TaskComplete and this
  // task_id (try: node client.js complete TASK_ID --result '{"approved": true}').
  'js.later': () => DEFER,
};

// ---------------------------------------------------------------- the worker

const BACKOFF_INITIAL_MS = 100;
const BACKOFF_MAX_MS = 5000;

function log(message) {
  console.log(`[${new Date().toISOString()}] ${message}`);
}

class Worker {
  constructor({ engine, capacity, workerId, heartbeatSeconds, graceSeconds }) {
    this.engine = engine;
    this.capacity = capacity;
    this.workerId = workerId;
    this.heartbeatMs = heartbeatSeconds * 1000;
    this.graceMs = graceSeconds * 1000;
    this.client = workersClient(engine);
    this.held = new Map(); // task_id -> { assignment, abort, running }: accepted, not finished
    this.unacked = new Map(); // task_id -> WorkerMessage: sent (or to send), no ack yet
    this.waiting = []; // task_ids accepted while every slot was busy, in arrival order
    this.running = 0;
    this.call = null; // the current stream, null while disconnected
    this.stopping = false;
    this.finished = false;
    this.failures = 0;
  }

  start() {
    this.connect();
    this.heartbeat = setInterval(() => {
      // Sent even when holding nothing: it also tells the engine that this worker is
      // alive (after one of its leases ran out, it gets no new work until heard from).
      this.send({ heartbeat: { task_ids: [...this.held.keys()] } });
    }, this.heartbeatMs);
  }

  // -------------------------------------------------------------- the stream

  connect() {
    const call = this.client.Subscribe(metadata());
    this.call = call;
    const opened = Date.now();
    let received = false;
    let closed = false;
    const holding = [...this.held.keys(), ...[...this.unacked.keys()].filter((id) => !this.held.has(id))];
    call.write({
      hello: {
        worker_id: this.workerId,
        actions: Object.keys(ACTIONS),
        capacity: this.capacity,
        holding,
      },
    });
    for (const message of this.unacked.values()) call.write(message);
    log(`subscribing to ${this.engine} as ${this.workerId} (capacity ${this.capacity}, ` +
        `holding ${holding.length}, resending ${this.unacked.size})`);

    call.on('data', (message) => {
      received = true;
      this.failures = 0;
      switch (message.kind) {
        case 'assignment': this.accept(message.assignment); break;
        case 'ack': this.acknowledge(message.ack); break;
        case 'cancel': this.cancel(message.cancel); break;
        case 'attached': // the engine accepted the hello: its actions are known there now
          console.log(`levante node worker attached to ${this.engine}`);
          break;
        default: log(`ignoring an engine message of kind ${message.kind}`);
      }
    });
    const onClosed = (why) => {
      if (closed) return;
      closed = true;
      if (this.call === call) this.call = null;
      if (this.finished || (this.stopping && this.drained())) return;
      if (Date.now() - opened >= BACKOFF_MAX_MS) this.failures = 0; // it was up for a while
      const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_INITIAL_MS * 2 ** Math.min(this.failures, 16));
      const delay = ceiling / 2 + Math.random() * ceiling / 2; // jitter over the upper half
      this.failures += 1;
      log(`stream ${received ? 'ended' : 'failed'} (${why}); reconnecting in ${Math.round(delay)} ms`);
      setTimeout(() => this.connect(), delay);
    };
    call.on('error', (err) => onClosed(`${statusName(err.code)}: ${err.details || err.message}`));
    call.on('end', () => onClosed('closed by the engine'));
  }

  send(message) {
    if (this.call !== null) this.call.write(message);
  }

  // -------------------------------------------------------------- engine messages

  accept(assignment) {
    const id = assignment.task_id;
    if (this.held.has(id) || this.unacked.has(id)) {
      log(`${id}: duplicate delivery ignored`); // at least once: the same assignment again
      return;
    }
    if (this.stopping) {
      // Not ours to run any more: the engine requeues it when this stream closes.
      log(`${id}: stopping, not taking ${assignment.action}`);
      return;
    }
    this.held.set(id, { assignment, abort: new AbortController(), running: false });
    this.waiting.push(id);
    this.runWaiting();
  }

  acknowledge(ack) {
    const message = this.unacked.get(ack.task_id);
    if (message === undefined) return;
    this.unacked.delete(ack.task_id);
    if (ack.code !== 'OK') {
      log(`${ack.task_id}: engine answered ${ack.code}: ${ack.message}`);
    } else if (message.defer) {
      console.log(`deferred ${ack.task_id}: complete it with Engine.TaskComplete`);
    }
    this.maybeFinish();
  }

  cancel(cancel) {
    const held = this.held.get(cancel.task_id);
    log(`${cancel.task_id}: cancelled by the engine (${cancel.reason})`);
    if (held === undefined) return;
    held.abort.abort(new Error(cancel.reason));
    if (!held.running) {
      this.held.delete(cancel.task_id);
      this.waiting = this.waiting.filter((id) => id !== cancel.task_id);
    }
  }

  // -------------------------------------------------------------- running actions

  runWaiting() {
    while (this.running < this.capacity && this.waiting.length > 0) {
      const id = this.waiting.shift();
      const held = this.held.get(id);
      if (held === undefined) continue;
      held.running = true;
      this.running += 1;
      this.execute(held).finally(() => {
        this.running -= 1;
        this.held.delete(id);
        this.runWaiting();
        this.maybeFinish();
      });
    }
  }

  async execute({ assignment, abort }) {
    const id = assignment.task_id;
    log(`${id}: running ${assignment.action} (attempt ${assignment.attempt})`);
    const outcome = await this.outcome(assignment, abort.signal);
    if (abort.signal.aborted) {
      return; // the engine would refuse it: the assignment no longer counts
    }
    const message = outcome === DEFER
      ? { defer: { task_id: id } }
      : { result: { task_id: id, ...outcome } };
    const how = outcome === DEFER ? 'deferred' : outcome.error_json ? `failed: ${outcome.error_json}` : 'succeeded';
    log(`${id}: ${assignment.action} ${how}`);
    this.unacked.set(id, message);
    this.send(message);
  }

  // Every way an action can end becomes { result_json } or { error_json }, or DEFER.
  async outcome(assignment, signal) {
    const action = ACTIONS[assignment.action];
    if (action === undefined) {
      return failure('ActionNotFound', `action '${assignment.action}' is not served here`);
    }
    let input;
    try {
      input = assignment.input_json ? JSON.parse(assignment.input_json) : {};
    } catch (err) {
      return failure('InvalidInput', `input_json is not JSON: ${err.message}`);
    }
    const context = {
      taskId: assignment.task_id,
      executionId: assignment.execution_id,
      taskName: assignment.task_name,
      attempt: assignment.attempt,
      signal,
    };
    try {
      const value = await action(input ?? {}, context);
      if (value === DEFER) return DEFER;
      return { result_json: JSON.stringify(value === undefined ? null : value) };
    } catch (err) {
      return failure(err?.name || 'Error', err?.message || String(err));
    }
  }

  // -------------------------------------------------------------- stopping

  drained() {
    return this.held.size === 0 && this.unacked.size === 0;
  }

  stop() {
    if (this.stopping) return;
    this.stopping = true;
    for (const id of this.waiting) this.held.delete(id); // not started: let the engine requeue
    this.waiting = [];
    log(`stopping: ${this.held.size} running, ${this.unacked.size} unacknowledged`);
    this.graceTimer = setTimeout(() => this.finish('grace period over'), this.graceMs);
    this.maybeFinish();
  }

  maybeFinish() {
    if (this.stopping && this.drained()) this.finish('drained');
  }

  finish(why) {
    if (this.finished) return;
    this.finished = true;
    clearInterval(this.heartbeat);
    clearTimeout(this.graceTimer);
    log(`closing the stream (${why})`);
    const call = this.call;
    this.call = null;
    if (call === null) process.exit(0);
    // Half-close: the engine then ends the stream and requeues anything still leased.
    call.on('status', () => process.exit(0));
    call.end();
    setTimeout(() => process.exit(0), 2000).unref();
  }
}

function failure(type, message) {
  return { error_json: JSON.stringify({ type, message }) };
}

function main() {
  const { values } = parseArgs({
    options: {
      engine: { type: 'string', default: DEFAULT_ENGINE },
      capacity: { type: 'string', default: '4' },
      'worker-id': { type: 'string' },
      'heartbeat-seconds': { type: 'string', default: '10' },
      'grace-seconds': { type: 'string', default: '10' },
    },
  });
  const worker = new Worker({
    engine: values.engine,
    capacity: Number(values.capacity),
    // Stable for the life of the process; a restarted process is a new worker.
    workerId: values['worker-id'] || `${os.hostname()}-node-${process.pid}-${crypto.randomBytes(3).toString('hex')}`,
    heartbeatSeconds: Number(values['heartbeat-seconds']),
    graceSeconds: Number(values['grace-seconds']),
  });
  if (!(worker.capacity >= 1) || !(worker.heartbeatMs > 0) || !(worker.graceMs >= 0)) {
    console.error('worker.js: --capacity must be at least 1, --heartbeat-seconds positive');
    process.exit(2);
  }
  process.on('SIGTERM', () => worker.stop());
  process.on('SIGINT', () => worker.stop());
  console.log(`levante node worker serving ${Object.keys(ACTIONS).join(', ')} for ${values.engine}`);
  worker.start();
}

main();
