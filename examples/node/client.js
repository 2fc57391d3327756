#!/usr/bin/env node
// A Levante client in JavaScript, on the Engine service.
//
//   node client.js run FILE.yaml [-w WORKFLOW] [-i JSON] [--engine HOST:PORT]
//       registers the file's workflows, runs one, prints each state change (stderr)
//       until the execution ends, then its output JSON (stdout); exits 0 on SUCCESS.
//   node client.js complete TASK_ID (--result JSON | --error JSON) [--engine HOST:PORT]
//       reports the outcome of a deferred task (Engine.TaskComplete).
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const { parseArgs } = require('node:util');
const { DEFAULT_ENGINE, call, engineClient, metadata, statusName } = require('./levante');

const FINAL = new Set(['SUCCESS', 'ERROR', 'CANCELLED']);

async function run(engine, file, workflow, input) {
  const { workflows } = await call(engine, 'RegisterWorkflows', {
    definition: fs.readFileSync(file, 'utf8'),
  });
  const name = workflow || (workflows.length === 1 ? workflows[0] : null);
  if (name === null) throw new Error(`${file} defines ${workflows.join(', ')}: choose one with -w`);
  const { execution_id: executionId } = await call(engine, 'Run', {
    workflow: name,
    input_json: JSON.stringify(input),
    request_id: crypto.randomUUID(), // resending the same Run would return the same execution
  });
  console.error(`execution ${executionId} of ${name}`);
  await watch(engine, executionId);
  const status = await call(engine, 'GetStatus', { execution_id: executionId });
  console.error(`execution ${executionId} ${status.state}${status.state_info ? `: ${status.state_info}` : ''}`);
  console.log(JSON.stringify(status.output_json ? JSON.parse(status.output_json) : null, null, 2));
  return status.state === 'SUCCESS' ? 0 : 1;
}

// Prints every state change until the execution ends (the engine then ends the stream).
function watch(engine, executionId) {
  return new Promise((resolve, reject) => {
    const stream = engine.WatchExecution({ execution_id: executionId }, metadata());
    stream.on('data', (event) => {
      const what = event.kind === 'task' ? event.task_name : '(execution)';
      console.error(`  ${what.padEnd(24)} ${event.state.padEnd(16)} ${event.cause}`);
      if (event.kind === 'execution' && FINAL.has(event.state)) stream.cancel();
    });
    stream.on('error', (err) => (err.code === 1 /* CANCELLED, by us */ ? resolve() : reject(err)));
    stream.on('end', resolve);
  });
}

async function complete(engine, taskId, result, error) {
  if ((result === undefined) === (error === undefined)) {
    throw new Error('complete needs exactly one of --result JSON or --error JSON');
  }
  const outcome = result !== undefined
    ? { result_json: JSON.stringify(JSON.parse(result)) }
    : { error_json: JSON.stringify(JSON.parse(error)) };
  await call(engine, 'TaskComplete', { task_id: taskId, ...outcome });
  console.error(`task ${taskId} completed`);
  return 0;
}

async function main() {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      engine: { type: 'string', default: DEFAULT_ENGINE },
      workflow: { type: 'string', short: 'w' },
      input: { type: 'string', short: 'i', default: '{}' },
      result: { type: 'string' },
      error: { type: 'string' },
    },
  });
  const [command, argument] = positionals;
  const engine = engineClient(values.engine);
  try {
    if (command === 'run' && argument) {
      return await run(engine, argument, values.workflow, JSON.parse(values.input));
    }
    if (command === 'complete' && argument) {
      return await complete(engine, argument, values.result, values.error);
    }
    console.error('usage: node client.js run FILE.yaml [-w WORKFLOW] [-i JSON] [--engine HOST:PORT]\n' +
                  '       node client.js complete TASK_ID (--result JSON | --error JSON) [--engine HOST:PORT]');
    return 2;
  } catch (err) {
    // A gRPC error carries a status code: INVALID_ARGUMENT names the field or YAML line.
    const code = err.code === undefined ? '' : `${statusName(err.code)}: `;
    console.error(`client.js: ${code}${err.details || err.message}`);
    return 2;
  } finally {
    engine.close();
  }
}

main().then((code) => { process.exitCode = code; });
