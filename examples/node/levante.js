// Loads Levante's contract, protos/levante/v1/levante.proto, at run time: no generated
// code, nothing from the Python package. Shared by worker.js and client.js.
'use strict';

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

// The proto from this checkout; LEVANTE_PROTO points elsewhere when the example is copied.
const PROTO = process.env.LEVANTE_PROTO ||
  path.resolve(__dirname, '..', '..', 'protos', 'levante', 'v1', 'levante.proto');

const definition = protoLoader.loadSync(PROTO, {
  keepCase: true, // field names exactly as in the .proto: task_id, input_json, ...
  longs: String,
  enums: String,
  defaults: true, // unset fields read as '' / 0 / [] like in every other language
  oneofs: true, // message.kind names the member of a oneof that is set
});
const v1 = grpc.loadPackageDefinition(definition).levante.v1;

const DEFAULT_ENGINE = process.env.LEVANTE_ENGINE || '127.0.0.1:50051';

// Every call carries the bearer token, when the server has authentication on: role
// `worker` for worker.js, `client` for client.js (`admin` for both).
function metadata() {
  const md = new grpc.Metadata();
  if (process.env.LEVANTE_TOKEN) md.set('authorization', `Bearer ${process.env.LEVANTE_TOKEN}`);
  return md;
}

function engineClient(address) {
  return new v1.Engine(address, grpc.credentials.createInsecure());
}

function workersClient(address) {
  return new v1.Workers(address, grpc.credentials.createInsecure());
}

// A unary call as a promise: call(client, 'GetStatus', {execution_id}).
function call(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata(), (err, response) => (err ? reject(err) : resolve(response)));
  });
}

function statusName(code) {
  return Object.keys(grpc.status).find((name) => grpc.status[name] === code) || String(code);
}

module.exports = { DEFAULT_ENGINE, call, engineClient, grpc, metadata, statusName, workersClient };
